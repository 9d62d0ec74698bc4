r"""Hyperparameter sweeps with Ray Tune (ASHA or population-based training); every trial is a
full Ray Train run.

    ray job submit --working-dir . -- python jobs/tune.py --arch branched --num-samples 32 --epochs 16 \
        --space lr=loguniform:1e-5:1e-3 --space task_weighting=choice:fixed,uncertainty,dwa,famo \
        --shards s3://bucket/miniscapes-shards --cpus-per-worker 10 --out s3://bucket/sweeps --sweep-name branched-lr-tw
    ray job submit --working-dir . -- python jobs/tune.py ... --sweep-name branched-lr-tw --resume   # the same command plus
        --resume: after the driver died, or to retry failed trials

The search space: one --space per swept config field, FIELD=loguniform:LOW:HIGH,
FIELD=uniform:LOW:HIGH or FIELD=choice:A,B,... (a field by its name or path: lr, optim.lr, or
its flag inside the same argument: --space=--lr=loguniform:1e-5:1e-3, as a separate argument
starting with -- is taken for a flag; tuple values joined with +, sizes as HxW). Values are read
with the field's type and checked against the config's rules before Ray starts.

Fixed and swept: every other flag is the training config every trial shares (--num-workers etc.
size each trial; --config FILE starts from a saved one). A flag given for a field that --space
sweeps is an error naming both. Without --space the sweep varies lr (log-uniform 1e-5..1e-3),
semseg_weight (uniform 0.3..0.7; not when the trials train one task, whose loss weight is 1),
scale_max (1.0, 1.25, 1.5) and hflip, less any of them whose flag is given: --lr 3e-4 fixes lr
for every trial and sweeps the other three (the sweep says so).
Values from a --config file are a starting point, not flags: the space overrides them. Random
draws are seeded (--search-seed). --resume takes the command that started the sweep: another
space, objective, number or draw of trials, or training setting (--workers, --cpus-per-worker and the
like included) is refused. It continues the unfinished trials and the failed ones, each under its
own name in its own run folder, from its last checkpoint; finished trials stay as they are.
Without --resume, a --sweep-name already holding a sweep is refused (one whose start failed
before Tune began is started anew, and the log says so).

Objective: --metric grader (mIoU - SI-logRMSE, the default), score (the run's selection score:
the grader, or a single-task run's own metric) or delta_m (Δm in percent against the single-task
runs given by --baselines, minimised). --baselines is the training flag: every trial then
reports Δm each epoch, its score is -Δm (so --metric score ranks as delta_m does) and its best.pt
is its lowest-Δm epoch; every report has a delta_m column.

Scheduler: --scheduler asha (default) stops weak trials early, judging each at a rung (every
--grace-period x --reduction-factor^k epochs) by its score at that epoch, also after --resume
(Tune saves no scheduler state: the rungs are filled again from the trials' run folders);
--scheduler pbt perturbs every
--perturbation-interval epochs: a trial in the bottom --quantile-fraction continues from the
latest checkpoint of one in the top fraction with that trial's values perturbed (x0.8/x1.2 or
redrawn, clipped to the range; a choice moves to a neighbour). PBT changes lr, semseg_weight,
grad_clip, scale_min, scale_max, hflip and augment only: other swept fields (the encoder, the
batch size...) cannot change in the middle of a trial, and PBT refuses them. PBT's population is
the trials that run at once: --num-samples larger than that, or a cluster (or --max-concurrent)
that runs only one trial at once, is refused with the numbers. After --resume it goes on
perturbing at multiples of --perturbation-interval.

Trials at once: as many as the cluster holds (its GPUs, once its autoscaler has added what its
config allows), or --max-concurrent. With MLFLOW_TRACKING_URI set, every trial is an MLflow run
of the experiment named after the sweep (pip install mlflow). Results: a leaderboard in the
terminal and results.{md,tex,csv} plus scores.png in <out>/<sweep-name>/; after --resume too, they
judge every trial by all the epochs it trained, read from its run folders (Tune keeps only the
results it had saved, and those it received since).

Outcomes: a trial whose training diverges (its loss or weights stop being numbers) ends there,
not retried, as "diverged"; the sweep goes on. Exit status 1 when a trial failed, or when the
sweep was interrupted (Ctrl-C) before every trial ended ("unfinished": --resume continues it).
Every trial's run is named after the trial: --name is refused (the sweep's is --sweep-name).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Annotated, Any

import tyro

from mtl.cli import SWEEP_CONFIG_HELP, FlatExperiment, idle_flags_given, parse_experiment
from mtl.config import ExperimentConfig
from mtl.distributed.sweep_space import SweepConfig, check_scheduler_flags, explicit_fields, method_variants, plan_sweep


@dataclass(frozen=True)
class TuneCommand:
    experiment: FlatExperiment = field(default_factory=ExperimentConfig)
    sweep: Annotated[SweepConfig, tyro.conf.arg(name="")] = field(default_factory=SweepConfig)
    config: Annotated[str | None, tyro.conf.arg(help=SWEEP_CONFIG_HELP)] = None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    planned: dict[str, Any] = {}

    def check(cmd: TuneCommand) -> None:
        """A bad sweep stops before Ray or any trial starts."""
        from mtl.machine import check_ray
        from mtl.runs import absolute_paths

        check_ray("a sweep")
        check_scheduler_flags(cmd.sweep, argv)
        planned["base"] = absolute_paths(cmd.experiment)  # (trials run in folders of their own)
        planned["spec"] = plan_sweep(cmd.sweep, planned["base"], explicit_fields(argv))
        idle = [idle_flags_given(v, argv, "any trial") for v in method_variants(planned["spec"].space, cmd.experiment)]
        if all(idle):  # (every trial would ignore it)
            raise ValueError(idle[0])
        if os.environ.get("MLFLOW_TRACKING_URI"):  # set, but mlflow is missing: an error now
            from mtl.tracking import mlflow_tracking_uri

            mlflow_tracking_uri()

    cmd = parse_experiment(TuneCommand, argv, description=__doc__, check=check)
    base, sweep, spec = planned["base"], cmd.sweep, planned["spec"]

    from mtl.errors import USER_ERRORS, one_line

    try:
        check_before_ray(cmd.experiment, base, spec)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2

    from mtl.distributed.tune import check_new, check_resume, run_sweep, sweep_url
    from mtl.lease import hold
    from mtl.progress import wide_console

    console = wide_console()
    for note in spec.notes:
        console.print(note)
    console.print("sweeping " + "; ".join(d.text for d in spec.space))
    try:
        with hold(sweep_url(base, sweep), "sweep", lambda line: console.print(line, markup=False)):  # (one driver per sweep)
            if base.train.resume:
                check_resume(base, sweep, spec)
            else:
                note = check_new(base, sweep)
                if note:
                    console.print(note)
            results = run_sweep(base, sweep, spec, resume=base.train.resume)
            return report(results, base, sweep, spec, console)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def check_before_ray(given: ExperimentConfig, base: ExperimentConfig, spec) -> None:  # noqa: ANN001 - a SweepSpec
    """What every trial would find wrong inside Tune, named before Ray starts: a path the workers
    cannot resolve (the flags ``given``, and each a trial may draw), a crop no zoom fills, and
    --baselines that are no runs or were validated on other data than a trial's."""
    from mtl.distributed.ray_train import check_worker_paths
    from mtl.multitask import load_baselines

    check_worker_paths(given)  # (the flags as given: base has --baselines made absolute)
    check_sweep_out(base)
    for d in spec.space:  # (--space root=choice:/a,/b)
        for v in d.values:
            try:
                check_worker_paths(given.with_values({d.path: v}))
            except ValueError as e:
                raise ValueError(f"--space {d.text}: {e}") from None
    places = data_places(base, spec.space)
    check_data_here(places)
    if base.train.resume:  # (what started the sweep was checked then; its trials' runs hold their crops and baselines)
        return
    check_crops_here(base, spec.space)
    if spec.baselines:
        for cfg in places:
            load_baselines(spec.baselines, cfg.data)


