"""Multi-scale context modules on the encoder bottleneck: ASPP and vortex pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtl.models.blocks import ConvBnRelu
from mtl.models.registry import CONTEXTS, register


class _GlobalPool(nn.Module):
    """Image-level features: global average pool -> 1x1 ConvBnRelu -> broadcast back."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvBnRelu(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, x.shape[2], x.shape[3])
        # A broadcast view has no memory format of its own: concatenated with channels_last
        # branches it would turn the whole concat (and the projection conv's input) into NCHW.
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return y.contiguous(memory_format=fmt)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): 1x1 + dilated 3x3 branches + image pooling."""

    def __init__(self, cin: int, cout: int = 256, rates: tuple[int, ...] = (6, 12, 18)) -> None:
        super().__init__()
        self.branches = nn.ModuleList([ConvBnRelu(cin, cout, 3, r) for r in rates] + [ConvBnRelu(cin, cout, 1)])
        self.image_pool = _GlobalPool(cin, cout)
        self.project = ConvBnRelu(cout * (len(rates) + 2), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches] + [self.image_pool(x)], dim=1))


class DilatedAvgPool(nn.Module):
    """3x3 average pooling with dilation (PyTorch's avg_pool2d has none): a fixed depthwise conv.

    The kernel is a non-persistent buffer: it is not trained and not a parameter.
    """

    def __init__(self, channels: int, dilation: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.dilation = dilation
        self.register_buffer("weight", torch.full((channels, 1, kernel_size, kernel_size), 1.0 / kernel_size**2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.dilation * (self.weight.shape[-1] // 2)
        return F.conv2d(x, self.weight.to(x.dtype), padding=pad, dilation=self.dilation, groups=x.shape[1])


class VortexPooling(nn.Module):
    """Vortex pooling, module C (Xie et al. 2018): cascaded dilated average pools feed 3x3 convs
    with geometric rates (1, 3, 9, 27), plus image pooling. Meant for output stride 8."""

    def __init__(self, cin: int, cout: int = 256, rates: tuple[int, ...] = (1, 3, 9, 27)) -> None:
        super().__init__()
        self.pools = nn.ModuleList([DilatedAvgPool(cin, r) for r in rates[:-1]])
        self.branches = nn.ModuleList([ConvBnRelu(cin, cout, 3, r) for r in rates])
        self.image_pool = _GlobalPool(cin, cout)
        self.project = ConvBnRelu(cout * (len(rates) + 1), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = [x]
        for pool in self.pools:  # module C reuses each pooled map for the next, wider one
            inputs.append(pool(inputs[-1]))
        outs = [b(y) for b, y in zip(self.branches, inputs)]
        return self.project(torch.cat(outs + [self.image_pool(x)], dim=1))


class Projection(ConvBnRelu):
    """No context module: a 1x1 ConvBnRelu to the decoder width (the course skeleton's
    placeholder for ASPP: with ``--semseg-decoder none`` the report's "without ASPP" of Table 6)."""

    def __init__(self, cin: int, cout: int = 256, rates: tuple[int, ...] = ()) -> None:
        super().__init__(cin, cout, 1)


register(CONTEXTS, "aspp")(ASPP)
register(CONTEXTS, "vortex")(VortexPooling)
register(CONTEXTS, "none")(Projection)
