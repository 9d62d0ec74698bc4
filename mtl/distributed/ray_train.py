"""Ray Train: the shared train loop on every worker of a Ray cluster, with DDP or DeepSpeed,
checkpoints in (S3) storage, and restarts after worker or node failures.

Checkpoints take the run folder layout of every mode (`mtl.checkpoint`): `RayStorage` hands the
checkpointer's folder to ``ray.train.report``, which uploads it to ``checkpoints/<tag>/``. Resume
is Ray Train V2's: the worker group Ray restarts after a failure continues from the latest
reported checkpoint, and so does a later `run_ray` of the same run with ``--resume`` (the driver
checks the run folder first, as local mode does: `mtl.runs.prepare_run`); a run folder whose
``latest.json`` names a newer checkpoint than Ray knows of (a run begun in local mode, or a
report Ray had not registered when its driver died) continues from that one. A checkpoint holds
epoch and step; the LR is a function of the step and data order a function of (seed, epoch), so
resuming from a checkpoint one report older than the failure is exactly right, just a little
later.

Workers get no secrets from the driver: Ray keeps every actor's runtime environment in its state
API (dashboard, ``ray list actors --detail``), so object-store credentials must reach the nodes
the way each platform intends (instance profile / IAM role, a Kubernetes secret on the pods, the
AWS config or environment of the node's ``ray start``). Only non-secret settings are forwarded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import tempfile
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterator

import torch
from rich.json import JSON
from torch import nn

from mtl.checkpoint import CHECKPOINTS, POINTER, FolderStorage, finished, staging_prefix
from mtl.config import ExperimentConfig
from mtl.cuda_graph import OTHER_RANK_FAILED
from mtl.distributed.capacity import NO_CUDA_HINT, WorkerPlan, cluster_address, plan_workers, read_capacity
from mtl.engine import Runtime, Stopped, TrainingDiverged, fit, may_capture
from mtl.errors import ClusterError, WorkerFailed
from mtl.models.encoders import IMAGENET
from mtl.runs import RAY_SNAPSHOT, out_root, prepare_run, run_name, run_url
from mtl.strategy import DDPStrategy, PlainStrategy, Strategy

SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a job started by `ray job submit`
# environment forwarded to every worker: endpoints, region and profile *names*, our cache; never
# keys or tokens (see the module docstring)
FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
               "STREETMTL_CACHE", "TORCH_EXTENSIONS_DIR",
               # rank 0 logs to MLflow (`mtl.tracking`); a token (MLFLOW_TRACKING_TOKEN) reaches nodes as keys do
               "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_ALLOW_FILE_STORE")


class RayStorage:
    """Checkpoint folders published through ``ray.train.report`` into the run folder's
    ``checkpoints/<tag>/`` (the same layout as `mtl.checkpoint.FolderStorage`; Ray uploads each
    rank's files and keeps the last ``keep_last``), so Ray's restarts resume from them and
    every reader finds them through the same ``latest.json``."""

    def __init__(self, run_url: str, keep_last: int, outside_ray: tuple[str, ...] = ()) -> None:
        """``outside_ray``: the checkpoints the run folder held that Ray never registered (a run
        begun in local mode: `prepare_run_folder`); Ray would never delete them."""
        self.folder, self.keep_last, self.outside_ray = FolderStorage(run_url, keep_last=0), keep_last, set(outside_ray)

    def publish(self, folder: str, tag: str, metrics: dict[str, Any]) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(folder) if os.listdir(folder) else None
        ray.train.report(self._scalars(metrics), checkpoint=checkpoint, checkpoint_dir_name=f"{CHECKPOINTS}/{tag}")

    def publish_later(self, tag: str, metrics: dict[str, Any], write: Callable[[str], None] | None,
                      then: Callable[[], None] | None) -> Future:
        """Ray's asynchronous report: every rank reports now (the report is collective), and Ray's
        upload thread (one per worker: reports register in order) runs ``write`` into the local
        folder, uploads it as the synchronous report would, runs ``then`` (the commit) and deletes
        the folder (`_uploader`). When that fails for good, Ray fails the worker group, which
        restarts from the last committed checkpoint; the future holds the error too."""
        import ray.train

        mode, name = ray.train.CheckpointUploadMode.ASYNC, f"{CHECKPOINTS}/{tag}"
        if write is None:
            ray.train.report(self._scalars(metrics), checkpoint=None, checkpoint_dir_name=name, checkpoint_upload_mode=mode)
            return finished()
        done: Future = Future()
        folder, reports = tempfile.mkdtemp(prefix=staging_prefix()), _reports_made()
        try:
            ray.train.report(self._scalars(metrics), checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=name, checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True,
                             checkpoint_upload_fn=_uploader(folder, write, then, done))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if reports is not None and _reports_made() == reports:  # Ray skipped it (its worker group is being replaced):
            shutil.rmtree(folder, ignore_errors=True)  # nothing will run the upload, and a wait for it would never end
            done.set_result(None)
        return done

    @staticmethod
    def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
        """The headline scalars for Ray (per-class IoUs and LR lists are in metrics/<tag>.json)."""
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "/" not in k}

    def commit(self, tag: str) -> None:
        """The pointer's history lists what Ray keeps (`ray_keeps`, CheckpointConfig's
        num_to_keep); Ray deletes the older folders it registered itself, and the ones it never
        did (``outside_ray``) go here once the pointer no longer lists them, as a local run's
        commit deletes its own."""
        listed, _ = self.folder.index.commit(tag, ray_keeps(self.keep_last) or 0)
        gone = sorted(t for t in self.outside_ray if t < tag and t not in listed)
        if gone:
            self.folder.delete(gone)
            self.outside_ray -= set(gone)

    @property
    def skipped(self) -> list[str]:
        return self.folder.skipped

    def before(self, tag: str) -> str | None:
        return self.folder.before(tag)

    @contextlib.contextmanager
    def latest(self) -> Iterator[tuple[str, str] | None]:
        """Ray's latest registered checkpoint, or the pointer's when that is newer (tags sort in
        the order they are written: ``epoch-NNNN``): a run begun outside Ray, or whose Ray
        snapshot missed the last report before its driver died, continues from the newest
        complete checkpoint in the run folder. A pointer older than Ray's is moved to it."""
        import ray.train

        self.folder.skipped = []
        checkpoint, tag = ray.train.get_checkpoint(), self.folder.index.latest_tag()
        ray_tag = checkpoint.path.rstrip("/").rsplit("/", 1)[-1] if checkpoint is not None else None
        if ray_tag is None or (tag is not None and tag > ray_tag):
            with self.folder.latest() as found:
                yield found
            return
        if tag != ray_tag and ray.train.get_context().get_world_rank() == 0:
            # Ray took the report, its rank 0 died before the pointer moved: every reader (local
            # mode, evaluation, the next start's clean-up) follows the pointer, so it moves now
            self.commit(ray_tag)
        with checkpoint.as_directory() as d:
            yield d, f"{self.folder.index.url}/{ray_tag}"  # as a URL, like every other checkpoint's