def data_places(base: ExperimentConfig, space) -> list[ExperimentConfig]:  # noqa: ANN001 - the sweep's dimensions
    """The base with each data value a trial may draw (--space root=choice:/a,/b), or the base."""
    data = ("data.root", "data.shards", "data.synthetic_size", "data.synthetic_counts")
    return [base.with_values({d.path: v}) for d in space if d.path in data for v in d.values] or [base]


def check_data_here(places: list[ExperimentConfig]) -> None:
    """Each folder or shard set a trial may train on opens here (its training split found, its
    files paired): else every trial would fail on it inside Tune, and be retried."""
    from mtl.data.build import open_split, resolve_source

    for cfg in places:
        if cfg.data.root or cfg.data.shards:
            open_split(resolve_source(cfg), "train")


def check_sweep_out(base: ExperimentConfig) -> None:
    """A trial's config.json given as --config carries its --out, the trials folder of its own
    sweep: a sweep there would live among that sweep's trials (and its reports beside theirs)."""
    from mtl.distributed.tune import SWEEP_FILE, TRIALS_DIR
    from mtl.runs import out_root
    from mtl.storage import exists

    out = out_root(base.train.out).rstrip("/")
    parent, _, leaf = out.rpartition("/")
    if leaf == TRIALS_DIR and parent and exists(f"{parent}/{SWEEP_FILE}"):
        raise ValueError(f"--out {out} is the trials folder of the sweep at {parent} (a trial's config.json as --config "
                         f"names it): give the new sweep's --out, e.g. --out {parent.rpartition('/')[0]}")


