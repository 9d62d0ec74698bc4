"""Predict semantic segmentation and depth for your own RGB images (any size; jpg, jpeg, png).

    python jobs/predict.py --checkpoint runs/<run> --images photos/ --out out/photos
    python jobs/predict.py --checkpoint s3://b/runs/<run>/best.pt --images s3://b/photos --out out/p --size 256x512

Writes ``OUT/semseg/<stem>.png`` (palette PNG of the 19 Cityscapes class ids),
``OUT/depth/<stem>.png`` (uint8 disparity, the Miniscapes encoding) and, for the first
``--viz`` images, ``OUT/viz/<stem>.png`` (rgb | prediction); every output has its image's own
size. The network sees each image at the size it was trained at (recorded in the checkpoint;
``--size HxW`` for checkpoints that do not record it). OUT appears whole or not at all.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated

import tyro

from mtl.cli import parse
from mtl.config import Device


@dataclass(frozen=True)
class PredictCommand:
    checkpoint: str  # checkpoint file or run folder (local or s3://)
    images: str  # an image, or a folder of them (local or any fsspec URL)
    out: str  # local output folder (semseg/, depth/, viz/)
    size: Annotated[str | None, tyro.conf.arg(metavar="HxW")] = None  # network input size, for checkpoints that do not record it
    batch_size: int = 4  # images per forward pass
    device: Device = "auto"  # auto: the GPU if there is one
    viz: int = 8  # side-by-side pictures for the first N images
    overwrite: bool = False  # replace a non-empty --out


def main(argv: list[str] | None = None) -> int:
    a = parse(PredictCommand, argv, description=__doc__)
    from mtl.errors import USER_ERRORS, one_line

    try:
        return run(a)
    except USER_ERRORS as e:  # no images, an unreadable one, a bad flag or checkpoint: one line naming it
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def run(a: PredictCommand) -> int:
    from mtl.config import parse_size
    from mtl.engine import resolve_device
    from mtl.export import listed_folders, single_task_note
    from mtl.predict import find_images, load_model, model_input_size, predict_to_folder

    from mtl.storage import check_named

    check_named(a.out, "--out")
    if a.batch_size < 1 or a.viz < 0:
        raise ValueError(f"--batch-size must be at least 1 and --viz at least 0, got {a.batch_size} and {a.viz}")
    size = parse_size(a.size) if a.size else None  # read here: a bad one is a one-line error (rc 2) like the others
    images = find_images(a.images)  # before the checkpoint: a typo in --images fails fast
    model = load_model(a.checkpoint, resolve_device(a.device))
    hw = model_input_size(model, size)
    if size and size != hw:
        print(f"note: --size {a.size} ignored: the checkpoint was trained at {hw[0]}x{hw[1]}")
    n = predict_to_folder(model, images, a.out, hw, a.batch_size, viz=a.viz, overwrite=a.overwrite)
    tasks = model.cfg.optim.tasks
    print(f"wrote {n} predictions of {model.url} ({model.cfg.model.arch}, input size {hw[0]}x{hw[1]}) to {a.out} "
          f"({listed_folders(tasks, min(n, a.viz))}){single_task_note(tasks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