def _reports_made() -> int | None:
    """How many reports this worker's Ray Train context has taken (internal; None if unknown)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return int(get_train_context().report_call_index)
    except Exception:  # noqa: BLE001 - another Ray, or no context: unknown
        return None


def _ray_retries(e: BaseException, attempt: int) -> bool:
    """Whether Ray will run the upload again after attempt ``attempt`` failed with ``e``: its
    own test (`ray._common.retry.call_with_retry`) with the limits its upload is decorated with
    (Ray 2.60: 3 attempts on transient S3 errors), read from the decorator, not copied."""
    try:
        import inspect

        from ray._common.retry import format_exception, matches_error
        from ray.train.v2._internal.execution.context import TrainContext

        limits = inspect.getclosurevars(TrainContext._upload_checkpoint).nonlocals
        attempts, match = int(limits["max_attempts"]), limits["match"]
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):  # (another Ray: every failure is final)
        return False
    text = format_exception(e)
    return (isinstance(e, Exception) and attempt < attempts
            and (match is None or any(matches_error(pattern, text) for pattern in match)))


def _uploader(folder: str, write: Callable[[str], None], then: Callable[[], None] | None,
              done: Future) -> Callable[[Any, str], Any]:
    """The ``checkpoint_upload_fn`` of a background checkpoint (`RayStorage.publish_later`):
    write the state into ``folder``, upload it as Ray's own upload does, commit (``then``), and
    resolve ``done``: with the error only when Ray will not try again."""
    attempts = [0]

    def upload(checkpoint: Any, dir_name: str) -> Any:
        import ray.train

        attempts[0] += 1
        try:
            os.makedirs(folder, exist_ok=True)  # (a retry's: the failed attempt removed it)
            write(folder)
            persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
            if then is not None:
                then()
        except BaseException as e:
            shutil.rmtree(folder, ignore_errors=True)  # (Ray deletes it after a successful upload only)
            if not _ray_retries(e, attempts[0]) and not done.done():
                done.set_exception(e)
            raise
        if not done.done():
            done.set_result(None)
        return persisted

    return upload


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # how long Ray Train tries to place a worker group


def drop_unreferenced_checkpoints(url: str, log=print) -> list[str]:
    """Before a run's Train controller starts (nothing deletes checkpoints meanwhile): delete the
    checkpoint folders older than the pointer's latest that neither the pointer lists nor Ray's
    snapshot references. Ray deletes only the checkpoints it registered; one whose report it
    never took (the worker committed it, then its node was lost) would stay forever. Newer
    folders stay: the workers of an attempt Ray is still tearing down may be writing one (tags
    sort in the order they are written). A Ray snapshot that names a folder which is gone, or
    cannot be read, is deleted first (`_drop_stale_snapshot`). Returns the deleted tags."""
    return _tidy(url, log)[0]


def _tidy(url: str, log) -> tuple[list[str], list[str]]:
    """`drop_unreferenced_checkpoints`' deleted tags, and the tags left that the pointer lists
    and Ray's record does not (`prepare_run_folder`)."""
    storage = FolderStorage(url, keep_last=0)
    pointer = storage.index.read()
    folders = storage.folders()
    named = _drop_stale_snapshot(url, folders, log)  # (also without a pointer: Ray refuses such a snapshot as well)
    if pointer is None:
        return [], []
    listed = {pointer["latest"], *pointer.get("history", [])}
    dropped = sorted(t for t in folders if t.startswith("epoch-") and t < pointer["latest"] and t not in listed | named)
    storage.delete(dropped)
    if dropped:
        log(f"deleted checkpoint folder(s) {', '.join(dropped)} of {url}: neither its latest.json nor Ray's record lists them")
    return dropped, sorted(listed - named)


