"""Write a synthetic Miniscapes data set (`mtl.data.synthetic`: how the scenes are made).

    python -m data_prep.synthesize --out DIR --train 200 --val 40 --test 40 --size 256x512
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from mtl.cli import parse
from mtl.config import Size
from mtl.errors import no_space
from mtl.machine import check_workers
from mtl.storage import check_named
from mtl.data.synthetic import render_scene, synthesize  # noqa: F401 - this tool's library, re-exported

__all__ = ["main", "render_scene", "synthesize"]


@dataclass(frozen=True)
class SynthesizeCommand:
    out: str  # output folder (created)
    train: int = 200  # train samples
    val: int = 40  # val samples
    test: int = 40  # test samples
    size: Size = (256, 512)  # image size HxW
    seed: int = 0  # the same seed makes the same bytes
    workers: int | None = None  # processes; default (or 0): the CPUs this process may use, at most 8
    overwrite: bool = False  # replace a non-empty --out


def main(argv: list[str] | None = None) -> int:
    a = parse(SynthesizeCommand, argv, description=__doc__, check=lambda a: (check_named(a.out, "--out"), check_workers(a.workers)))
    t0 = time.perf_counter()
    counts = {"train": a.train, "val": a.val, "test": a.test}
    try:
        out = synthesize(a.out, counts, a.size, a.seed, a.workers, a.overwrite, progress=sys.stderr.isatty())
    except (ValueError, OSError) as e:  # OSError: --out cannot be written (FileExistsError among them)
        print(f"error: {no_space(e) or e}", file=sys.stderr)
        return 2
    n = sum(counts.values())
    dt = time.perf_counter() - t0
    print(f"wrote {n} samples ({a.size[0]}x{a.size[1]}) to {out} in {dt:.1f}s ({n / dt:.0f} samples/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
