"""ResNet encoders (torchvision definitions) with dilation instead of striding in the last stages."""

from __future__ import annotations

import io

import fsspec
import torch
import torchvision
from torch import nn

from mtl.models.registry import ENCODERS

# name -> (channels at stride 2, at stride 4, at the bottleneck)
CHANNELS = {"resnet18": (64, 64, 512), "resnet34": (64, 64, 512), "resnet50": (64, 256, 2048)}


class ResNetEncoder(nn.Module):
    """Returns {"2x", "4x", "out"} features. ``output_stride`` 32 = plain striding; 16 dilates the
    last stage, 8 the last two (the report's "dilation" encoders; needed for vortex pooling)."""

    def __init__(self, name: str, output_stride: int = 16, pretrained: str | None = None) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        net = getattr(torchvision.models, name)(weights=None, zero_init_residual=True)
        if pretrained:
            load_pretrained(net, pretrained)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.pool = net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if output_stride <= 16:
            _dilate(self.layer4, 2 if output_stride == 16 else 4)
        if output_stride == 8:
            _dilate(self.layer3, 2)
        self.channels = dict(zip(("2x", "4x", "out"), CHANNELS[name]))
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f2 = self.stem(x)
        f4 = self.layer1(self.pool(f2))
        out = self.layer4(self.layer3(self.layer2(f4)))
        return {"2x": f2, "4x": f4, "out": out}


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Turn a strided ResNet stage into a dilated one (same weights, same parameter count).

    torchvision only supports this for Bottleneck blocks; this works for BasicBlock too.
    """
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            if m.stride == (2, 2):
                m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (dilation, dilation), (dilation, dilation)


def load_pretrained(net: nn.Module, path: str) -> None:
    """Load torchvision-format ImageNet weights from a local path or fsspec URL (e.g. s3://).

    The classifier (fc.*) is ignored; anything else that does not fit is an error naming the file.
    """
    try:
        with fsspec.open(path, "rb") as fh:
            state = torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"pretrained encoder weights not found: {path}") from e
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"pretrained encoder weights {path}: cannot be read as a torch state dict ({e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained encoder weights {path}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
            f"wrong shapes {wrong[:3]}" if wrong else "",
        ]))
        raise ValueError(f"pretrained encoder weights {path} do not fit this encoder: {detail}")
    net.load_state_dict(state, strict=False)


for _name in CHANNELS:
    ENCODERS[_name] = lambda output_stride=16, pretrained=None, _n=_name: ResNetEncoder(_n, output_stride, pretrained)