def prepare_run_folder(url: str, log=print) -> list[str]:
    """Before a run's Train controller starts: `drop_unreferenced_checkpoints`, then the
    checkpoints left that the pointer lists and Ray's record does not (those of a run begun in
    local mode, or continued there): Ray will never delete them, so the workers' commits do once
    the pointer no longer lists them (`RayStorage.commit`)."""
    return _tidy(url, log)[1]


def _drop_stale_snapshot(url: str, folders: list[str], log) -> set[str]:
    """The tags Ray's snapshot names, after deleting a snapshot that names a checkpoint folder
    which is gone, or that cannot be read (then none). Ray refuses to start a run whose snapshot
    does ("corrupted run directory") or is not JSON; a run continued in local mode deletes the
    folders that fall out of its --keep-last, Ray's among them, and a driver killed while Ray
    rewrites the snapshot leaves it cut short. The pointer is the run's record of its checkpoints (Ray's
    restarts take it when Ray has none: `RayStorage.latest`), so Ray's goes."""
    import json

    from mtl.storage import read_bytes, storage_errors, url_to_fs

    snapshot = f"{url.rstrip('/')}/{RAY_SNAPSHOT}"
    raw = read_bytes(snapshot)
    try:
        named = {name.rstrip("/").rsplit("/", 1)[-1] for name in _dir_names(json.loads(raw) if raw else {})}
    except ValueError:  # (truncated: its driver was killed while Ray rewrote it)
        why = "it cannot be read (cut short: its driver died while Ray wrote it)"
    else:
        gone = sorted(named - set(folders))
        if not gone:
            return named
        why = (f"it names checkpoint folder(s) {', '.join(gone)}, which are gone (a run continued outside Ray deletes the "
               f"folders that fall out of its --keep-last)")
    with storage_errors(snapshot):
        fs, path = url_to_fs(snapshot)
        fs.rm(path)
    log(f"deleted Ray's checkpoint record {snapshot}: {why}; the run goes on from {url.rstrip('/')}/{CHECKPOINTS}/{POINTER}")
    return set()


