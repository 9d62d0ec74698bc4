"""Losing at most a few steps: step checkpoints (--checkpoint-every) and the exact resume inside
an epoch, for the folder source and for shards, with several loader workers.

A run is interrupted by a read error in the middle of its second epoch (the failure kind
"exception in a loader worker"); the same command with --resume continues from the last step
checkpoint. It must train exactly what the uninterrupted run trained: the same batches from
that step on (checked sample for sample on the loaders), the same LR at every step, and the same
weights and metrics at the end (the CPU is deterministic here: equal to float rounding).
"""

from __future__ import annotations

import math
import time
from unittest import mock

import pytest
import torch

from mtl.checkpoint import CheckpointIndex, FolderStorage
from mtl.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig
from mtl.data.build import build_loaders
from mtl.data.folder import MiniscapesFolder
from mtl.data.loader import EpochSampler
from mtl.data.shards import ShardStream
from mtl.engine import fit, local_runtime
from mtl.runs import run_url

EPOCHS, STEPS, EVERY, BATCH = 2, 8, 3, 4
# the read error hits the first sample of the second epoch's 6th batch (global step 14): the
# last step checkpoint before it is step 12's, so steps 13.. are trained again
FAIL_EPOCH, FAIL_BATCH, LAST_CHECKPOINT = 1, 5, "epoch-0001-step-00000012"


@pytest.fixture(autouse=True)
def _forked_loader_workers(worker_start):
    """These tests patch read errors into the dataset classes of this process: the loader
    workers must be forked from it to see them (not started by a fork server, which imports the
    classes afresh: `mtl.data.loader.worker_start_kwargs`)."""
    worker_start("fork")


def config(data: DataConfig, out, resume: bool = False) -> ExperimentConfig:
    return ExperimentConfig(
        data=data, model=ModelConfig(arch="deeplabv3p", encoder="resnet18"), optim=OptimConfig(lr=1e-3),
        train=TrainConfig(epochs=EPOCHS, batch_size=BATCH, max_steps_per_epoch=STEPS, checkpoint_every=EVERY, out=str(out),
                          name="run", device="cpu", log_every=100, resume=resume),
    ).validate()


def epoch_indices(cfg: ExperimentConfig, epoch: int, skip: int = 0) -> list[list[int]]:
    """The sample indices of each train batch of ``epoch`` from batch ``skip`` on, as the loader deals them."""
    loader = build_loaders(cfg).train
    loader.set_epoch(epoch, skip)
    return [b["index"].tolist() for _, b in zip(range(STEPS - skip), loader)]


def interrupted_then_resumed(cfg_of, tmp_path, break_reading):
    """Run A straight through; run B broken by ``break_reading(index)`` (a context manager making
    the read of sample ``index`` fail), then resumed. Returns (A's result, B's resumed result, B's folder)."""
    straight = fit(cfg_of(tmp_path / "a"), local_runtime(cfg_of(tmp_path / "a")))
    target = epoch_indices(cfg_of(tmp_path / "probe"), FAIL_EPOCH)[FAIL_BATCH][0]
    broken = cfg_of(tmp_path / "b")
    publish = FolderStorage.publish

    def slow(self, folder, tag, metrics):
        if tag == LAST_CHECKPOINT:  # still being written when the read fails
            time.sleep(3)
        if tag == "epoch-0000-step-00000003":  # still being written when the next one is due, 3 steps later
            time.sleep(6)
        publish(self, folder, tag, metrics)

    with break_reading(target), mock.patch.object(FolderStorage, "publish", slow), pytest.raises(OSError, match="simulated read error"):
        fit(broken, local_runtime(broken))
    # the failed run waited for it: it is whole, and the latest
    assert CheckpointIndex(run_url(broken)).latest_tag() == LAST_CHECKPOINT
    log = open(f"{run_url(broken)}/train.log").read()
    assert f"step checkpoint {LAST_CHECKPOINT} (" in log and f"checkpoint {LAST_CHECKPOINT} written in the background" in log
    assert "s of it waiting for the previous one's write: a larger --checkpoint-every" in log.split("epoch-0000-step-00000006 (")[1]
    again = cfg_of(tmp_path / "b", resume=True)
    return straight, fit(again, local_runtime(again)), again


