"""Train a multi-task model.

Local debug mode (one process, GPU if present, else CPU; no cluster):
    python jobs/train.py --local --arch distillation
On a Ray cluster (see README "Running on a cluster"):
    ray job submit -- python jobs/train.py --arch distillation --num-workers 4
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from a checkout

from mtl.config import add_config_args, config_from_args  # noqa: E402


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, "object"]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", action="store_true", help="single-process debug mode, no Ray")
    add_config_args(p)
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        p.error(str(e))
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(argv)
    if not args.local:
        return run_on_ray(cfg)
    from mtl.engine import fit, local_runtime

    rt = local_runtime(cfg)
    rt.log(cfg.to_json())
    try:
        result = fit(cfg, rt)
    except (FileNotFoundError, ValueError) as e:  # bad data, flags or checkpoints: say which, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not result.metrics:
        rt.log(f"nothing to train: the run had already finished all {cfg.train.epochs} epochs (raise --epochs to continue)")
        return 0
    last = result.metrics[-1]
    rt.log(f"done: mIoU {last['miou']:.2f}  SI-logRMSE {last['si_log_rmse']:.2f}  grader {last['grader']:.2f} "
           f"(best {result.best_grader:.2f}); run folder {cfg.train.out.rstrip('/')}/{cfg.run_name()}")
    return 0


def run_on_ray(cfg) -> int:
    import json

    from mtl.checkpoint import write_bytes_atomic
    from mtl.distributed.ray_train import run_ray, run_url
    from mtl.progress import wide_console

    console = wide_console()
    console.print(cfg.to_json())
    try:
        result = run_ray(cfg)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.error:
        print(f"error: training failed: {result.error}", file=sys.stderr)
        return 1
    url = run_url(cfg)
    summary = {"run": url, "final_metrics": result.metrics, "latest_checkpoint": result.checkpoint.path if result.checkpoint else None,
               "best_model": f"{url}/best.pt", "final_model": f"{url}/final.pt"}
    write_bytes_atomic(f"{url}/summary.json", json.dumps(summary, indent=1, default=str).encode())
    m = result.metrics or {}
    console.print(f"done: mIoU {m.get('miou', float('nan')):.2f}  SI-logRMSE {m.get('si_log_rmse', float('nan')):.2f}  "
                  f"grader {m.get('grader', float('nan')):.2f}; run {url} (best.pt, final.pt, summary.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
