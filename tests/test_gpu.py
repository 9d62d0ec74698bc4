"""CUDA-only checks (pytest -m gpu). Without a GPU they are reported as skipped."""

import pytest
import torch

from mtl.config import ARCHS, ModelConfig
from mtl.data.miniscapes import NUM_CLASSES
from mtl.engine import autocast, build_optimizer, train_step
from mtl.losses import DepthCodec
from mtl.models import build_model
from mtl.strategy import PlainStrategy

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_channels_last_train_step_on_cuda(arch):
    from mtl.config import ExperimentConfig

    device = torch.device("cuda")
    model = build_model(ModelConfig(arch=arch, encoder="resnet34")).to(device).to(memory_format=torch.channels_last)
    opt = build_optimizer(model, ExperimentConfig())
    assert opt.defaults.get("fused")  # fused Adam on CUDA
    batch = {"rgb": torch.randn(4, 3, 256, 512, device=device).contiguous(memory_format=torch.channels_last),
             "semseg": torch.randint(0, NUM_CLASSES, (4, 256, 512), device=device),
             "depth": torch.rand(4, 256, 512, device=device) * 50 + 4, "valid": torch.ones(4, 256, 512, dtype=torch.bool, device=device)}
    strategy = PlainStrategy(model, opt)
    losses = [float(train_step(strategy, batch, DepthCodec("log"), 0.5, autocast(device, True))["loss"]) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