def check_same_training(straight, resumed) -> None:
    assert [m["epoch"] for m in resumed.metrics] == [2] and resumed.metrics[0]["restarts"] == 1
    assert resumed.lrs == straight.lrs[-(STEPS - FAIL_BATCH + 1):]  # LR for LR, from step 13 on
    a, b = straight.metrics[-1], resumed.metrics[-1]
    for k in ("train_loss", "train_loss_semseg", "train_loss_depth", "miou", "si_log_rmse", "grader"):
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k  # the epoch's mean loss includes the steps before the break
    for (name, x), y in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), rtol=1e-5, atol=1e-6), name


def test_a_loader_skipped_into_an_epoch_deals_the_same_batches(tiny_root):
    """Sample for sample: the batches from batch k on equal the tail of the whole epoch's, with
    2 loader workers (folder: the sampler leaves the first samples out)."""
    cfg = config(DataConfig(root=tiny_root, workers=2), "unused")
    whole = epoch_indices(cfg, 1)
    assert epoch_indices(cfg, 1, skip=5) == whole[5:]
    assert len(build_loaders(cfg).train) == 96 // BATCH  # the epoch's length does not change with a skip


def test_folder_run_resumed_inside_an_epoch_trains_exactly_the_same(tiny_root, tmp_path, monkeypatch):
    import contextlib

    @contextlib.contextmanager
    def break_reading(index):
        read = MiniscapesFolder.__getitem__

        def failing(self, item):  # (the loader workers are forked with it)
            if item == (FAIL_EPOCH, index):
                raise OSError(f"simulated read error at sample {index}")
            return read(self, item)

        with monkeypatch.context() as m:
            m.setattr(MiniscapesFolder, "__getitem__", failing)
            yield

    straight, resumed, cfg = interrupted_then_resumed(
        lambda out, resume=False: config(DataConfig(root=tiny_root, workers=2), out, resume), tmp_path, break_reading)
    check_same_training(straight, resumed)
    log = open(f"{run_url(cfg)}/train.log").read()
    assert f"resumed from {run_url(cfg)}/checkpoints/{LAST_CHECKPOINT}/state.pt: epoch 1, step 12/16 (4 steps into epoch 2)" in log


def test_shard_run_resumed_inside_an_epoch_trains_exactly_the_same(tiny_root, tmp_path, monkeypatch):
    """The same with WebDataset shards and 2 loader workers: the stream is a function of (seed,
    epoch, rank, workers), so the resumed run reads the batches before the position again and
    drops them."""
    import contextlib

    from data_prep.shard import shard_dataset

    shards = str(tmp_path / "shards")
    shard_dataset(tiny_root, shards, "12", splits=("train", "val"), workers=2)
    cfg_of = lambda out, resume=False: config(DataConfig(shards=shards, workers=2), out, resume)  # noqa: E731
    whole = epoch_indices(cfg_of(tmp_path / "p"), 1)
    assert epoch_indices(cfg_of(tmp_path / "p"), 1, skip=5) == whole[5:]

    @contextlib.contextmanager
    def break_reading(index):
        decode = ShardStream._decode

        def failing(self, s):
            out = decode(self, s)
            if self.epoch == FAIL_EPOCH and int(out["index"]) == index:
                raise OSError(f"simulated read error at sample {index}")
            return out

        with monkeypatch.context() as m:
            m.setattr(ShardStream, "_decode", failing)
            yield

    straight, resumed, _ = interrupted_then_resumed(cfg_of, tmp_path, break_reading)
    check_same_training(straight, resumed)


