"""DeepSpeed ZeRO (stage 0/1/2) as a gradient strategy for the shared train loop.

DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``, which runs
whatever a pickle asks for. Every file it loads goes through `safe_deepspeed_load` instead:
tensors and plain data, plus the three DeepSpeed classes its ZeRO optimizer state holds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtl.checkpoint import load_safely
from mtl.config import ExperimentConfig
from mtl.strategy import Strategy


def _deepspeed_globals() -> list:
    """The classes DeepSpeed 0.19's ZeRO 1/2 checkpoints pickle (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on a saved checkpoint)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_deepspeed_load(path: str, map_location: Any = None) -> Any:
    """What DeepSpeed's checkpoint engine's ``load`` does, restricted to safe content."""
    with torch.serialization.safe_globals(_deepspeed_globals()):
        with open(path, "rb") as fh:
            return load_safely(fh, path, map_location)


def deepspeed_config(cfg: ExperimentConfig, autocast: bool = False) -> dict[str, Any]:
    """DeepSpeed's config for ``cfg``. ``autocast``: the train step runs under bf16 autocast
    (`mtl.engine.autocast`: ``--bf16`` on a GPU). The engine must be told: with autocast on
    outside it and no ``torch_autocast`` section, DeepSpeed 0.19 turns autocast *off* inside its
    forward, and the run trains in fp32 (slower, other numerics than DDP) with only a warning."""
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        # ZeRO 1/2 hands the optimizer flat fp32 partitions, which any torch optimizer steps; without
        # this DeepSpeed asserts at initialize for one off its list (--optimizer sgd)
        "zero_allow_untested_optimizer": True,
        # precision: torch.autocast(bf16) around the forward, as in every other mode; the
        # master weights stay fp32 (no loss scaling needed for bf16), and so do the gradients
        # the ranks exchange (no module's are reduced in bf16: as under DDP)
        "bf16": {"enabled": False},
        "torch_autocast": {"enabled": autocast, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def without_cpu_shm_op() -> None:
    """DeepSpeed on the CPU (local debug mode, CPU-only clusters) all-reduces with torch's gloo.
    DeepSpeed's CPU accelerator would otherwise JIT-compile its shared-memory all-reduce op at
    the first ``initialize`` (about a minute of C++ on a small machine, and a compiler on every
    node), which speeds up collectives between ranks on one machine only. On GPUs DeepSpeed
    builds no such op: this changes nothing there."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedStrategy(Strategy):
    """The project's optimizer wrapped by a DeepSpeed engine: ZeRO shards its state across ranks.
    DeepSpeed accumulates gradients and clips itself (it steps only at the accumulation
    boundary). Under ZeRO 1/2 every rank holds the full weights, so rank 0's ``state.pt`` is a
    complete model for evaluation; the optimizer state lives only in the ranks' shards."""

    sharded = True
    TAG = "zero"  # DeepSpeed's own sub-folder of the shards folder

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, cfg: ExperimentConfig) -> None:
        import deepspeed

        on_gpu = next(module.parameters()).device.type == "cuda"
        if not on_gpu:
            without_cpu_shm_op()
        config = deepspeed_config(cfg, autocast=on_gpu and cfg.train.bf16)  # (as mtl.engine.autocast decides)
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        self.module, self.model, self.optimizer, self.engine = module, engine, ds_optimizer, engine
        engine.checkpoint_engine.load = safe_deepspeed_load  # every file DeepSpeed reads goes through it

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/grad_accum itself

    def step(self, last_micro_batch: bool) -> None:
        self.engine.step()  # a no-op until the accumulation boundary; clips, steps, zeroes there

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to do: `load_shards` restores weights and optimizer together, as DeepSpeed
        keeps them (the weights in ``state`` are the same as in the shards)."""

    def save_shards(self, folder: str) -> None:
        self.engine.save_checkpoint(folder, tag=self.TAG)

    def load_shards(self, folder: str) -> None:
        load_path, _ = self.engine.load_checkpoint(folder, tag=self.TAG)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder}")