def _dir_names(node: Any) -> Iterator[str]:
    """Every ``checkpoint_dir_name`` in Ray's snapshot, wherever it sits."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "checkpoint_dir_name" and isinstance(v, str):
                yield v
            else:
                yield from _dir_names(v)
    elif isinstance(node, list):
        for v in node:
            yield from _dir_names(v)


def check_worker_paths(cfg: ExperimentConfig) -> None:
    """ValueError naming a relative local path among the inputs the workers read (--root,
    --shards, --pretrained): Ray Train runs every worker in a folder of its own, where it means
    nothing. Run folders (--out, --baselines) are made absolute from the driver's folder
    (`mtl.runs`), except in a job started by `ray job submit`: its folder is a temporary copy of
    --working-dir (gone with the job, and never the data's or the runs' place: shipping leaves
    them out), so there a relative one is refused too."""
    def relative(path: str) -> bool:
        return "://" not in path and not os.path.isabs(path)

    for flag, path in (("--root", cfg.data.root), ("--shards", cfg.data.shards), ("--pretrained", cfg.model.pretrained)):
        if path and path != IMAGENET and relative(path):
            raise ValueError(f"{flag} {path} is a relative path, which the Ray workers cannot resolve (each runs in a "
                             f"folder of its own): give an absolute path that every node can read, or a URL such as s3://…")
    if SUBMITTED_JOB_ENV not in os.environ:
        return
    for flag, path in (("--out", cfg.train.out), *(("--baselines", b) for b in cfg.train.baselines)):
        if relative(path):
            raise ValueError(f"{flag} {path} is a relative path: a job started by `ray job submit` runs in a temporary copy "
                             f"of its working dir, gone with the job: give a URL such as s3://… (or an absolute path that "
                             f"every node shares)")


def _worker_device():
    """This worker's device; a worker Ray gave GPUs to must see them (a CPU-only torch build or
    a missing driver on a GPU node would otherwise train on the CPU, unnoticed)."""
    import ray
    import ray.train.torch

    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    if gpus and not torch.cuda.is_available():
        raise ClusterError(f"Ray assigned GPU(s) {gpus} to this worker on node {ray.util.get_node_ip_address()}, but torch "
                           f"{torch.__version__} sees no CUDA device there: {NO_CUDA_HINT}")
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker entry point: rebuild the typed config, then the shared loop
    (returns a divergence: `fit_outcome`)."""
    import ray.train

    cfg = ExperimentConfig.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _worker_device()

    def make_strategy(module: nn.Module, optimizer: torch.optim.Optimizer, c: ExperimentConfig) -> Strategy:
        if c.dist.strategy == "deepspeed":
            from mtl.distributed.deepspeed_strategy import DeepSpeedStrategy

            return DeepSpeedStrategy(module, optimizer, c)
        if world > 1:
            return DDPStrategy(module, optimizer, device, c.train.grad_accum, c.optim.grad_clip, for_capture=may_capture(c))
        return PlainStrategy(module, optimizer, c.train.grad_accum, c.optim.grad_clip)

    storage = RayStorage(run_url(cfg), cfg.train.keep_last, tuple(loop_config.get("outside_ray", ())))
    rt = Runtime(rank=rank, world=world, device=device, make_strategy=make_strategy,
                 storage=storage, preemption=ray.train.get_preemption_info,
                 always_resume=True, cpus=int(cfg.dist.cpus_per_worker), track_mlflow=loop_config.get("track_mlflow", True))
    return fit_outcome(cfg, rt)


