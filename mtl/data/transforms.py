"""Joint augmentation on compact uint8 samples: one code path for folder and shard datasets.

Randomness comes from a generator the caller seeds with (seed, epoch, sample index), so an
augmented sample is a pure function of those three numbers: reproducible across worker counts,
ranks and resumes. Resampling uses PIL (bilinear, rgb) and index arithmetic (nearest, labels and
disparity codes) rather than torch kernels, whose rounding depends on the thread count; the
zoom is resampled straight into the crop window (PIL's ``box``), so no pixel outside the crop is
ever computed. Float conversion and normalisation happen on the device (`mtl.data.batch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mtl.data.miniscapes import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_RGB_U8 = tuple(round(255 * m) for m in IMAGENET_MEAN)  # pads to ~0 after normalisation

Sample = dict[str, np.ndarray]  # rgb HxWx3 uint8, semseg HxW uint8, disparity HxW uint8 codes (0 = invalid)


@dataclass(frozen=True)
class Augment:
    """Random scale (zoom in), random crop, horizontal flip, as in the report (§5.4)."""

    scale_min: float = 1.0
    scale_max: float = 1.25
    crop: tuple[int, int] | None = None  # (h, w); None = the input size (zoom then crop back)
    hflip: bool = True

    def __post_init__(self) -> None:
        if not (0 < self.scale_min <= self.scale_max):
            raise ValueError(f"augmentation scale range must satisfy 0 < min <= max, got {self.scale_min}..{self.scale_max}")
        if self.crop is not None and (len(self.crop) != 2 or min(self.crop) <= 0):
            raise ValueError(f"crop must be two positive sizes (h, w), got {self.crop}")


def augment(s: Sample, aug: Augment, rng: np.random.Generator) -> Sample:
    """Zoom by a random factor, take a random crop (padding where the zoomed image is smaller),
    flip; the same geometry for rgb, labels and disparity. Labels and disparity use nearest
    neighbour through one shared index map: interpolating class ids or mixing valid with invalid
    depth would invent values. Zooming an image does not change metric depth."""
    h, w = s["semseg"].shape
    scale = float(rng.uniform(aug.scale_min, aug.scale_max))
    ch, cw = aug.crop if aug.crop is not None else (h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    y = int(rng.integers(0, max(nh - ch, 0) + 1))
    x = int(rng.integers(0, max(nw - cw, 0) + 1))
    oh, ow = min(ch, nh), min(cw, nw)  # the part of the crop the zoomed image covers
    if (nh, nw, oh, ow) != (h, w, h, w):
        sy, sx = nh / h, nw / w
        box = (x / sx, y / sy, (x + ow) / sx, (y + oh) / sy)
        rows = np.minimum(((y + np.arange(oh) + 0.5) / sy).astype(np.intp), h - 1)
        cols = np.minimum(((x + np.arange(ow) + 0.5) / sx).astype(np.intp), w - 1)
        s = {
            "rgb": np.array(Image.fromarray(s["rgb"]).resize((ow, oh), Image.BILINEAR, box=box)),
            "semseg": s["semseg"][rows][:, cols],
            "disparity": s["disparity"][rows][:, cols],
        }
    if (oh, ow) != (ch, cw):
        s = _pad_to(s, ch, cw)
    if aug.hflip and rng.random() < 0.5:
        s = {k: v[:, ::-1] for k, v in s.items()}
    return s


def _pad_to(s: Sample, h: int, w: int) -> Sample:
    """Pad bottom/right: rgb with the mean colour, labels with ignore, disparity with invalid (0)."""
    sh, sw = s["semseg"].shape
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = _MEAN_RGB_U8
    rgb[:sh, :sw] = s["rgb"]
    pad = ((0, h - sh), (0, w - sw))
    return {"rgb": rgb, "semseg": np.pad(s["semseg"], pad, constant_values=IGNORE_INDEX),
            "disparity": np.pad(s["disparity"], pad, constant_values=0)}


def to_tensors(sample: Sample) -> dict[str, torch.Tensor]:
    """uint8 tensors, no conversion: rgb HxWx3, semseg HxW, disparity HxW."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sample.items()}


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def prepare(sample: Sample, aug: Augment | None, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
    """Decoded sample -> compact tensors (augmented when ``aug`` is given)."""
    if aug is not None:
        assert rng is not None
        sample = augment(sample, aug, rng)
    return to_tensors(sample)
