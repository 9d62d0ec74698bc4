"""Decoders: context features (+ encoder skips) -> 256-channel features at stride 4 or 2. A
decoder's ``head_kernel`` (3 unless it says otherwise) is the size of the task head's conv after it."""

from __future__ import annotations

import torch
from torch import nn

from mtl.models.blocks import ConvBnRelu, resize_to
from mtl.models.registry import DECODERS, register

WIDTH = 256
SKIP_4X = 48  # DeepLabV3+: low-level features reduced to 48 channels by a 1x1 conv
SKIP_2X = 8  # the double-skip decoder's extra 2x projection (reproduces the report's 32,070,180)


@register(DECODERS, "skip")
class SkipDecoder(nn.Module):
    """DeepLabV3+ decoder: upsample context to 4x, concat the 1x1-projected 4x skip, 3x3 fuse."""

    def __init__(self, context_ch: int, skip_ch: dict[str, int]) -> None:
        super().__init__()
        self.skip4 = ConvBnRelu(skip_ch["4x"], SKIP_4X, 1)
        self.fuse = ConvBnRelu(context_ch + SKIP_4X, WIDTH, 3)
        self.out_ch = WIDTH

    def forward(self, context: torch.Tensor, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        skip = self.skip4(feats["4x"])
        return self.fuse(torch.cat([resize_to(context, skip.shape[-2:]), skip], dim=1))


@register(DECODERS, "double_skip")
class DoubleSkipDecoder(nn.Module):
    """The report's double-skip decoder (§5.2.2): 4x and 2x skips, each a 1x1 ConvBnRelu, fused
    at stride 2 with the upsampled context. Sharper boundaries for segmentation."""

    def __init__(self, context_ch: int, skip_ch: dict[str, int]) -> None:
        super().__init__()
        self.skip4 = ConvBnRelu(skip_ch["4x"], SKIP_4X, 1)
        self.skip2 = ConvBnRelu(skip_ch["2x"], SKIP_2X, 1)
        self.fuse = ConvBnRelu(context_ch + SKIP_4X + SKIP_2X, WIDTH, 3)
        self.out_ch = WIDTH

    def forward(self, context: torch.Tensor, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        s2 = self.skip2(feats["2x"])
        size = s2.shape[-2:]
        s4 = resize_to(self.skip4(feats["4x"]), size)
        return self.fuse(torch.cat([resize_to(context, size), s4, s2], dim=1))


@register(DECODERS, "none")
class NoDecoder(nn.Module):
    """No decoder: the context features upsampled to stride 4, no skip, and a 1x1 head after
    them. The course skeleton's placeholder (its decoder's "TODO"), which the report's runs of
    §2.2–2.3 used ("the dummy decoder", Tables 4–6: striding or dilation, with or without ASPP):
    with ``--semseg-context none`` those runs' network."""

    head_kernel = 1

    def __init__(self, context_ch: int, skip_ch: dict[str, int]) -> None:
        super().__init__()
        self.out_ch = context_ch

    def forward(self, context: torch.Tensor, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return resize_to(context, feats["4x"].shape[-2:])
