"""The training and validation hot paths never make the host wait for the device.

On a GPU a host read of a device value (``.item()``, boolean indexing, ...) stalls the CPU until
the queue drains, so the next step cannot be queued behind the current one. These checks run on
the CPU: `OpRecorder` records every ATen op the step dispatches, and a sync-type op fails them.
"""

from __future__ import annotations

import pytest
import torch

from mtl.config import ExperimentConfig, ModelConfig, OptimConfig
from mtl.data.batch import DeviceBatches, to_model_batch
from mtl.data.packed import pack_collate
from mtl.data.transforms import CROP_KEYS, Augment, draw_crop, sample_rng
from mtl.engine import autocast, build_optimizer, predict, train_step
from mtl.losses import DepthCodec
from mtl.metrics import MultiTaskMetrics
from mtl.models import build_model
from mtl.opcount import OpRecorder
from mtl.strategy import PlainStrategy
from mtl.weighting import build_weighting


def loader_batch(n: int = 2, h: int = 64, w: int = 128, augment: bool = True) -> dict[str, torch.Tensor]:
    """What the loaders yield: uint8 rgb NHWC, class ids (255 = ignore), disparity codes (0 = invalid)
    and, for training, each sample's crop vectors."""
    g = torch.Generator().manual_seed(0)
    semseg = torch.randint(0, 19, (n, h, w), generator=g, dtype=torch.uint8)
    semseg[:, -4:] = 255
    codes = torch.randint(0, 256, (n, h, w), generator=g, dtype=torch.uint8)
    batch = {"rgb": torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8), "semseg": semseg, "disparity": codes}
    if augment:
        crops = [draw_crop(h, w, Augment(0.8, 1.25, None, True), sample_rng(0, 0, i)) for i in range(n)]
        batch.update({k: torch.stack([c[k] for c in crops]) for k in CROP_KEYS})
    return batch


@pytest.mark.parametrize("arch,optimizer,grad_accum,weighting", [("branched", "adam", 1, "famo"), ("distillation", "sgd", 2, "uncertainty"),
                                                                  ("branched", "adam", 1, "fixed")])
def test_train_steps_queue_without_host_syncs(arch, optimizer, grad_accum, weighting):
    """Learned task weights included: their update is device work too (`mtl.weighting`)."""
    cfg = ExperimentConfig(model=ModelConfig(arch=arch, encoder="resnet18"),
                           optim=OptimConfig(optimizer=optimizer, grad_clip=1.0, task_weighting=weighting))
    cpu = torch.device("cpu")
    model = build_model(cfg.model).to(memory_format=torch.channels_last)
    strategy = PlainStrategy(model, build_optimizer(model, cfg), grad_accum, cfg.optim.grad_clip)
    weights = build_weighting(cfg.optim)
    weights_before = weights.weights().clone()
    running = torch.zeros(3)
    params_before = [p.detach().clone() for p in model.parameters()]
    for step in range(2):  # the second step runs with optimizer state (Adam's step counters)
        with OpRecorder() as rec:
            for k in range(grad_accum):  # what `fit` does per optimizer step
                batch = to_model_batch(loader_batch(), cpu, channels_last=True)
                parts = train_step(strategy, batch, DepthCodec("log"), weights, autocast(cpu, True), last_micro_batch=k == grad_accum - 1)
                running += torch.stack([parts["loss"], parts["loss_semseg"], parts["loss_depth"]]) / grad_accum
        assert rec.host_syncs() == {}, f"step {step} reads device values on the host: {rec.host_syncs()}"
        assert rec.total > 100  # the recorder saw the whole step
    assert any(not torch.equal(a, b) for a, b in zip(params_before, model.parameters()))  # and it did update
    assert torch.equal(weights.weights(), weights_before) == (weighting == "fixed")  # learned weights moved
    assert torch.isfinite(running).all()


