"""Hyperparameter sweeps with Ray Tune + ASHA; every trial is a full Ray Train run.

    ray job submit -- python jobs/tune.py --arch branched --num-samples 32 --epochs 16 \
        --lr-min 1e-5 --lr-max 1e-3 --out s3://bucket/sweeps --sweep-name branched-lr-w
    python jobs/tune.py ... --sweep-name branched-lr-w --resume      # continue after the driver died

The search space: LR log-uniform in [--lr-min, --lr-max], --optimizers, segmentation weight w
uniform in [--semseg-weight-min, --semseg-weight-max] (depth gets 1 - w), zoom --scale-max-choices,
--hflip-choices, --batch-sizes. Every other flag is the training config shared by all trials
(--num-workers etc. size each trial). Results: a leaderboard in the terminal and results.{md,tex,csv}
plus scores.png in <out>/<sweep-name>/.
"""

from __future__ import annotations

import argparse
import sys

from mtl.config import add_config_args, add_leaf_args, config_from_args, leaf_from_args


def main(argv: list[str] | None = None) -> int:
    from mtl.distributed.tune import SweepConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_leaf_args(p.add_argument_group("sweep"), SweepConfig)
    add_config_args(p)
    args = p.parse_args(argv)
    try:
        base = config_from_args(args)
        sweep = leaf_from_args(args, SweepConfig).validate()
    except ValueError as e:
        p.error(str(e))  # bad search space: stop before any trial starts

    from mtl.distributed.tune import leaderboard_table, rows_from_results, run_sweep, write_reports
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
    out = f"{out_root(base.train.out)}/{sweep.sweep_name}"
    paths = write_reports(rows, out, title)
    console.print("reports: " + ", ".join(paths.values()))
    if rows and rows[0].best_model:
        console.print(f"best trial: {rows[0].name} (grader {rows[0].grader:.2f}); checkpoint {rows[0].best_model}")
        console.print(f"export it: python jobs/evaluate.py --checkpoint {rows[0].best_model} --split test --export <dir>")
    errored = [r for r in rows if r.status == "error"]
    return 1 if errored and len(errored) == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
