"""Joint augmentation and tensor conversion: one code path for folder and shard datasets.

Randomness comes from a generator the caller seeds with (seed, epoch, sample index), so an
augmented sample is a pure function of those three numbers: reproducible across worker
counts, ranks and resumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mtl.data.miniscapes import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def to_tensors(sample: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Decoded numpy sample -> tensors: rgb 3xHxW float (ImageNet-normalised), semseg HxW int64,
    depth HxW float32 metres (0 where invalid), valid HxW bool."""
    rgb = torch.from_numpy(np.ascontiguousarray(sample["rgb"])).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return {
        "rgb": rgb.sub_(mean).div_(std),
        "semseg": torch.from_numpy(np.ascontiguousarray(sample["semseg"])).long(),
        "depth": torch.from_numpy(np.ascontiguousarray(sample["depth"])).float(),
        "valid": torch.from_numpy(np.ascontiguousarray(sample["valid"])).bool(),
    }


def augment(t: dict[str, torch.Tensor], aug: Augment, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Apply the same scale/crop/flip to rgb, labels and depth.

    Labels and depth are resized with nearest neighbour: interpolating class ids or mixing
    valid with invalid depth would invent values. Zooming an image does not change metric depth.
    """
    h, w = t["semseg"].shape
    s = float(rng.uniform(aug.scale_min, aug.scale_max))
    ch, cw = aug.crop if aug.crop is not None else (h, w)
    if s != 1.0:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        t = {
            "rgb": F.interpolate(t["rgb"][None], size=size, mode="bilinear", align_corners=False)[0],
            "semseg": F.interpolate(t["semseg"][None, None].float(), size=size, mode="nearest")[0, 0].long(),
            "depth": F.interpolate(t["depth"][None, None], size=size, mode="nearest")[0, 0],
            "valid": F.interpolate(t["valid"][None, None].float(), size=size, mode="nearest")[0, 0].bool(),
        }
        h, w = size
    if (h, w) != (ch, cw):
        t = _pad_to(t, max(h, ch), max(w, cw))
        h, w = t["semseg"].shape
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        t = {k: v[..., y:y + ch, x:x + cw] for k, v in t.items()}
    if aug.hflip and rng.random() < 0.5:
        t = {k: v.flip(-1) for k, v in t.items()}
    return {k: v.contiguous() for k, v in t.items()}


def _pad_to(t: dict[str, torch.Tensor], h: int, w: int) -> dict[str, torch.Tensor]:
    """Pad bottom/right so a crop fits: rgb 0 (the mean colour), labels ignore, depth invalid."""
    ph, pw = h - t["semseg"].shape[0], w - t["semseg"].shape[1]
    if ph == 0 and pw == 0:
        return t
    pad = (0, pw, 0, ph)
    return {
        "rgb": F.pad(t["rgb"], pad, value=0.0),
        "semseg": F.pad(t["semseg"], pad, value=IGNORE_INDEX),
        "depth": F.pad(t["depth"], pad, value=0.0),
        "valid": F.pad(t["valid"], pad, value=False),
    }


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def prepare(sample: dict[str, np.ndarray], aug: Augment | None, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
    """Decoded sample -> training/eval tensors (augmented when ``aug`` is given)."""
    t = to_tensors(sample)
    if aug is not None:
        assert rng is not None
        t = augment(t, aug, rng)
    return t
