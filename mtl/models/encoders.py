"""ResNet encoders (torchvision definitions) with dilation instead of striding in the last stages,
optionally starting from ImageNet weights: ``imagenet`` (torchvision's own weights, through its
weights API and torch hub's cache) or a file at any fsspec URL (a mirror for clusters without
internet: `jobs/pretrained.py` puts torchvision's files there)."""

from __future__ import annotations

import io
import os

import fsspec
import torch
import torchvision
from torch import nn

from mtl.models.registry import ENCODERS
from mtl.storage import StorageError, storage_errors

# name -> (channels at stride 2, at stride 4, at the bottleneck)
CHANNELS = {"resnet18": (64, 64, 512), "resnet34": (64, 64, 512), "resnet50": (64, 256, 2048)}


class ResNetEncoder(nn.Module):
    """Returns {"2x", "4x", "out"} features. ``output_stride`` 32 = plain striding; 16 dilates the
    last stage, 8 the last two (the report's "dilation" encoders; needed for vortex pooling).
    ``dilated_convs``: which 3x3 convs of a dilated stage are dilated (`dilate_stage`)."""

    def __init__(self, name: str, output_stride: int = 16, pretrained: str | None = None,
                 dilated_convs: str = "second") -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        net = getattr(torchvision.models, name)(weights=None, zero_init_residual=True)
        # (source, tensors loaded) when the weights came from ImageNet: `describe_pretrained`
        self.pretrained: tuple[str, int] | None = None
        if pretrained:
            source = imagenet_file(name) if pretrained == IMAGENET else pretrained
            self.pretrained = (source, load_pretrained(net, source))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.pool = net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if output_stride == 8:
            dilate_stage(self.layer3, 2, dilated_convs)
        if output_stride <= 16:
            dilate_stage(self.layer4, 2 if output_stride == 16 else 4, dilated_convs)
        self.channels = dict(zip(("2x", "4x", "out"), CHANNELS[name]))
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f2 = self.stem(x)
        f4 = self.layer1(self.pool(f2))
        out = self.layer4(self.layer3(self.layer2(f4)))
        return {"2x": f2, "4x": f4, "out": out}


def dilate_stage(layer: nn.Sequential, dilation: int, convs: str = "second") -> None:
    """Turn a strided ResNet stage into a dilated one (same weights, same parameter count).

    ``convs="second"`` dilates each block's second conv (its 3x3 conv2: the only 3x3 of a
    Bottleneck) and leaves a BasicBlock's conv1 at 1. That is the course skeleton's encoder, so
    the report's models: its ``BasicBlockWithDilation`` passes the dilation to conv2 only, its
    blocks come from torchvision's ``replace_stride_with_dilation`` (a stage's first block at the
    previous stage's dilation, the rest at the stage's), and it then sets the first block's conv2
    to 2 (in the stages dilated here, 2 is the previous stage's dilation or the stage's own).
    ``convs="all"`` dilates every 3x3 conv of the stage at its dilation: what streetmtl did before
    2026-11-30 (a larger receptive field); runs trained that way keep it (``--dilated-convs all``,
    `mtl.runs.LATER_FIELDS`). torchvision itself refuses dilation in BasicBlocks, hence this
    function.
    """
    for i, block in enumerate(layer):
        for m in block.modules():
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                m.stride = (1, 1)
        targets = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        if convs == "second":
            targets, d = [block.conv2], (2 if i == 0 else dilation)
        elif convs == "all":
            d = dilation
        else:
            raise ValueError(f"--dilated-convs must be one of second, all; got {convs!r}")
        for m in targets:
            m.dilation, m.padding = (d, d), (d, d)


IMAGENET = "imagenet"  # --pretrained imagenet: torchvision's default ImageNet weights of the encoder


def imagenet_weights(name: str) -> torchvision.models.WeightsEnum:
    """torchvision's default ImageNet weights of encoder ``name`` (its weights API: URL, file name, metrics)."""
    return torchvision.models.get_model_weights(name).DEFAULT


def imagenet_cache_path(name: str) -> str:
    """Where torch hub's cache keeps that file (``$TORCH_HOME/hub/checkpoints/<file>``), as
    torchvision's own ``weights.get_state_dict()`` does."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(imagenet_weights(name).url))


def imagenet_file(name: str, mirroring: bool = False) -> str:
    """The cached file of encoder ``name``'s ImageNet weights, downloaded once (its hash checked
    against the file name, as torch hub does) when it is not there yet. ``mirroring``: the
    caller is jobs/pretrained.py (its error then says how to get the file here)."""
    path, url = imagenet_cache_path(name), imagenet_weights(name).url
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    match = torch.hub.HASH_REGEX.search(os.path.basename(path))
    try:  # (writes a temporary file and renames it: never a half file in the cache)
        torch.hub.download_url_to_file(url, path, hash_prefix=match.group(1) if match else None, progress=False)
    except Exception as e:  # noqa: BLE001 - no network, a proxy, a bad download: one message
        missing = (f"{imagenet_weights(name)} is not in torch hub's cache ({path}) and could not be downloaded from {url} "
                   f"({type(e).__name__}: {e})")
        if mirroring:
            raise FileNotFoundError(f"{missing}. Download that URL on a machine with internet, copy the file to {path} "
                                    f"here, and run this again") from e
        raise FileNotFoundError(
            f"--pretrained imagenet: {missing}. Without internet, copy that file there, or put it on a mirror all nodes "
            f"read (python jobs/pretrained.py --to s3://bucket/weights {name}) and pass its URL to --pretrained") from e
    return path


def load_pretrained(net: nn.Module, path: str) -> int:
    """Load torchvision-format ImageNet weights from a local path or fsspec URL (e.g. s3://);
    returns how many tensors were loaded.

    The classifier (fc.*) is ignored; anything else that does not fit is an error naming the file.
    """
    try:
        with storage_errors(path), fsspec.open(path, "rb") as fh:
            state = torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)
    except StorageError:  # (unreachable, no credentials, no client: it says so, naming the URL)
        raise
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
    # (torchvision's ImageNet files predate BatchNorm's num_batches_tracked; it starts at 0 anyway)
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
            f"wrong shapes {wrong[:3]}" if wrong else "",
        ]))
        raise ValueError(f"pretrained encoder weights {path} do not fit this encoder: {detail}")
    net.load_state_dict(state, strict=False)
    return len(state)


def describe_pretrained(model: nn.Module) -> str | None:
    """One line for the run log: which tensors came from ImageNet weights and which start from
    scratch (context modules, decoders, heads). None when nothing was pretrained."""
    loaded = [m.pretrained for m in model.modules() if isinstance(m, ResNetEncoder) and m.pretrained]
    if not loaded:
        return None
    # (BatchNorm's step counters are not weights: left out of both counts)
    fresh = [k for k in model.state_dict() if not k.startswith("encoder.") and not k.endswith("num_batches_tracked")]
    parts = sorted({".".join(k.split(".")[:3]) for k in fresh})
    return (f"encoder weights from {loaded[0][0]}: {sum(n for _, n in loaded)} tensors loaded, the whole encoder (the "
            f"file's classifier dropped); {len(fresh)} tensors start from scratch ({', '.join(parts) or 'none'})")


for _name in CHANNELS:
    ENCODERS[_name] = (lambda output_stride=16, pretrained=None, dilated_convs="second", _n=_name:
                       ResNetEncoder(_n, output_stride, pretrained, dilated_convs))
