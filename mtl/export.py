"""Test predictions in the submission format, plus side-by-side visualisations.

``<out>/semseg/<index>.png``: palette PNG of class ids; ``<out>/depth/<index>.png``: uint8
disparity PNG (the dataset encoding's inverse); ``<out>/viz/<index>.png`` for people.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtl.data.miniscapes import encode_depth_png, encode_semseg_png
from mtl.atomic import atomic_dir
from mtl.data.batch import to_model_batch
from mtl.engine import predict
from mtl.losses import DepthCodec
from mtl.viz import denormalize_rgb, side_by_side


def export_predictions(model: nn.Module, dataset: Dataset, out_dir: str, codec: DepthCodec, device: torch.device,
                       amp: contextlib.AbstractContextManager, batch_size: int = 8, viz: int = 8,
                       overwrite: bool = False) -> int:
    """Write predictions for every sample of ``dataset``; returns the count.

    Files go to a temporary sibling folder first, renamed into place when complete.
    """
    model.eval()
    n = 0
    with atomic_dir(out_dir, overwrite) as tmp:
        for sub in ("semseg", "depth", "viz"):
            os.makedirs(os.path.join(tmp, sub))
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
            batch = to_model_batch(batch, device, channels_last=False)
            labels, depth_m = predict(model, batch["rgb"], codec, amp)
            for j in range(labels.shape[0]):
                idx = int(batch["index"][j])
                lab, dep = labels[j].cpu().numpy().astype(np.uint8), depth_m[j].float().cpu().numpy()
                _write(os.path.join(tmp, "semseg", f"{idx}.png"), encode_semseg_png(lab))
                _write(os.path.join(tmp, "depth", f"{idx}.png"), encode_depth_png(dep, np.ones_like(dep, bool)))
                if n < viz:
                    pic = side_by_side(denormalize_rgb(batch["rgb"][j].float().cpu().numpy()), lab, dep,
                                       batch["semseg"][j].cpu().numpy(), batch["depth"][j].cpu().numpy(), batch["valid"][j].cpu().numpy())
                    Image.fromarray(pic).save(os.path.join(tmp, "viz", f"{idx}.png"))
                n += 1
    return n


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