def test_a_shard_run_resumed_with_other_loader_workers_says_its_order_changed(tiny_root, tmp_path, monkeypatch):
    """A shard stream's order is a function of the loader workers too (left to itself their
    number follows the CPUs, which may differ after a restart elsewhere): a resume inside an
    epoch with another number goes on after the same number of samples and says so."""
    from data_prep.shard import shard_dataset

    shards = str(tmp_path / "shards")
    shard_dataset(tiny_root, shards, "12", splits=("train", "val"), workers=2)
    decode = ShardStream._decode

    def failing(self, s):
        out = decode(self, s)
        if self.epoch == 0 and failing.armed and int(out["index"]) == target:
            raise OSError("simulated read error")
        return out

    cfg = config(DataConfig(shards=shards, workers=2), tmp_path).with_values({"train.epochs": 1})
    target, failing.armed = epoch_indices(cfg, 0)[FAIL_BATCH][0], True
    monkeypatch.setattr(ShardStream, "_decode", failing)
    with pytest.raises(OSError, match="simulated read error"):
        fit(cfg, local_runtime(cfg))
    failing.armed = False
    again = config(DataConfig(shards=shards, workers=1), tmp_path, resume=True).with_values({"train.epochs": 1})
    assert [m["epoch"] for m in fit(again, local_runtime(again)).metrics] == [1]
    log = open(f"{run_url(again)}/train.log").read()
    assert ("the checkpoint was written 3 steps into epoch 1 by 1 ranks with 2 loader workers each and this run has 1 with 1 "
            "(--workers fixes the number): the epoch goes on after 3 steps per rank") in log


