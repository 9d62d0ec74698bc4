"""CUDA-only checks (pytest -m gpu). Without a GPU they are reported as skipped."""

import pytest
import torch

from mtl.config import ModelConfig
from mtl.data.miniscapes import NUM_CLASSES
from mtl.engine import autocast, build_optimizer, train_step
from mtl.losses import DepthCodec
from mtl.models import ARCHITECTURES, build_model
from mtl.strategy import PlainStrategy

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ARCHITECTURES.names)
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


def test_device_batches_on_a_side_stream_equal_direct_conversion(tiny_root):
    """The prefetcher copies and augments on a side stream; every batch must equal the same
    conversion done directly on the compute stream."""
    from mtl.data.batch import DeviceBatches, to_model_batch
    from mtl.data.folder import MiniscapesFolder
    from mtl.data.loader import make_loader
    from mtl.data.transforms import Augment

    device = torch.device("cuda")
    ds = MiniscapesFolder(tiny_root, "train", Augment(0.9, 1.25, (48, 96), True), seed=1)
    raws = list(make_loader(ds, 8, True, 1, 2, 2, pin_memory=True))
    got = list(DeviceBatches(iter(raws), device))
    assert len(got) == len(raws)
    for raw, b in zip(raws, got):
        ref = to_model_batch(raw, device)
        for k in ("rgb", "semseg", "depth", "valid"):
            assert torch.equal(b[k], ref[k]), k


def test_local_training_on_cuda_end_to_end(tiny_root, tmp_path):
    """`jobs/train.py --local` on one GPU: pinned batches, device augmentation, the prefetcher,
    bf16, sync-free metrics, checkpoints."""
    from mtl.config import DataConfig, ExperimentConfig, TrainConfig
    from mtl.engine import fit, local_runtime

    cfg = ExperimentConfig(data=DataConfig(root=tiny_root, workers=2), model=ModelConfig(arch="distillation", encoder="resnet18"),
                           train=TrainConfig(epochs=2, batch_size=8, max_steps_per_epoch=6, out=str(tmp_path), device="cuda",
                                             log_every=3)).validate()
    result = fit(cfg, local_runtime(cfg))
    last = result.metrics[-1]
    assert len(result.metrics) == 2 and torch.isfinite(torch.tensor([last["train_loss"], last["miou"], last["si_log_rmse"]])).all()
    assert last["num_depth_images"] == 24 and last["train_images_per_s"] > 0
    from mtl.runs import run_name

    assert (tmp_path / run_name(cfg) / "checkpoints").is_dir()
