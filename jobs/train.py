"""Train a multi-task model.

Local debug mode (one process, GPU if present, else CPU; no cluster):
    python jobs/train.py --local --quick --arch distillation --encoder resnet18

On a Ray cluster (see README "Running on a cluster"; workers use GPUs unless --no-use-gpu; a
submitted job runs in a temporary copy of its working dir, so --out is a URL or a folder every
node shares):
    ray job submit --working-dir . -- python jobs/train.py --arch distillation --num-workers 4 --out s3://my-bucket/runs

A run lives in <out>/<name>/ (name: descriptive + a hash of the training config): config.json,
train.log, checkpoints, metrics. An existing run folder is only reused with --resume, and only
for the same training configuration. With --print-config the tool shows the resolved
configuration and exits; with --config FILE it starts from a saved one (a run's config.json
and --resume continue that run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Annotated, Callable, Iterator

import tyro

from mtl.cli import CONFIG_HELP, FlatExperiment, given_fields, idle_flags_given, parse_experiment, preset_help, usage_error
from mtl.config import PRESETS, DistConfig, ExperimentConfig, flag


@dataclass(frozen=True)
class TrainCommand:
    experiment: FlatExperiment = field(default_factory=ExperimentConfig)
    config: Annotated[str | None, tyro.conf.arg(help=CONFIG_HELP)] = None
    quick: Annotated[bool, tyro.conf.arg(help="a first run that finishes in about 3 minutes on a laptop CPU: "
                                              f"{preset_help(PRESETS['quick'])}; flags given override it")] = False
    local: bool = False  # single-process debug mode, no Ray
    print_config: bool = False  # print the resolved configuration and the run folder, then exit


def _local_fits(cmd: TrainCommand) -> None:
    d = cmd.experiment.dist
    if cmd.local and (d.num_workers != 1 or d.strategy != "ddp"):
        raise ValueError("--local trains one process: --num-workers and --strategy deepspeed need Ray (drop --local)")
    if not (cmd.local or cmd.print_config):
        from mtl.machine import check_ray

        check_ray("training without --local (add it to train in this process)")


# what only a run on Ray uses (--num-workers and --strategy: `_local_fits`)
RAY_ONLY = (*(f"dist.{f.name}" for f in dataclasses.fields(DistConfig) if f.name not in ("num_workers", "strategy")),
            "train.preemption_poll_every")


def parse(argv: list[str] | None = None) -> tuple[TrainCommand, ExperimentConfig]:
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd = parse_experiment(TrainCommand, argv, description=__doc__, presets={"quick": PRESETS["quick"]}, check=_local_fits)
    idle = idle_flags_given(cmd.experiment, argv)
    if idle:  # (another value trains the same: it would be ignored without a word)
        usage_error(idle)
    ray_only = given_fields(argv, RAY_ONLY) if cmd.local else []
    if ray_only:  # (a flag that would be ignored without a word: --address or --use-gpu expect a cluster or a GPU)
        one = len(ray_only) == 1
        usage_error(f"--local trains in this process, without Ray: {', '.join(flag(p.rpartition('.')[2]) for p in ray_only)} "
                    f"{'is' if one else 'are'} for a run on Ray (drop --local, or {'it' if one else 'them'}"
                    f"{'; in this process --device cpu or cuda chooses' if 'dist.use_gpu' in ray_only else ''})")
    return cmd, cmd.experiment


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(argv)
    from mtl.errors import USER_ERRORS, WorkerFailed, no_space, one_line
    from mtl.progress import wide_console

    console = wide_console()
    try:
        if args.print_config:
            return print_config(cfg, args.local, console)
        if cfg.train.baselines and not cfg.train.resume:  # (the trainer reads them; a bad one is named before Ray starts)
            from mtl.multitask import load_baselines

            load_baselines(cfg.train.baselines, cfg.data)  # (a resume is judged by the values its checkpoint holds)
        if not (cfg.data.root or cfg.data.shards or cfg.train.resume):  # (a crop the synthetic set's size cannot fill:
            from mtl.data.build import crop_note  # refused before the set is generated; the trainer checks other data)

            crop_note(cfg.data, cfg.data.synthetic_size)
        if os.environ.get("MLFLOW_TRACKING_URI"):  # set, but mlflow is missing: an error now, before the run folder
            from mtl.tracking import mlflow_tracking_uri

            mlflow_tracking_uri()
        from mtl.lease import hold
        from mtl.runs import resolve_config, run_url

        # (one driver per run folder; its lines name commands and paths: printed as they are, not as markup)
        with hold(run_url(resolve_config(cfg)), "run", lambda line: console.print(line, markup=False)):
            return run_local(cfg, console) if args.local else run_on_ray(cfg, console)
    except USER_ERRORS as e:  # bad data, flags, checkpoints, storage, cluster: say which, no traceback
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # (a full disk: said as a user error; any other keeps its traceback)
        if not (said := no_space(e)):
            raise
        print(f"error: {said}; the same command with --resume continues from the latest checkpoint", file=sys.stderr)
        return 2
    except WorkerFailed as e:  # on Ray: a worker's error, its traceback printed by Ray above
        print(f"error: training failed on {e} (traceback above and in `ray job logs`)", file=sys.stderr)
        return 2 if e.user_error else 1
    except KeyboardInterrupt as e:  # (a checkpoint being written was waited for: `mtl.engine.Trainer._end`)
        tag = getattr(e, "tag", False)  # (`mtl.engine.Stopped`: SIGTERM in local mode)
        if tag is not False:
            print(f"stopped by SIGTERM{f' after checkpoint {tag}' if tag else ''}; the same command with --resume continues "
                  f"from the latest checkpoint", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("interrupted; the same command with --resume continues from the latest checkpoint", file=sys.stderr)
        return 130


def print_config(cfg: ExperimentConfig, local: bool, console) -> int:
    """The configuration a run would use, with defaults resolved (GPU decision included where it
    can be made without connecting to Ray), and its run folder."""
    import torch

    from mtl.distributed.capacity import cluster_address, default_use_gpu
    from mtl.runs import resolve_config, run_url

    if not local and cfg.dist.use_gpu is None:  # as on the cluster, without connecting (this machine's GPUs)
        try:
            joined = cluster_address(cfg.dist.address) is not None
        except ValueError:  # (a dashboard's address: `ray job submit` runs the job on that cluster)
            joined = True
        use_gpu = default_use_gpu(joined, torch.cuda.device_count())
        cfg = dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, use_gpu=use_gpu))
    cfg = resolve_config(cfg)
    console.print_json(cfg.to_json())
    console.print(f"run folder: {run_url(cfg)}")
    return 0


@contextlib.contextmanager
def sigterm_ends_the_run() -> Iterator[Callable[[], bool]]:
    """SIGTERM (``docker stop``, a Kubernetes pod's end, Slurm's preemption, ``kill``): the
    local run checkpoints the step it is at and ends (`mtl.engine.Stopped`, exit 143), so it
    loses no step; a second one ends it at once (a checkpoint being written is waited for, as
    after Ctrl-C). Yields whether one came. Loader workers, forked with this handler, only note
    it: a signal to the whole process group ends the run the same way."""
    from mtl.engine import Stopped

    came = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if came.is_set():
            raise Stopped(None)
        came.set()

    if threading.current_thread() is not threading.main_thread():  # (signals reach the main thread only)
        yield lambda: False
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield came.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_local(cfg: ExperimentConfig, console) -> int:
    from mtl.engine import Runtime, fit, local_runtime
    from mtl.runs import prepare_run, run_url

    cfg = prepare_run(cfg, console.print, local=True)
    console.print_json(cfg.to_json())  # the resolved configuration, as saved in the run folder
    with sigterm_ends_the_run() as stop_requested:
        rt: Runtime = dataclasses.replace(local_runtime(cfg), console=console, stop_requested=stop_requested)
        result = fit(cfg, rt)
    if not result.metrics:
        console.print(f"nothing to train: the run had already finished all {cfg.train.epochs} epochs (to train it longer: "
                      f"--resume --name {cfg.train.name} --epochs N)")
        return 0
    console.print(f"done: {result_line(result.metrics[-1])} (best score {result.best_score:.2f}); run folder {run_url(cfg)}")
    return 0


def result_line(m: dict) -> str:
    """The last validation's main numbers (a single-task run has only its task's)."""
    shown = {"miou": "mIoU", "si_log_rmse": "SI-logRMSE", "grader": "grader"}
    return "  ".join(f"{label} {m[k]:.2f}" for k, label in shown.items() if k in m) or "no validation metrics"


def run_on_ray(cfg: ExperimentConfig, console) -> int:
    from mtl.checkpoint import BEST_FILE, CHECKPOINTS, CheckpointIndex, committed_metrics
    from mtl.distributed.ray_train import run_ray
    from mtl.runs import run_url
    from mtl.storage import json_bytes, write_bytes_atomic

    _, cfg = run_ray(cfg, console.print)  # the resolved config names the run folder (a worker's error: WorkerFailed)
    url = run_url(cfg)
    # from the run folder, not Ray's result: a restart from a checkpoint Ray never registered (one
    # local mode wrote) that had nothing left to train leaves Ray's result at an older one
    epochs, tag = committed_metrics(url), CheckpointIndex(url).latest_tag()
    final = epochs[max(epochs)] if epochs else {}
    summary = {"run": url, "final_metrics": final, "latest_checkpoint": f"{url}/{CHECKPOINTS}/{tag}" if tag else None,
               "best_model": f"{url}/{BEST_FILE}"}
    write_bytes_atomic(f"{url}/summary.json", json_bytes(summary, default=str))
    console.print(f"done: {result_line(final)}; run {url} (checkpoints/, best.pt, summary.json, train.log)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