def test_step_checkpoints_are_kept_like_epoch_ones_and_sweeps_refuse_them(tiny_root, tmp_path, monkeypatch):
    """--keep-last counts step and epoch checkpoints alike; tags sort in the order they were
    written; a step checkpoint writes no metrics file (no validation ran). Each checkpoint is
    committed with the TensorBoard points up to its step already stored (the tracker's thread
    stores them; the commit waits): a run killed right after it resumes from there and logs only
    later steps, so its curves have no gap."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mtl.checkpoint import FolderStorage
    from mtl.distributed.sweep_space import check_space

    stored: dict[str, tuple[int, list[int]]] = {}  # tag -> (last train/loss step, val/miou steps) on disk at its commit
    commit = FolderStorage.commit

    def look_then_commit(self, tag):
        acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0}).Reload()
        val = [e.step for e in acc.Scalars("val/miou")] if "val/miou" in acc.Tags()["scalars"] else []
        stored[tag] = (max(e.step for e in acc.Scalars("train/loss")), val)
        return commit(self, tag)

    monkeypatch.setattr(FolderStorage, "commit", look_then_commit)
    cfg = config(DataConfig(root=tiny_root, workers=0), tmp_path).with_values({"train.log_every": 1})
    fit(cfg, local_runtime(cfg))
    expected = {**{f"epoch-{s // STEPS:04d}-step-{s:08d}": (s, [STEPS] if s > STEPS else []) for s in (3, 6, 9, 12, 15)},
                "epoch-0001": (STEPS, [STEPS]), "epoch-0002": (2 * STEPS, [STEPS, 2 * STEPS])}
    assert stored.keys() == expected.keys()
    for tag, (step, val) in expected.items():  # at least the points up to its step (later ones may be stored already:
        assert stored[tag][0] >= step and stored[tag][1][:len(val)] == val, (tag, stored)  # the next one's sync runs first)
    index = CheckpointIndex(run_url(cfg))
    history = index.read()["history"]
    assert history == sorted(history) and history[-1] == "epoch-0002"
    assert history == ["epoch-0001-step-00000015", "epoch-0002"]  # --keep-last 2
    assert sorted(p.name for p in (tmp_path / "run" / "metrics").iterdir()) == ["epoch-0001.json", "epoch-0002.json"]
    with pytest.raises(ValueError, match="--checkpoint-every-min: sweeps checkpoint at epoch ends only"):
        check_space({}, cfg)


def test_a_time_interval_brings_step_checkpoints(tiny_root, tmp_path, monkeypatch):
    """--checkpoint-every-min: a step checkpoint once that much time has passed since the last
    checkpoint (the clock is made to jump 2 minutes per step: one every 3 steps at 5 minutes)."""
    import itertools

    import mtl.engine

    ticks = itertools.count()
    monkeypatch.setattr(mtl.engine, "monotonic", lambda: 120.0 * next(ticks))
    cfg = config(DataConfig(root=tiny_root, workers=0), tmp_path).with_values(
        {"train.checkpoint_every": 0, "train.checkpoint_every_min": 5.0, "train.epochs": 1, "train.keep_last": 0})
    fit(cfg, local_runtime(cfg))
    history = CheckpointIndex(run_url(cfg)).read()["history"]
    assert history == ["epoch-0000-step-00000003", "epoch-0000-step-00000006", "epoch-0001"]


def test_ranks_of_another_world_size_continue_an_epoch_with_every_sample_once():
    """Elastic training's data position: 2 ranks train 5 steps, 1 rank goes on from there for 4,
    then 3 ranks to the epoch's end. Each sample of the epoch is trained on at most once, and
    only the last incomplete global batch is left out."""
    from mtl.data.loader import EpochSampler

    n, batch, seen, start = 100, 4, [], 0
    for world, steps in ((2, 5), (1, 4), (3, None)):
        shares = []
        for rank in range(world):
            sampler = EpochSampler(n, shuffle=True, seed=3, rank=rank, world=world)
            sampler.set_epoch(1, start=start)
            items = [i for _, i in sampler]
            full = len(items) // batch  # drop_last
            shares.append(items[: batch * (full if steps is None else steps)])
        assert len({len(s) for s in shares}) == 1  # every rank takes the same number of steps
        seen += [i for s in shares for i in s]
        start += sum(len(s) for s in shares)
    assert len(seen) == len(set(seen)) and len(seen) > n - 3 * batch
    same = EpochSampler(n, True, 3, rank=1, world=2)
    same.set_epoch(1, skip=8)  # the same world: a skip of 8 items per rank is position 16
    moved = EpochSampler(n, True, 3, rank=1, world=2)
    moved.set_epoch(1, start=16)
    assert list(same) == list(moved) and len(same) == 50 - 8
    for n, world in ((1, 4), (3, 8)):  # fewer samples than ranks: every rank still gets its share (a repeat), as len() says
        shares = [EpochSampler(n, True, 3, rank=r, world=world) for r in range(world)]
        assert [len(list(x)) for x in shares] == [len(x) for x in shares] == [1] * world


def test_an_elastic_runs_step_checkpoint_goes_on_from_its_position_and_may_leave_no_step(tiny_root, tmp_path, monkeypatch):
    """After ranks of several sizes trained part of an epoch, a step checkpoint's steps of the
    epoch (counted at the last size) say nothing of its position in the epoch's order (samples
    over all ranks): 2 ranks took a step of 8 samples, 1 rank then one of 4, so 12 samples and 1
    step. A resume at the same size goes on from sample 12; from a checkpoint of an earlier
    version, which has no sample counts, at the steps times the batch. One that finds no step
    left of the epoch (more ranks share what was left) validates it, with its stored losses."""
    trained = []
    read = MiniscapesFolder.__getitem__

    def recording(self, item):  # (no loader workers: the items are seen here)
        if self.split == "train":
            trained.append(item)
        if item == (0, failing.get("at")):
            raise OSError("simulated read error")
        return read(self, item)

    monkeypatch.setattr(MiniscapesFolder, "__getitem__", recording)

    def order(epoch: int) -> list[int]:  # the epoch's order of the 96 samples (seed 0)
        sampler = EpochSampler(96, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        return [i for _, i in sampler]

    failing = {}

    def resumed(out, epoch_step: int, epoch_samples: int | None) -> tuple[list, dict]:
        cfg = config(DataConfig(root=tiny_root, workers=0), out).with_values({"train.epochs": 1})
        failing["at"] = order(0)[5 * BATCH]  # the 6th step fails: the last checkpoint is step 3's
        with pytest.raises(OSError, match="simulated read error"):
            fit(cfg, local_runtime(cfg))
        url = f"{run_url(cfg)}/checkpoints/epoch-0000-step-00000003/state.pt"
        state = torch.load(url, weights_only=False)
        sums = state["train_state"]["epoch_loss"]
        state["train_state"].update(step=epoch_step, epoch_step=epoch_step, samples=epoch_samples, epoch_samples=epoch_samples)
        if epoch_samples is None:  # a checkpoint of an earlier version, without the counts
            for key in ("samples", "epoch_samples", "loader_workers", "baselines"):
                del state["train_state"][key]
        torch.save(state, url)
        trained.clear()
        failing.clear()
        again = config(DataConfig(root=tiny_root, workers=0), out, resume=True).with_values({"train.epochs": 1})
        return fit(again, local_runtime(again)).metrics, sums

    metrics, _ = resumed(tmp_path / "a", epoch_step=1, epoch_samples=12)
    read_0 = [i for e, i in trained if e == 0]  # (the prefetcher reads a batch beyond the epoch's last step)
    assert read_0[: 7 * BATCH] == order(0)[12 : 12 + 7 * BATCH] and len(read_0) <= 8 * BATCH  # the 7 steps left, from sample 12
    assert [m["epoch"] for m in metrics] == [1]
    resumed(tmp_path / "old", epoch_step=3, epoch_samples=None)  # counted from the steps: sample 12 again
    read_0 = [i for e, i in trained if e == 0]
    assert read_0[: 5 * BATCH] == order(0)[12 : 12 + 5 * BATCH]
    metrics, sums = resumed(tmp_path / "b", epoch_step=STEPS, epoch_samples=STEPS * BATCH)
    assert [i for e, i in trained if e == 0] == [] and [m["epoch"] for m in metrics] == [1]
    assert len(metrics[0]["epoch_lrs"]) == 3  # (none trained since: the checkpoint's, of the 3 steps before it)
    assert metrics[0]["train_loss"] == pytest.approx(sums[0] / STEPS) and math.isfinite(metrics[0]["lr"])


def test_preemption_polls_also_at_epoch_ends_and_a_notice_checkpoints_after_every_step(tiny_root, tmp_path):
    """--preemption-poll-every (on Ray: `ray.train.get_preemption_info`, here a stand-in): a poll
    interval that the steps per epoch divide still polls (every poll step is an epoch's last); once
    a notice came, every later step brings a checkpoint, an epoch's last too: its validation may
    outlast the notice."""
    import dataclasses
    from types import SimpleNamespace

    def run(name: str, poll_every: int, notice_from: int) -> tuple[int, list[str]]:
        polls = []
        cfg = config(DataConfig(root=tiny_root, workers=0), tmp_path).with_values(
            {"train.name": name, "train.max_steps_per_epoch": 4, "train.batch_size": 2, "train.checkpoint_every": 0,
             "train.preemption_poll_every": poll_every, "train.keep_last": 0})

        def poll():
            polls.append(1)
            return SimpleNamespace(preempted_node_ids=["n1"]) if len(polls) >= notice_from else None

        fit(cfg, dataclasses.replace(local_runtime(cfg), preemption=poll))
        return len(polls), CheckpointIndex(run_url(cfg)).read()["history"]

    polls, history = run("at-the-end", poll_every=4, notice_from=1)  # the first poll is at the epoch's last step
    assert polls == 1 and history[:2] == ["epoch-0000-step-00000004", "epoch-0001"]  # (the old loop never polled here)
    polls, history = run("notice", poll_every=2, notice_from=1)
    assert polls == 1  # at step 2; the first notice holds: not asked again
    assert history == ["epoch-0000-step-00000002", "epoch-0000-step-00000003", "epoch-0000-step-00000004", "epoch-0001",
                       "epoch-0001-step-00000005", "epoch-0001-step-00000006", "epoch-0001-step-00000007",
                       "epoch-0001-step-00000008", "epoch-0002"]
    # from the notice on, a commit waits for no tracking server (a slow MLflow would outlast the node)
    from mtl.checkpoint import Checkpointer

    waits, save = [], Checkpointer.save

    def recording(self, tag, *args, after=None, **kw):
        waits.append((tag, after is not None))
        return save(self, tag, *args, after=after, **kw)

    Checkpointer.save = recording
    try:
        run("tracked", poll_every=2, notice_from=3)  # (polls at steps 2, 4 and 6: the notice at 6)
    finally:
        Checkpointer.save = save
    assert waits == [("epoch-0001", True), ("epoch-0001-step-00000006", False), ("epoch-0001-step-00000007", False),
                     ("epoch-0001-step-00000008", False), ("epoch-0002", False)]


def test_a_resume_at_an_epochs_end_reports_the_lr_its_last_step_had_and_logs_each_point_once(tiny_root, tmp_path, monkeypatch):
    """A notice at an epoch's last step checkpoints it before validation; the node goes after the
    validation was logged, before the epoch's checkpoint, and the resume finds no step of the
    epoch left. Its metrics carry the LR of the epoch's last step (the checkpoint's), not the next
    step's (0 after a run's last), and no throughput, which this attempt did not measure (not 0
    img/s). TensorBoard shows the epoch's validation and its last step's loss once each: the
    earlier attempt's, logged at the same step, are hidden."""
    import dataclasses
    from types import SimpleNamespace

    import mtl.engine
    from test_tracking import _points, _read

    cfg = config(DataConfig(root=tiny_root, workers=0), tmp_path).with_values(
        {"train.epochs": 1, "train.max_steps_per_epoch": 4, "train.batch_size": 2, "train.checkpoint_every": 0,
         "train.preemption_poll_every": 4, "train.log_every": 1})
    checkpoint = mtl.engine.Trainer._checkpoint

    def node_gone(self, kind, *a, **k):
        if kind == "epoch":
            raise RuntimeError("node gone before the epoch's checkpoint")
        return checkpoint(self, kind, *a, **k)

    monkeypatch.setattr(mtl.engine.Trainer, "_checkpoint", node_gone)
    with pytest.raises(RuntimeError, match="node gone"):
        fit(cfg, dataclasses.replace(local_runtime(cfg), preemption=lambda: SimpleNamespace(preempted_node_ids=["n1"])))
    last = torch.load(f"{run_url(cfg)}/checkpoints/epoch-0000-step-00000004/state.pt", weights_only=True)["metrics"]["lr"]
    monkeypatch.setattr(mtl.engine.Trainer, "_checkpoint", checkpoint)
    again = cfg.with_values({"train.resume": True})
    metrics = fit(again, local_runtime(again)).metrics
    assert metrics[0]["lr"] == last > 0 and math.isnan(metrics[0]["train_images_per_s"])
    assert len(metrics[0]["epoch_lrs"]) == 4 and metrics[0]["epoch_lrs"][-1] == last  # (the steps before the resume: its checkpoint's)
    events = _read(f"{run_url(cfg)}/tb")
    assert [step for step, _ in _points(events, "val/miou")] == [4]
    assert [step for step, _ in _points(events, "train/loss")] == [1, 2, 3, 4]
    assert _points(events, "train/lr")[-1] == (4, pytest.approx(last))