@pytest.mark.parametrize("read,seen", [
    (lambda t: float(t.sum()), "aten._local_scalar_dense"),  # the classic logging mistake
    (lambda t: t.tolist(), "Tensor.tolist"),
    (lambda t: t.cpu(), "Tensor.cpu"),
    (lambda t: t.numpy(), "Tensor.numpy"),
    (lambda t: t[t > 0], "boolean-mask index"),  # (on the CPU its nonzero runs inside the index kernel)
    (lambda t: t.__setitem__(t > 0, 0.0), "boolean-mask index"),
    (lambda t: t.nonzero(), "aten.nonzero"),
], ids=["float", "tolist", "cpu", "numpy", "mask-read", "mask-write", "nonzero"])
def test_recorder_catches_each_kind_of_host_read(read, seen):
    """The check can fail: every way a step could read a device value on the host is seen on
    the CPU too, where several of them dispatch no reading op (`mtl.opcount`)."""
    t = torch.tensor([1.0, -2.0, 3.0])
    with OpRecorder() as rec:
        read(t)
    assert seen in rec.host_syncs(), rec.ops
    with OpRecorder() as rec:
        t.mul(2).sum()
    assert rec.host_syncs() == {}


def test_a_training_epoch_reads_the_device_only_at_its_log_steps(tiny_root, tmp_path):
    """The loop around the step (`Trainer.train_epoch`: the LR, the running losses, the readout,
    the checkpoint test) reads nothing more: the host reads once per ``--log-every`` steps and
    at the epoch's end (12 steps, every 5th: steps 5, 10 and 12). The one other read is the
    validation loader's seed, which ``iter(DataLoader)`` draws on the CPU (no device involved)."""
    from mtl.config import DataConfig, TrainConfig
    from mtl.engine import Trainer, fit, local_runtime

    recorders = []
    train_epoch = Trainer.train_epoch

    def recorded(self, *args, **kwargs):
        with OpRecorder() as rec:
            out = train_epoch(self, *args, **kwargs)
        recorders.append(rec)
        return out

    cfg = ExperimentConfig(data=DataConfig(root=tiny_root, workers=1), model=ModelConfig(arch="deeplabv3p", encoder="resnet18"),
                           train=TrainConfig(epochs=1, batch_size=8, out=str(tmp_path), device="cpu", log_every=5)).validate()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_epoch", recorded)
        fit(cfg, local_runtime(cfg))
    (rec,) = recorders
    assert rec.host_syncs() == {"Tensor.tolist": 3, "aten._local_scalar_dense": 1}, rec.host_syncs()
    assert rec.total > 12 * 100  # the recorder saw the epoch's steps


def test_validation_batches_queue_without_host_syncs():
    cfg = ExperimentConfig(model=ModelConfig(arch="deeplabv3p", encoder="resnet18"))
    cpu = torch.device("cpu")
    model = build_model(cfg.model).eval()
    raw = loader_batch(augment=False)
    raw["disparity"][0] = 0  # an image without valid depth: skipped by weighting, not by indexing
    with OpRecorder() as rec:
        metrics = MultiTaskMetrics()
        batch = to_model_batch(raw, cpu)
        metrics.update(*predict(model, batch["rgb"], DepthCodec("log"), autocast(cpu, True)), batch)
    assert rec.host_syncs() == {}, rec.host_syncs()
    assert metrics.compute()["num_depth_images"] == 1


def test_device_batches_start_lazily_and_convert_every_loader_batch():
    """The train loop's prefetcher: creating it pulls nothing from the loader (so the next
    epoch's iterator can be made before validation), then it yields every batch, converted."""
    pulled = []

    def loader():
        for i in range(3):
            pulled.append(i)
            yield loader_batch()

    batches = DeviceBatches(loader(), torch.device("cpu"))
    assert pulled == []
    out = list(batches)
    assert pulled == [0, 1, 2] and len(out) == 3
    ref = to_model_batch(loader_batch(), torch.device("cpu"))
    assert all(torch.equal(out[0][k], ref[k]) for k in ref)


def test_a_packed_loader_batch_converts_without_host_syncs():
    """The loaders' packed batches (`mtl.data.packed`): one copy, then views; ``index`` stays on
    the host."""
    raw = {**loader_batch(), "index": torch.tensor([7, 9])}
    packed = pack_collate([{k: v[i] for k, v in raw.items()} for i in range(2)])
    with OpRecorder() as rec:
        batch = to_model_batch(packed, torch.device("cpu"))
    assert rec.host_syncs() == {}, rec.host_syncs()
    ref = to_model_batch(raw, torch.device("cpu"))
    assert sorted(batch) == sorted(ref) and all(torch.equal(batch[k], ref[k]) for k in ref)
