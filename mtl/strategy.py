"""How gradients become updates: plain (one process), DDP, or DeepSpeed (mtl.distributed).

The train loop only calls ``backward(loss)`` per micro-batch and ``micro_batch_done(last)``
after it; the strategy decides about gradient sync, clipping, stepping and what a checkpoint
holds. That keeps one train step for every mode.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch
from torch import nn

from mtl.checkpoint import STATE_FILE, checkpoint_bytes, load_checkpoint


class PlainStrategy:
    """One optimizer over one (possibly DDP-wrapped) model."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int = 1,
                 grad_clip: float | None = None, train_model: nn.Module | None = None) -> None:
        self.module = module  # the bare model: what checkpoints hold
        self.model = train_model or module  # what the train step calls
        self.optimizer = optimizer
        self.grad_accum, self.grad_clip = grad_accum, grad_clip

    def sync_context(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def micro_batch_done(self, last: bool) -> None:
        if not last:
            return
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # --- checkpoints: one file with model + optimizer, written by rank 0
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def save_dir(self, path: str, meta: dict[str, Any], rank: int) -> bool:
        """Write this rank's part of a checkpoint into local folder ``path``; True if it wrote.
        ``state.pt`` is a regular streetmtl checkpoint (`jobs/evaluate.py` reads it)."""
        if rank != 0:
            return False
        with open(os.path.join(path, STATE_FILE), "wb") as fh:
            fh.write(checkpoint_bytes({**meta, **self.state_dict()}))
        return True

    def load_dir(self, path: str, check: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Restore from a checkpoint folder; ``check`` vets its metadata before any weight is loaded."""
        state = load_checkpoint(os.path.join(path, STATE_FILE))
        check(state)
        self.load_state_dict(state)
        return state


class DDPStrategy(PlainStrategy):
    """DistributedDataParallel; gradients are all-reduced only on the last micro-batch."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 grad_accum: int = 1, grad_clip: float | None = None) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(module, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        super().__init__(module, optimizer, grad_accum, grad_clip, train_model=ddp)

    def sync_context(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last_micro_batch else self.model.no_sync()