def test_a_step_checkpoint_of_several_ranks_keeps_their_mean_loss_sums():
    """Only rank 0's state.pt is kept, and every rank restores it: what it stores of the epoch's
    loss sums is the ranks' mean, so that each rank's later steps add to the same share of the
    earlier ones and DWA's epoch means (all-reduced at the epoch's end) are those of the run
    without the resume. Two ranks; the other's sums are [4, 2, 2]."""
    from types import SimpleNamespace

    from mtl.checkpoint import TrainState
    from mtl.engine import Trainer

    class TwoRanks:
        def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
            return t + torch.tensor([4.0, 2.0, 2.0])

    state, saved = TrainState(step=2, epoch_step=2), {}
    trainer = SimpleNamespace(state=state, strategy=TwoRanks(), rt=SimpleNamespace(world=2), tracker=None,
                              _check_finite_weights=lambda *a: None, _checkpoint=lambda kind, tag, metrics, **kw: saved.update(metrics))
    running = torch.tensor([2.0, 1.0, 1.0])
    Trainer._save_inside_epoch(trainer, running, [0.2, 0.1])
    assert state.epoch_loss == [3.0, 1.5, 1.5] and saved["train_loss"] == 1.5  # (the mean per step: 3 / 2)
    assert (state.lr, state.epoch_lrs, saved["lr"]) == (0.1, [0.2, 0.1], 0.1)
    assert running.tolist() == [2.0, 1.0, 1.0]  # this rank's own sums go on as they were


