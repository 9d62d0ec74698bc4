"""Task-weighted multi-task loss and the depth target codec.

The dataset hands out depth in metres only. The codec maps it to the normalised space the depth
head predicts in (log or linear) for the loss, and maps predictions back to metres for metrics;
ground truth is never round-tripped through the codec (the report's validation pitfall, §5.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mtl.data.miniscapes import IGNORE_INDEX

# Rough street-scene statistics; they only condition the regression target.
LOG_MEAN, LOG_STD = math.log(20.0), 0.9
LIN_MEAN, LIN_STD = 25.0, 25.0


@dataclass(frozen=True)
class DepthCodec:
    space: str = "log"

    def encode(self, metres: torch.Tensor) -> torch.Tensor:
        if self.space == "log":
            return (torch.log(metres.clamp(min=1e-3)) - LOG_MEAN) / LOG_STD
        return (metres - LIN_MEAN) / LIN_STD

    def decode(self, pred: torch.Tensor) -> torch.Tensor:
        """Network output -> metres (float32)."""
        pred = pred.float()
        if self.space == "log":
            return torch.exp((pred * LOG_STD + LOG_MEAN).clamp(max=math.log(1e4)))
        return pred * LIN_STD + LIN_MEAN


def task_losses(out: dict[str, list[torch.Tensor]], batch: dict[str, torch.Tensor], codec: DepthCodec,
                deep_supervision: str = "mean") -> torch.Tensor:
    """The task losses, in `mtl.multitask.TASKS` order: [CE(ignore 255), L1 on valid depth], each
    the mean (``deep_supervision`` "mean": the course skeleton's, under which the report's
    distillation runs trained) or the sum of the task's losses over the model's outputs. One
    tensor: no host sync here; the weighting (`mtl.weighting`) makes the total. Each is a mean
    over the batch's labelled (valid) pixels, and 0 for a batch without any: not NaN, which a
    learned weighting would keep for good."""
    target = codec.encode(batch["depth"])
    valid = batch["valid"]
    n_valid = valid.sum().clamp(min=1)
    n_labelled = (batch["semseg"] != IGNORE_INDEX).sum().clamp(min=1)
    per = {t: len(out[t]) if deep_supervision == "mean" else 1 for t in ("semseg", "depth")}  # (Python ints: no copy)
    ce = (F.cross_entropy(o.float(), batch["semseg"], ignore_index=IGNORE_INDEX, reduction="sum") for o in out["semseg"])
    seg = sum(ce) / (n_labelled * per["semseg"])
    dep = sum(((o[:, 0].float() - target).abs() * valid).sum() / n_valid for o in out["depth"]) / per["depth"]
    return torch.stack([seg, dep])


def multitask_loss(out: dict[str, list[torch.Tensor]], batch: dict[str, torch.Tensor], codec: DepthCodec,
                   semseg_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """w * CE + (1 - w) * depth loss (`--task-weighting fixed`: what the benchmark's pure path
    computes). Returns the total and the detached per-task parts."""
    losses = task_losses(out, batch, codec)
    total = semseg_weight * losses[0] + (1.0 - semseg_weight) * losses[1]
    return total, {"loss_semseg": losses[0].detach(), "loss_depth": losses[1].detach()}
