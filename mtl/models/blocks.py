"""Small building blocks shared by the model zoo."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBnRelu(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, dilation: int = 1) -> None:
        pad = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, padding=pad, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


def resize_to(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class TaskHead(nn.Module):
    """The final 3x3 conv (1x1 after the skeleton's placeholder decoder), with bias and no
    BN/activation (the report: predictions come out raw).

    One conv may serve several tasks (the single-branch DeepLabV3+): its channels are split.
    """

    def __init__(self, cin: int, tasks: dict[str, int], kernel: int = 3) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.conv = nn.Conv2d(cin, sum(self.tasks.values()), kernel, padding=kernel // 2, bias=True)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.tasks, torch.split(self.conv(x), list(self.tasks.values()), dim=1)))