def check_crops_here(base: ExperimentConfig, space) -> None:  # noqa: ANN001 - the sweep's dimensions
    """A crop a trial may draw that no zoom of the data's images fills fails that trial inside
    Tune (`mtl.data.build.crop_note`): checked here against the validation images' size (the
    synthetic set's from its flag; not when the data itself is swept)."""
    from mtl.distributed.sweep_space import CROP_FIELDS, check_crops

    swept = {d.path for d in space}
    if not (base.data.crop is not None or "data.crop" in swept) or swept & {"data.root", "data.shards", "data.synthetic_size"}:
        return
    if base.data.root or base.data.shards:
        from mtl.data.build import open_split, resolve_source

        size = open_split(resolve_source(base), "val").image_size()
    else:
        size = base.data.synthetic_size
    check_crops([d for d in space if d.path in CROP_FIELDS], base, size)


def report(results, base: ExperimentConfig, sweep: SweepConfig, spec, console) -> int:  # noqa: ANN001 - Tune's ResultGrid
    """The leaderboard (terminal, and the sweep folder's reports); the exit status (`outcome`)."""
    from mtl.distributed.sweep_report import SweepReport
    from mtl.distributed.tune import sweep_url

    sweep_report = SweepReport(spec, base.optim.tasks)
    rows = sweep_report.rows(results, base.train.epochs)
    how = f"PBT every {spec.perturbation_interval} epochs" if spec.pbt else "ASHA"
    title = f"sweep {sweep.sweep_name}: {base.model.arch}, {len(rows)} trials, {how} over {base.train.epochs} epochs, {spec.metric}"
    console.print(sweep_report.table(rows, title))
    paths = sweep_report.write(rows, sweep_url(base, sweep), title)
    console.print("reports: " + ", ".join(paths.values()))
    if rows and rows[0].best_model:
        console.print(f"best trial: {rows[0].name} ({spec.metric} {rows[0].objective:.2f}); checkpoint {rows[0].best_model}")
        console.print(f"export it: python jobs/evaluate.py --checkpoint {rows[0].best_model} --split test --export <dir>")
    return outcome([r.name for r in rows if r.status == "diverged"], [r for r in rows if r.status == "error"],
                   [r.name for r in rows if r.status == "unfinished"], len(rows), console)


def outcome(diverged: list[str], errored: list, unfinished: list[str], trials: int, console) -> int:  # noqa: ANN001
    """The exit status, with a line for each kind of trial that did not end well: 1 when a trial
    failed or the sweep was interrupted before every trial ended (the report holds the others; a
    pipeline must not take the sweep for a whole one). A diverged trial is a result of the sweep
    (its values train badly), not a failure: a note."""
    if diverged:
        console.print(f"{len(diverged)} of {trials} trials diverged ({', '.join(diverged)}): their loss or weights stopped "
                      f"being numbers (the values they drew train badly); they ended there, not retried")
    if errored:
        print(f"error: {len(errored)} of {trials} trials failed ({', '.join(r.name for r in errored)}): their logs are in the "
              f"trials' run folders; the same command with --resume continues them, each in its own run folder from its last "
              f"checkpoint (once: Tune keeps their failure counts)",
              file=sys.stderr)
        for r in errored:  # (a trial that failed before training, e.g. on its data, has no train.log)
            print(f"  {r.name}: {r.error or 'no error recorded'}", file=sys.stderr)
    if unfinished:
        print(f"error: the sweep was interrupted: {len(unfinished)} of {trials} trials are unfinished ({', '.join(unfinished)}); "
              f"the same command with --resume continues it", file=sys.stderr)
    return 1 if errored or unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
