"""Task distillation parts (PAD-Net style, as in the report §4)."""

from __future__ import annotations

import torch
from torch import nn

from mtl.models.blocks import ConvBnRelu


class SelfAttention(nn.Module):
    """features * sigmoid(attention): a learned gate on one task's features before they are
    added to the other task's. The attention conv starts at zero (gate 0.5 everywhere)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.attention = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        nn.init.zeros_(self.attention.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.sigmoid(self.attention(x))


class DistillationDecoder(nn.Sequential):
    """The final decoder after distillation: one 3x3 ConvBnRelu (no skips); a TaskHead follows."""

    def __init__(self, cin: int, width: int = 256) -> None:
        super().__init__(ConvBnRelu(cin, width, 3))
