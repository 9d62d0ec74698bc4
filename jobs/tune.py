r"""Hyperparameter sweeps with Ray Tune + ASHA; every trial is a full Ray Train run.

    ray job submit -- python jobs/tune.py --arch branched --num-samples 32 --epochs 16 \
        --lr-min 1e-5 --lr-max 1e-3 --out s3://bucket/sweeps --sweep-name branched-lr-w
    python jobs/tune.py ... --sweep-name branched-lr-w --resume      # continue after the driver died

The search space (mtl.distributed.sweep_space): LR log-uniform in [--lr-min, --lr-max], the
optimizers in --optimizers, segmentation weight w uniform in [--semseg-weight-min,
--semseg-weight-max] with depth getting 1 - w, zoom factors in --scale-max-choices, flips in
--hflip-choices, batch sizes in --batch-sizes. Every other flag is the training config shared
by all trials (--num-workers etc. size each trial; --config FILE starts from a saved one).
Results: a leaderboard in the terminal and results.{md,tex,csv} plus scores.png in
<out>/<sweep-name>/.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Annotated

import tyro

from mtl.cli import CONFIG_HELP, FlatExperiment, parse_experiment
from mtl.config import ExperimentConfig
from mtl.distributed.sweep_space import SweepConfig, check_space, space


@dataclass(frozen=True)
class TuneCommand:
    experiment: FlatExperiment = field(default_factory=ExperimentConfig)
    sweep: Annotated[SweepConfig, tyro.conf.arg(name="")] = field(default_factory=SweepConfig)
    config: Annotated[str | None, tyro.conf.arg(help=CONFIG_HELP)] = None


def _check_sweep(cmd: TuneCommand) -> None:
    """A bad search space stops the sweep before Ray or any trial starts."""
    check_space(space(cmd.sweep.validate()), cmd.experiment)


def main(argv: list[str] | None = None) -> int:
    cmd = parse_experiment(TuneCommand, argv, description=__doc__, check=_check_sweep)
    base, sweep = cmd.experiment, cmd.sweep

    from mtl.distributed.sweep_report import leaderboard_table, rows_from_results, write_reports
    from mtl.distributed.tune import run_sweep
    from mtl.errors import USER_ERRORS, one_line
    from mtl.progress import wide_console
    from mtl.runs import out_root

    console = wide_console()
    try:
        results = run_sweep(base, sweep, resume=base.train.resume)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    rows = rows_from_results(results, base.train.epochs)
    title = f"sweep {sweep.sweep_name}: {base.model.arch}, {len(rows)} trials, ASHA over {base.train.epochs} epochs"
    console.print(leaderboard_table(rows, title))
    paths = write_reports(rows, f"{out_root(base.train.out)}/{sweep.sweep_name}", title)
    console.print("reports: " + ", ".join(paths.values()))
    if rows and rows[0].best_model:
        console.print(f"best trial: {rows[0].name} (grader {rows[0].grader:.2f}); checkpoint {rows[0].best_model}")
        console.print(f"export it: python jobs/evaluate.py --checkpoint {rows[0].best_model} --split test --export <dir>")
    errored = [r for r in rows if r.status == "error"]
    return 1 if errored and len(errored) == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
