"""The report's architectures, assembled from registry parts.

Every model maps an image batch to ``{"semseg": [logits, ...], "depth": [pred, ...]}`` at the
input resolution. A list holds deep-supervision outputs; its last entry is the final prediction.
Depth comes out in the normalised target space (see `mtl.losses.DepthCodec`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from mtl.config import ModelConfig
from mtl.data.miniscapes import NUM_CLASSES
from mtl.models.blocks import TaskHead, resize_to
from mtl.models.distillation import DistillationDecoder, SelfAttention
from mtl.models.registry import ARCHITECTURES, CONTEXTS, DECODERS, ENCODERS, lookup, register

TASKS = {"semseg": NUM_CLASSES, "depth": 1}

# Per-architecture defaults; explicit ModelConfig fields override them.
ARCH_DEFAULTS: dict[str, dict] = {
    "deeplabv3p": dict(output_stride=16, semseg_context="aspp", semseg_decoder="skip"),
    "branched": dict(output_stride=16, semseg_context="aspp", depth_context="aspp", semseg_decoder="skip", depth_decoder="skip"),
    "distillation": dict(output_stride=16, semseg_context="aspp", depth_context="aspp", semseg_decoder="skip", depth_decoder="skip"),
    "branched_vortex": dict(output_stride=8, semseg_context="vortex", depth_context="aspp", semseg_decoder="double_skip", depth_decoder="skip"),
}


def resolve(cfg: ModelConfig) -> ModelConfig:
    """Fill the fields left as None with the architecture's defaults. ValueError for a setting
    the architecture would not use (it would name the run without changing the network)."""
    cfg.validate()
    if cfg.arch == "deeplabv3p" and (cfg.depth_context or cfg.depth_decoder):
        raise ValueError("--arch deeplabv3p has one branch (depth comes from its shared decoder's head): "
                         "--depth-context and --depth-decoder do not apply")
    filled = {k: v for k, v in ARCH_DEFAULTS[cfg.arch].items() if getattr(cfg, k) is None}
    cfg = replace(cfg, **filled)
    if cfg.vortex_rates != ModelConfig().vortex_rates and "vortex" not in (cfg.semseg_context, cfg.depth_context):
        raise ValueError(f"--vortex-rates: no context module of --arch {cfg.arch} is vortex pooling (--semseg-context/"
                         f"--depth-context vortex uses them)")
    if cfg.aspp_rates is None:
        # the rates DeepLab gives for 16, scaled with the feature map (at 32: 3 6 9, not rates wider than its 8x16 map at 256x512)
        cfg = replace(cfg, aspp_rates={8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}[cfg.output_stride])
    return cfg


DERIVED = ("output_stride", "aspp_rates", "semseg_context", "depth_context", "semseg_decoder", "depth_decoder")


def unpin_derived(cfg: ModelConfig) -> ModelConfig:
    """A stored (resolved) model config with the fields `resolve` derives set back to None where
    they hold what it derives: read from a run's config.json and given another ``--arch`` or
    ``--output-stride``, they follow the new choice, as without the file (the old architecture's
    output stride, ASPP rates and branches would otherwise stay and train another network under
    the new name). The network, name and hash of the config itself do not change."""
    bare = replace(cfg, **{k: None for k in DERIVED})
    stride = cfg.output_stride if cfg.output_stride != resolve(bare).output_stride else None
    derived = resolve(replace(bare, output_stride=stride))
    return replace(bare, output_stride=stride, **{k: getattr(cfg, k) for k in DERIVED[1:] if getattr(cfg, k) != getattr(derived, k)})


def deep_supervised(arch: str) -> bool:
    """Whether architecture ``arch`` predicts each task more than once (its ``outputs_per_task``):
    its losses then combine as ``--deep-supervision`` says (`mtl.losses.task_losses`)."""
    return getattr(lookup(ARCHITECTURES, arch), "outputs_per_task", 1) > 1


def build_model(cfg: ModelConfig) -> nn.Module:
    cfg = resolve(cfg)
    return lookup(ARCHITECTURES, cfg.arch)(cfg)


def _encoder(cfg: ModelConfig) -> nn.Module:
    return lookup(ENCODERS, cfg.encoder)(output_stride=cfg.output_stride, pretrained=cfg.pretrained,
                                         dilated_convs=cfg.dilated_convs)


def _context(cfg: ModelConfig, kind: str, cin: int) -> nn.Module:
    rates = cfg.vortex_rates if kind == "vortex" else cfg.aspp_rates
    return lookup(CONTEXTS, kind)(cin, 256, tuple(rates))


class Branch(nn.Module):
    """One task's context module + decoder (+ head when given)."""

    def __init__(self, context: nn.Module, decoder: nn.Module, head: TaskHead | None) -> None:
        super().__init__()
        self.context, self.decoder, self.head = context, decoder, head

    def features(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decoder(self.context(feats["out"]), feats)


def _branch(cfg: ModelConfig, task: str, enc: nn.Module, tasks: dict[str, int]) -> Branch:
    ch = enc.channels
    context = _context(cfg, getattr(cfg, f"{task}_context"), ch["out"])
    decoder = lookup(DECODERS, getattr(cfg, f"{task}_decoder"))(256, ch)
    return Branch(context, decoder, TaskHead(decoder.out_ch, tasks, getattr(decoder, "head_kernel", 3)))


@register(ARCHITECTURES, "deeplabv3p")
class DeepLabV3p(nn.Module):
    """Shared encoder, one ASPP, one DeepLabV3+ decoder, one 3x3 conv for both tasks."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = _encoder(cfg)
        self.branch = _branch(cfg, "semseg", self.encoder, TASKS)

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        b = self.branch
        out = b.head(b.features(self.encoder(x)))
        return {t: [resize_to(y, x.shape[-2:])] for t, y in out.items()}


@register(ARCHITECTURES, "branched")
@register(ARCHITECTURES, "branched_vortex")
class Branched(nn.Module):
    """Shared encoder; per task its own context module, decoder and head.

    ``branched_vortex`` is this class with the report's final choices (vortex pooling at OS 8 and
    a double-skip decoder for segmentation, ASPP 12/24/36 and a single skip for depth)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = _encoder(cfg)
        self.branches = nn.ModuleDict({t: _branch(cfg, t, self.encoder, {t: n}) for t, n in TASKS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        feats = self.encoder(x)
        return {t: [resize_to(b.head(b.features(feats))[t], x.shape[-2:])] for t, b in self.branches.items()}


@register(ARCHITECTURES, "distillation")
class Distillation(nn.Module):
    """Branched + task distillation: each task's decoder features pass a self-attention gate and
    are added to the other task's features; final decoders predict from the sums. Both the
    intermediate and the final predictions are returned (deep supervision).

    The routing follows the report's prose and PAD-Net (the gate maps the *foreign* features into
    the task's own space: depth's final decoder sees ``f_depth + SA(f_semseg)``); the report's
    Listing 4 reads the other way round (``SA(f_depth) + f_semseg`` for depth). Both have the same
    parameters."""

    outputs_per_task = 2  # the branch decoders' and the final ones' (`deep_supervised`)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = _encoder(cfg)
        self.branches = nn.ModuleDict({t: _branch(cfg, t, self.encoder, {t: n}) for t, n in TASKS.items()})
        width = 256
        self.attention = nn.ModuleDict({t: SelfAttention(width, width) for t in TASKS})
        self.final = nn.ModuleDict({t: DistillationDecoder(width, width) for t in TASKS})
        self.final_heads = nn.ModuleDict({t: TaskHead(width, {t: n}) for t, n in TASKS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        feats = self.encoder(x)
        inter = {t: b.features(feats) for t, b in self.branches.items()}
        (a, fa), (b, fb) = inter.items()
        # (the foreign features at the task's own stride: a double-skip decoder's are at 2x, a skip's at 4x)
        summed = {a: fa + resize_to(self.attention[b](fb), fa.shape[-2:]), b: fb + resize_to(self.attention[a](fa), fb.shape[-2:])}
        size = x.shape[-2:]
        out = {}
        for t, branch in self.branches.items():
            first = branch.head(inter[t])[t]
            final = self.final_heads[t](self.final[t](summed[t]))[t]
            out[t] = [resize_to(first, size), resize_to(final, size)]
        return out