_TWO_RANKS_BUFFERS = """
import os, sys, torch, torch.distributed as dist
from mtl.strategy import PlainStrategy
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=rank, world_size=2)
m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
torch.manual_seed(0)
m[0].weight.data.normal_()  # the same weights on both ranks ...
m.train()(torch.randn(2, 3, 8, 8) * (rank + 1))  # ... BatchNorm's statistics from each rank's own batch
PlainStrategy(m, torch.optim.SGD(m.parameters(), lr=0.1)).sync_buffers()
print(m[1].running_mean.tolist(), m[1].running_var.tolist(), int(m[1].num_batches_tracked))
sys.stdout.flush()
os._exit(0)  # (gloo's teardown aborts now and then once the other rank has left: "terminate called without an active exception")
"""


def test_ranks_validate_and_checkpoint_one_model(tmp_path):
    """Before validation every rank takes rank 0's buffers (BatchNorm's running statistics,
    which DeepSpeed never synchronises): the ranks' metrics and rank 0's checkpoint then
    describe one model. Two gloo ranks."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _TWO_RANKS_BUFFERS, str(r), str(tmp_path / "store")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0] and outs[0][0].strip().endswith(" 1"), outs


def test_the_eta_after_a_resume_inside_an_epoch_times_only_the_steps_trained_since(monkeypatch):
    """Resumed at step 6 of a 10-step epoch, 24 steps of the run left: 2 steps in 4 s are 2 s a
    step, so 2 steps are left in the epoch (4 s) and 22 in the run (44 s); not 8 steps in 4 s."""
    import io

    from rich.console import Console

    import mtl.progress as progress
    from mtl.progress import RunLog, TrainProgress

    from types import SimpleNamespace

    clock = iter([100.0, 104.0])  # (this module's clock only: time.monotonic stays everyone else's)
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    out = io.StringIO()
    bar = TrainProgress(RunLog(None, Console(file=out, width=300)), interval_s=0)
    bar.start_epoch(1, 3, 10, 24, first_step=6)
    bar.update(8, [1.0, 1.0, 1.0], 5.0, 1e-3)
    assert "step 8/10 (80%)" in out.getvalue() and "ETA epoch 0:00:04, run 0:00:44" in out.getvalue(), out.getvalue()


def test_the_runs_eta_counts_the_steps_at_this_world_size():
    """An elastic run planned for 2 ranks that goes on with 1 takes twice the plan's steps per
    epoch: the ETA counts those (the plan's ``total_steps - step`` would reach 0 half-way)."""
    from types import SimpleNamespace

    from mtl.checkpoint import TrainState
    from mtl.engine import Trainer

    cfg = ExperimentConfig().with_values({"train.epochs": 4, "dist.num_workers": 2})
    state = TrainState(epoch=2, epoch_step=6, step=13, total_steps=40)  # 2 epochs of 10 planned steps at 2 ranks, then 1 rank
    one_rank = SimpleNamespace(cfg=cfg, state=state, steps_per_epoch=20)
    assert Trainer.steps_left(one_rank) == 2 * 20 - 6


def test_a_shard_streams_order_is_recorded_with_the_workers_its_loader_runs():
    """A shard stream's order depends on the loader workers that read it: with few samples per
    rank the training loader runs fewer than asked, and a checkpoint records (and a resume
    compares) that number, not the one asked for."""
    from types import SimpleNamespace

    from mtl.data.shards import ShardLoader, ShardSplit, ShardStream
    from mtl.engine import Trainer

    loader = ShardLoader(ShardStream(ShardSplit(("a.tar", "b.tar", "c.tar"), (10, 10, 10)), None), 4, 4, 2, True, False)
    assert Trainer._order_workers(SimpleNamespace(data=SimpleNamespace(workers=4, train=loader))) == loader.workers == 2


def test_a_failure_during_validation_trains_none_of_the_epoch_again(tiny_root, tmp_path, monkeypatch):
    """A step checkpoint due at an epoch's last step is taken, though the epoch's own follows the
    validation: a failure during the validation then costs the validation only."""
    import mtl.engine

    cfg = ExperimentConfig(data=DataConfig(root=tiny_root, workers=0), model=ModelConfig(arch="deeplabv3p", encoder="resnet18"),
                           train=TrainConfig(epochs=1, batch_size=4, max_steps_per_epoch=4, checkpoint_every=2, out=str(tmp_path),
                                             name="run", device="cpu", log_every=100)).validate()
    evaluate = mtl.engine.rt_evaluate

    def lost(*args, **kwargs):
        raise OSError("node lost during validation")

    monkeypatch.setattr(mtl.engine, "rt_evaluate", lost)
    with pytest.raises(OSError, match="node lost during validation"):
        fit(cfg, local_runtime(cfg))
    assert CheckpointIndex(run_url(cfg)).latest_tag() == "epoch-0000-step-00000004"
    monkeypatch.setattr(mtl.engine, "rt_evaluate", evaluate)
    again = cfg.with_values({"train.resume": True})
    result = fit(again, local_runtime(again))
    assert result.lrs == [] and [m["epoch"] for m in result.metrics] == [1]  # validated, no step trained again


@pytest.mark.parametrize("world,epoch_step,cap,left,said", [
    # 2 ranks of batch 4 x 2 took a step (16 samples); on 3 ranks the 21 left are under a step of 24
    (3, 1, None, 0, "with 0 steps per rank left: no sample twice; its last 21 samples, fewer than a step of 3 ranks"),
    (1, 1, None, 2, "with 2 steps per rank left: no sample twice; its last 5 samples"),
    # an epoch capped at 1 step was done at its cap: none more on more ranks, or on fewer
    (3, 1, 1, 0, "with 0 steps per rank left"),
    (1, 1, 1, 0, "with 0 steps per rank left"),
])
def test_ranks_of_another_number_continue_an_epoch_saying_what_they_leave_out(world, epoch_step, cap, left, said):
    """`Trainer._continue_inside_epoch` on a stand-in: a checkpoint of 2 ranks, 37 samples,
    batch 4, 2 accumulation steps (16 samples a step), resumed on ``world`` ranks."""
    from types import SimpleNamespace

    from mtl.checkpoint import TrainState
    from mtl.data.build import FolderLoader
    from mtl.engine import Trainer

    said_lines = []
    batch, accum, n = 4, 2, 37
    per_epoch = n // world // batch // accum if cap is None else min(cap, n // world // batch // accum)
    stand_in = SimpleNamespace(
        state=TrainState(epoch=0, step=epoch_step, epoch_step=epoch_step, epoch_samples=epoch_step * 2 * batch * accum, world=2,
                         loader_workers=0, epoch_loss=[1.0, 0.5, 0.5]),
        rt=SimpleNamespace(world=world), data=SimpleNamespace(train=FolderLoader.__new__(FolderLoader), num_train=n, workers=0),
        cfg=SimpleNamespace(train=SimpleNamespace(batch_size=batch, grad_accum=accum, max_steps_per_epoch=cap)),
        steps_per_epoch=max(per_epoch, 1), global_batch=batch * accum * world, log=said_lines.append, start=None,
        _order_workers=lambda: 0)
    Trainer._continue_inside_epoch(stand_in)
    assert stand_in.steps_per_epoch - stand_in.state.epoch_step == left
    assert said in said_lines[0], said_lines
