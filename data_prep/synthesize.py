"""Write a synthetic Miniscapes data set (`mtl.data.synthetic`: how the scenes are made).

    python -m data_prep.synthesize --out DIR --train 200 --val 40 --test 40 --size 256x512
"""

from __future__ import annotations

import argparse
import sys
import time

from mtl.config import size_arg
from mtl.data.synthetic import render_scene, synthesize  # noqa: F401 - this tool's library, re-exported

__all__ = ["main", "render_scene", "synthesize"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--train", type=int, default=200)
    p.add_argument("--val", type=int, default=40)
    p.add_argument("--test", type=int, default=40)
    p.add_argument("--size", type=size_arg, default=(256, 512), help="HxW, default 256x512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    counts = {"train": a.train, "val": a.val, "test": a.test}
    try:
        out = synthesize(a.out, counts, a.size, a.seed, a.workers, a.overwrite, progress=sys.stderr.isatty())
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(counts.values())
    dt = time.perf_counter() - t0
    print(f"wrote {n} samples ({a.size[0]}x{a.size[1]}) to {out} in {dt:.1f}s ({n / dt:.0f} samples/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
