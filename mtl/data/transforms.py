"""Joint augmentation and tensor conversion: one code path for folder and shard datasets.

Randomness comes from a generator the caller seeds with (seed, epoch, sample index), so an
augmented sample is a pure function of those three numbers: reproducible across worker
counts, ranks and resumes. Resampling is done on the uint8/float arrays with PIL and index
arithmetic (not torch kernels, whose rounding depends on the thread count), before the
float conversion, which also keeps it cheap.
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

Sample = dict[str, np.ndarray]  # rgb HxWx3 uint8, semseg HxW uint8, depth HxW float32 m, valid HxW bool


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


def to_tensors(sample: Sample) -> dict[str, torch.Tensor]:
    """rgb 3xHxW float (ImageNet-normalised), semseg HxW int64, depth HxW float32 metres (0 where
    invalid), valid HxW bool."""
    rgb = torch.from_numpy(np.ascontiguousarray(sample["rgb"])).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return {
        "rgb": rgb.sub_(mean).div_(std),
        "semseg": torch.from_numpy(np.ascontiguousarray(sample["semseg"])).long(),
        "depth": torch.from_numpy(np.ascontiguousarray(sample["depth"])).float(),
        "valid": torch.from_numpy(np.ascontiguousarray(sample["valid"])).bool(),
    }


def augment(s: Sample, aug: Augment, rng: np.random.Generator) -> Sample:
    """Apply the same scale/crop/flip to rgb, labels and depth.

    Labels, depth and validity use nearest neighbour through one shared index map:
    interpolating class ids or mixing valid with invalid depth would invent values. Zooming an
    image does not change metric depth.
    """
    h, w = s["semseg"].shape
    scale = float(rng.uniform(aug.scale_min, aug.scale_max))
    ch, cw = aug.crop if aug.crop is not None else (h, w)
    if scale != 1.0:
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        rows = np.minimum(((np.arange(nh) + 0.5) * h / nh).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(nw) + 0.5) * w / nw).astype(np.int64), w - 1)
        near = np.ix_(rows, cols)
        s = {
            "rgb": np.array(Image.fromarray(s["rgb"]).resize((nw, nh), Image.BILINEAR)),
            "semseg": s["semseg"][near], "depth": s["depth"][near], "valid": s["valid"][near],
        }
        h, w = nh, nw
    if (h, w) != (ch, cw):
        s = _pad_to(s, max(h, ch), max(w, cw))
        h, w = s["semseg"].shape
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        s = {k: v[y:y + ch, x:x + cw] for k, v in s.items()}
    if aug.hflip and rng.random() < 0.5:
        s = {k: v[:, ::-1] for k, v in s.items()}
    return s


def _pad_to(s: Sample, h: int, w: int) -> Sample:
    """Pad bottom/right so a crop fits: rgb the mean colour, labels ignore, depth invalid."""
    ph, pw = h - s["semseg"].shape[0], w - s["semseg"].shape[1]
    if ph == 0 and pw == 0:
        return s
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = _MEAN_RGB_U8
    rgb[: h - ph, : w - pw] = s["rgb"]
    pad = ((0, ph), (0, pw))
    return {
        "rgb": rgb,
        "semseg": np.pad(s["semseg"], pad, constant_values=IGNORE_INDEX),
        "depth": np.pad(s["depth"], pad, constant_values=0.0),
        "valid": np.pad(s["valid"], pad, constant_values=False),
    }


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def prepare(sample: Sample, aug: Augment | None, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
    """Decoded sample -> training/eval tensors (augmented when ``aug`` is given)."""
    if aug is not None:
        assert rng is not None
        sample = augment(sample, aug, rng)
    return to_tensors(sample)