DIVERGED = "diverged"  # in a Train run's return value: the divergence's message


def fit_outcome(cfg: ExperimentConfig, rt: Runtime) -> dict[str, Any] | None:
    """Train this rank; a divergence (`mtl.engine.TrainingDiverged`) is returned, not raised:
    ``{"diverged": message, "epoch": the epoch it diverged in (from 1; 0 when unknown)}``. It is an
    outcome of the settings (a too high LR) that a restart from the last checkpoint would only
    repeat, and Ray Train restarts every worker error (--max-failures), then Tune the trial
    again. Every rank raises it at the same step (the engine checks a loss all ranks share), so
    every rank returns and the run ends normally; rank 0's value is the Result's
    ``return_value``, which the caller judges (`diverged`): a training run fails with it, a
    sweep's trial ends as diverged."""
    try:
        fit(cfg, rt)
    except TrainingDiverged as e:
        return {DIVERGED: str(e), "epoch": e.epoch}
    return None


def diverged(result) -> dict[str, Any] | None:  # noqa: ANN001 - a Ray Train Result
    """The divergence a Train run ended with (`fit_outcome`), or None."""
    value = getattr(result, "return_value", None)
    return value if isinstance(value, dict) and DIVERGED in value else None


def make_trainer(cfg: ExperimentConfig, bundle: dict[str, float], callbacks: list | None = None, track_mlflow: bool = True,
                 outside_ray: list[str] | None = None):
    """The TorchTrainer for this (resolved) config: ``dist.num_workers`` workers of ``bundle``
    (`mtl.distributed.capacity.worker_bundle`; elastic between ``dist.min_workers`` and that),
    checkpoints in ``<train.out>/<run name>``, failures survived up to ``dist.max_failures``.
    ``track_mlflow``: rank 0 logs to MLflow itself (False: the caller does, a sweep's callback).
    ``outside_ray``: the run folder's checkpoints Ray never registered (`prepare_run_folder`).

    Sets the worker-group start timeout (``dist.start_timeout``) in this process's environment:
    ``fit`` hands Ray Train's variables from the calling process's environment to its controller,
    and a sweep's trials call it in actors of their own, where the driver's environment is not."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    d = cfg.dist
    os.environ[START_TIMEOUT_ENV] = str(d.start_timeout)  # (an unplaceable group then fails instead of hanging)
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}  # (a trial actor's: `_job_env` gave it them)
    return _trainer_class()(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "track_mlflow": track_mlflow, "outside_ray": list(outside_ray or [])},
        scaling_config=ScalingConfig(num_workers=(d.min_workers, d.num_workers) if d.min_workers else d.num_workers,
                                     use_gpu="GPU" in bundle, resources_per_worker=bundle,
                                     elastic_resize_monitor_interval_s=d.resize_interval_s),
        run_config=RunConfig(
            name=run_name(cfg), storage_path=out_root(cfg.train.out),
            # elastic: a restart right after a node loss may aim at a node Ray has not yet declared
            # dead and time out placing it (--start-timeout-s); it then retries with what is there
            failure_config=FailureConfig(max_failures=d.max_failures,
                                         controller_failure_limit=_controller_failures(d)),
            checkpoint_config=CheckpointConfig(num_to_keep=ray_keeps(cfg.train.keep_last)),
            worker_runtime_env={"env_vars": env},
            callbacks=callbacks,
        ),
    )


def ray_keeps(keep_last: int) -> int | None:
    """The checkpoints Ray keeps for --keep-last (0: all, None to Ray): at least 2, since Ray
    deletes the one before as it registers a foreground checkpoint's report, while latest.json
    still names that one until rank 0 commits the new one. The pointer's history lists as many
    (`RayStorage.commit`): the way past a corrupt latest names the one Ray still has."""
    return max(2, keep_last) if keep_last else None


def _trainer_class():
    """Ray's TorchTrainer, noting a Ctrl-C. On the main thread, Train V2's ``fit`` installs a SIGINT
    handler of its own that aborts the run and ends the process with ``sys.exit`` (status 0 or
    1, never a KeyboardInterrupt), and leaves it installed after ``fit``; `_fit` turns what
    follows a noted Ctrl-C into a KeyboardInterrupt (`jobs/train.py`: exit 130, "--resume
    continues") and puts the previous handler back."""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        interrupted = False

        def _register_sigint_handler(self, controller) -> None:  # noqa: ANN001 - Ray's controller handle
            super()._register_sigint_handler(controller)
            abort = signal.getsignal(signal.SIGINT)

            def on_sigint(signum, frame) -> None:  # noqa: ANN001
                self.interrupted = True
                abort(signum, frame)  # (Ray's graceful abort of the worker group)

            signal.signal(signal.SIGINT, on_sigint)

    return Trainer


def _fit(trainer):  # noqa: ANN001, ANN202 - a `_trainer_class` trainer; Ray's Result
    """``trainer.fit()``; a Ctrl-C meanwhile (Ray aborted the run) raises KeyboardInterrupt.

    SIGTERM (``ray job stop``, which sends SIGKILL 3 s later; a pod's or container's end) raises
    `Stopped`: the driver ends at once, its workers with it, and `jobs/train.py` says that
    ``--resume`` continues from the latest checkpoint (exit 143), instead of Ray's handler dumping
    the driver's stack. No checkpoint is taken: ``ray job stop`` leaves no time for one (a local
    run's SIGTERM checkpoints the step it is at; on Ray a spot notice does). What the handler
    raises inside a wait on Ray comes out as a bare KeyboardInterrupt, hence the flag."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    terminated = threading.Event()

    def on_sigterm(signum: int, frame: object) -> None:
        terminated.set()
        raise Stopped(None)

    before = signal.signal(signal.SIGTERM, on_sigterm) if main else None
    try:
        result = trainer.fit()
    except BaseException as e:  # (Ray's handler ends with SystemExit; the abort may surface as an actor error)
        if terminated.is_set():
            raise Stopped(None) from e
        if getattr(trainer, "interrupted", False):  # (a trainer of `_trainer_class`; a stand-in has none)
            raise KeyboardInterrupt("interrupted (Ctrl-C): Ray aborted the training run") from e
        raise
    finally:
        if main and previous is not None:  # (None: a handler not set from Python, which cannot be put back)
            signal.signal(signal.SIGINT, previous)
        if main:  # (Ray's own, set from C++, cannot be put back: the default ends the process as it did)
            signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)
    return result  # (a Ctrl-C once the run had ended: Ray's abort did nothing, the run is whole)


def _controller_failures(d) -> int:
    """Failures to place the worker group tolerated (Ray's ``controller_failure_limit``): one for a
    fixed size (a group that cannot be placed in ``--start-timeout-s`` fails the run, rather than
    wait again and again for nodes that do not come); for elastic runs as many as worker failures
    (-1: no limit), since a restart right after a node's loss may time out aiming at the lost node."""
    if not d.min_workers:
        return 1
    return -1 if d.max_failures == -1 else max(1, d.max_failures)


def connect(cfg: ExperimentConfig) -> bool:
    """Join the cluster (``dist.address``, $RAY_ADDRESS, a submitted job's) or start a local
    one; True when it joined an existing cluster."""
    import ray

    address = cluster_address(cfg.dist.address)
    joined = address is not None or ray.is_initialized()
    if not ray.is_initialized():
        ray.init(address=address or "local", log_to_driver=True, **_job_env(address))
    return joined


def _job_env(address: str | None) -> dict:
    """A driver that joins a running cluster from a shell (``--address``, $RAY_ADDRESS, not `ray
    job submit`) gives its job the environment the workers need (`FORWARD_ENV`): the actors it
    starts (a sweep's trials, which build their Train runs there) run in the nodes' environment,
    not the driver's, and would miss e.g. AWS_ENDPOINT_URL. A submitted job has its own
    (``--runtime-env``); a cluster this driver starts inherits its environment."""
    if address is None or SUBMITTED_JOB_ENV in os.environ:
        return {}
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    return {"runtime_env": {"env_vars": env}} if env else {}


def plan(cfg: ExperimentConfig, joined: bool) -> WorkerPlan:
    """GPU or CPU workers, and whether the cluster can ever hold them (`mtl.distributed.capacity`)."""
    d = cfg.dist
    return plan_workers(d.min_workers or d.num_workers, d.cpus_per_worker, d.gpus_per_worker, d.use_gpu, joined, read_capacity(),
                        d.start_timeout)


def run_ray(cfg: ExperimentConfig, log=print):
    """Train on the Ray cluster; returns Ray's Result and the resolved config. Raises
    `InfeasibleCluster` at once when the cluster can never hold the workers, `RunConflict` when
    the run folder does not allow the run (see `mtl.runs`), `ClusterError` when the worker group
    was not placed within ``dist.start_timeout`` or failed to start, `TrainingDiverged` when
    training diverged (once: not restarted, `fit_outcome`)."""
    import ray

    check_worker_paths(cfg)  # (before Ray starts)
    joined = connect(cfg)
    workers = plan(cfg, joined)
    why = ("as --use-gpu/--no-use-gpu says" if cfg.dist.use_gpu is not None else
           "the default on a cluster this run joins; --no-use-gpu trains on CPUs" if joined else
           "the default on a Ray instance started by this run: the GPUs of this machine")
    log(f"training workers on {'GPUs' if workers.use_gpu else 'CPUs'} ({why}); {workers.note}")
    # (resolved: config.json says what the run does)
    dist = dataclasses.replace(cfg.dist, use_gpu=workers.use_gpu, start_timeout_s=cfg.dist.start_timeout)
    cfg = prepare_run(dataclasses.replace(cfg, dist=dist), log)
    log(JSON(cfg.to_json()))
    trainer = make_trainer(cfg, workers.bundle, outside_ray=prepare_run_folder(run_url(cfg), log))
    try:
        result = _fit(trainer)
    except ray.train.ControllerError as e:
        raise ClusterError(_controller_failure_message(e.controller_failure, cfg, workers)) from e
    except ray.train.WorkerGroupError as e:  # (Train V2 raises what a worker raised, after --max-failures restarts)
        rank = first_cause(e.worker_failures)
        raise WorkerFailed(rank, e.worker_failures.get(rank, e)) from e
    found = diverged(result)
    if found:  # (returned by the workers, not raised: Ray would have restarted them --max-failures times)
        raise TrainingDiverged(found[DIVERGED], found["epoch"])
    return result, cfg


def first_cause(failures: dict[int, BaseException]) -> int:
    """The rank whose error says what went wrong: the lowest, but not one that only reports
    another rank's failed CUDA-graph capture (its own log, unlike rank 0's, is not shown)."""
    return min(failures, key=lambda r: (OTHER_RANK_FAILED in str(failures[r]), r)) if failures else 0


def _controller_failure_message(failure: Exception, cfg: ExperimentConfig, workers: WorkerPlan) -> str:
    """A worker group that never started: placement timed out, or its setup failed on the nodes."""
    import ray
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    if isinstance(failure, WorkerGroupStartupTimeoutError):
        have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        return (f"could not place {cfg.dist.num_workers} training worker(s) x {workers.bundle} within "
                f"{cfg.dist.start_timeout:g}s (--start-timeout-s); the cluster has {have} now. Other jobs may hold "
                f"the resources, or nodes did not come up.")
    last = [ln.strip() for ln in str(failure).splitlines() if ln.strip()][-1:] or [type(failure).__name__]
    hint = f" The workers were given GPUs, but torch sees none on their node: {NO_CUDA_HINT}" if workers.use_gpu and "GPU" in last[0] else ""
    return f"the training workers failed to start: {last[0]}.{hint}"
