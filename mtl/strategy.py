"""How gradients become updates: one device, DDP, or DeepSpeed (`mtl.distributed`).

The train loop only calls ``backward(loss)`` per micro-batch inside ``sync_context(last)``,
then ``step(last)``; the strategy decides about gradient sync, clipping and stepping, sums
metric states across ranks, and says what a checkpoint holds: ``state_dict`` is what rank 0
writes into the checkpoint's ``state.pt``, and a *sharded* strategy (DeepSpeed's ZeRO) also
writes every rank's own files with ``save_shards``. Where those files go, when, and how they
are published is the checkpointer's business (`mtl.checkpoint.Checkpointer`), never the
strategy's. That keeps one train step and one checkpoint layout for every mode.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtl.cuda_graph import on_capture_stream


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Strategy(ABC):
    """The interface every mode implements (see the module docstring).

    ``module`` is the bare model (what checkpoints and validation use), ``model`` what the train
    step calls (a DDP or DeepSpeed wrapper, or the module itself), ``optimizer`` the optimizer
    whose ``param_groups`` the LR plan sets."""

    module: nn.Module
    model: nn.Module
    optimizer: Any
    sharded: bool = False  # every rank writes files of its own into a checkpoint
    # its whole step (forward, backward, sync, update) can be captured as one CUDA graph
    # (`mtl.cuda_graph`): it makes no host syncs and keeps its tensors' storage across steps
    graph_capturable: bool = False

    def sync_context(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Around forward + backward: gradients are synchronised only on the last micro-batch."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, last_micro_batch: bool) -> None:
        """After each micro-batch's backward: the update (clip, step, zero) after the last one."""

    # --- collectives: identity on one process
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over all ranks (a new tensor; ``t`` is left alone)."""
        if not _several_ranks():
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t

    def sync_buffers(self) -> None:
        """Every rank's module buffers (BatchNorm's running statistics) made rank 0's, in place:
        validation runs on every rank and the checkpoint holds rank 0's, so all must be one
        model. DDP broadcasts them before each forward (each rank's last one still updates them
        with its own batch); DeepSpeed never does, so they drift apart over the whole run."""
        if not _several_ranks():
            return
        for b in self.module.buffers():
            dist.broadcast(b, src=0)

    def barrier(self) -> None:
        if _several_ranks():
            dist.barrier()

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order: what a choice each rank makes on
        its own is checked against (`mtl.checkpoint.Checkpointer.restore`)."""
        if not _several_ranks():
            return [value]
        values: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values

    # --- what a checkpoint holds
    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Rank 0's part of a checkpoint: at least ``{"model": <full weights>}``."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_shards(self, folder: str) -> None:
        """Write this rank's own files into local ``folder`` (sharded strategies only)."""

    def load_shards(self, folder: str) -> None:
        """Read this rank's own files back from local ``folder`` (sharded strategies only)."""


class PlainStrategy(Strategy):
    """One optimizer over one model on one device; checkpoints hold model + optimizer."""

    graph_capturable = True

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int = 1,
                 grad_clip: float | None = None, train_model: nn.Module | None = None) -> None:
        self.module = module
        self.model = train_model or module
        self.optimizer = optimizer
        self.grad_accum, self.grad_clip = grad_accum, grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self, last_micro_batch: bool) -> None:
        if not last_micro_batch:
            return
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        optimizer = self.optimizer.state_dict()
        for group in optimizer["param_groups"]:  # (copies) what a captured step changed is stored as an eager run has it:
            if isinstance(group.get("lr"), torch.Tensor):  # the LR tensor as the number it holds
                group["lr"] = float(group["lr"])
            if group.get("capturable"):
                group["capturable"] = False
        return {"model": self.module.state_dict(), "optimizer": optimizer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class DDPStrategy(PlainStrategy):
    """DistributedDataParallel; gradients are all-reduced only on the last micro-batch. Rank 0
    holds the same weights and optimizer state as every other rank, so its checkpoint is whole."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 grad_accum: int = 1, grad_clip: float | None = None, for_capture: bool = False) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP keeps the parameters' AccumulateGrad nodes, which remember the stream they were made
        # on: make them on the stream forwards will run on (`mtl.cuda_graph.capture_stream` when
        # the step is to be captured, the current one otherwise), else every backward syncs the
        # two streams (PyTorch's warning, which also names it a cause of failed captures)
        with on_capture_stream(device) if for_capture else contextlib.nullcontext():
            ddp = DDP(module, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        super().__init__(module, optimizer, grad_accum, grad_clip, train_model=ddp)
        self.graph_capturable = for_capture

    def sync_context(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last_micro_batch else self.model.no_sync()
