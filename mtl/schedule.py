"""The LR schedule as a pure function of the global step and the planned total steps.

A resumed run (or one on a different number of workers with the same step plan) gets exactly
the LR it would have had without interruption: no scheduler state to restore and bend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PolyLR:
    base_lr: float
    total_steps: int
    power: float = 0.9
    warmup_steps: int = 0

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        frac = min(step, self.total_steps) / max(self.total_steps, 1)
        return self.base_lr * (1.0 - frac) ** self.power

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set the LR of ``step`` on every group; a group whose LR is a tensor (a captured optimizer
        step reads it there, `mtl.cuda_graph.prepare_optimizer`) gets it filled in place: one
        host-to-device write, no sync."""
        lr = self(step)
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lr
