"""Test predictions in the submission format, plus side-by-side visualisations.

``<out>/semseg/<stem>.png``: palette PNG of class ids; ``<out>/depth/<stem>.png``: uint8
disparity PNG (the dataset encoding's inverse); ``<out>/viz/<stem>.png`` for people (the
sample's file stem: Miniscapes' ``<index>``). The same
writer serves `mtl.predict` (arbitrary images, named by file stem). A single-task run's model
(``--tasks semseg``) writes its own task's folder only: the other head was never trained.
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from mtl.atomic import atomic_dir
from mtl.data.batch import to_model_batch
from mtl.data.miniscapes import encode_depth_png, encode_semseg_png
from mtl.data.packed import pack_collate
from mtl.engine import predict
from mtl.losses import DepthCodec
from mtl.multitask import TASKS, trained_only
from mtl.viz import colorize_depth, colorize_semseg, denormalize_rgb, side_by_side

OUTPUT_FOLDERS = ("semseg", "depth", "viz")  # every folder an export may write (`output_folders`: a model's own)


def export_predictions(model: nn.Module, dataset: Dataset | IterableDataset, out_dir: str, codec: DepthCodec,
                       device: torch.device, amp: contextlib.AbstractContextManager, batch_size: int = 8, viz: int = 8,
                       overwrite: bool = False, inputs: Sequence[str] = (), tasks: Sequence[str] = TASKS) -> int:
    """Write predictions of the trained ``tasks`` for every sample of ``dataset`` (a map-style
    folder split or a shard stream, with or without labels); returns the count. Pictures show
    the ground truth where the split has it.

    Files go to a temporary sibling folder first, renamed into place when complete: an error
    half-way (a corrupt image) leaves no folder that looks like a finished export; an ``out_dir``
    holding one of the ``inputs`` (the data's folder) is refused (`mtl.atomic.output_dir`).
    """
    if getattr(dataset, "augment", None) is not None:
        raise ValueError("export needs the samples as they are: open the split without augmentation")
    model.eval()
    n = 0
    with atomic_dir(out_dir, overwrite, inputs, OUTPUT_FOLDERS) as tmp:
        make_output_folders(tmp, tasks, viz > 0)
        # (pack_collate, as the loaders: a batch of images of several sizes is an error naming them)
        for raw in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=pack_collate):
            batch = to_model_batch(raw, device, channels_last=False)
            labels, depth_m = predict(model, batch["rgb"], codec, amp)
            for j in range(labels.shape[0]):
                rgb = denormalize_rgb(batch["rgb"][j].float().cpu().numpy()) if n < viz else None
                gt = None
                if rgb is not None and "semseg" in batch:
                    gt = tuple(batch[k][j].cpu().numpy() for k in ("semseg", "depth", "valid"))
                pred = trained_only(labels[j].cpu().numpy(), depth_m[j].float().cpu().numpy(), tasks)
                write_prediction(tmp, stem_of(dataset, int(batch["index"][j])), *pred, rgb, gt)
                n += 1
    return n


def stem_of(dataset: Dataset | IterableDataset, index: int) -> str:
    """The name a sample's predictions get: its file stem (``<index>`` in Miniscapes) in a folder
    split, its key in a shard stream (which records the keys it decodes)."""
    stems = getattr(dataset, "stems", None)
    return stems[index] if stems else str(index)


def output_folders(tasks: Sequence[str] = TASKS, viz: bool = True) -> tuple[str, ...]:
    """The folders an export of a model trained on ``tasks`` writes (``viz``: pictures too)."""
    return (*(t for t in TASKS if t in tasks), *(("viz",) if viz else ()))


def listed_folders(tasks: Sequence[str], viz: int) -> str:
    """``output_folders`` as a command's closing line lists them: "semseg/, depth/; viz/ for the
    first 8" (of ``viz`` samples drawn)."""
    folders = ", ".join(f"{f}/" for f in output_folders(tasks, viz=False))
    return f"{folders}; viz/ for the first {viz}" if viz > 0 else folders


def single_task_note(tasks: Sequence[str]) -> str:
    """What a command's closing line adds for a single-task model's export."""
    if len(tasks) == len(TASKS):
        return ""
    other = next(t for t in TASKS if t not in tasks)
    return f"; no {other}/: the model was trained with --tasks {tasks[0]} only, its {other} head never learned"


def make_output_folders(folder: str, tasks: Sequence[str] = TASKS, viz: bool = True) -> None:
    for sub in output_folders(tasks, viz):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)


def write_prediction(folder: str, stem: str, labels: np.ndarray | None, depth_m: np.ndarray | None,
                     rgb: np.ndarray | None = None, gt: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
    """``folder/semseg/<stem>.png`` and ``folder/depth/<stem>.png`` (each unless its prediction is
    None: a task the model was not trained on); with ``rgb`` (HxWx3 uint8) also
    ``folder/viz/<stem>.png`` (`picture`; ``gt`` = (labels, depth m, valid) when known)."""
    if labels is not None:
        _write(os.path.join(folder, "semseg", f"{stem}.png"), encode_semseg_png(np.asarray(labels, np.uint8)))
    if depth_m is not None:
        try:
            depth_png = encode_depth_png(depth_m, np.ones(depth_m.shape, bool))
        except ValueError as e:  # (a diverged model's NaN: no export is published)
            raise ValueError(f"the depth predicted for {stem}: {e}") from None
        _write(os.path.join(folder, "depth", f"{stem}.png"), depth_png)
    if rgb is not None:
        Image.fromarray(picture(rgb, labels, depth_m, gt)).save(os.path.join(folder, "viz", f"{stem}.png"))


def picture(rgb: np.ndarray, labels: np.ndarray | None, depth_m: np.ndarray | None,
            gt: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """With ground truth: `mtl.viz.side_by_side` (rgb | GT | prediction, semseg over depth).
    Without (a test split, a user's photo): rgb | prediction, semseg over depth: black panels
    standing for labels nobody has would only waste a third of the picture. A task not
    predicted (None) has no row."""
    if gt is not None:
        return side_by_side(rgb, labels, depth_m, *gt)
    rows = ([[rgb, colorize_semseg(labels)]] if labels is not None else []) + \
           ([[rgb, colorize_depth(depth_m)]] if depth_m is not None else [])
    return np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
