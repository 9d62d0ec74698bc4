"""Checkpoints hold tensors and plain data only: a file that carries code is refused, not run."""

import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future

import pytest
import torch

from mtl.checkpoint import FORMAT, checkpoint_bytes, load_checkpoint, rng_state, set_rng_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunsCode:
    """Unpickling this calls os.system: what a planted checkpoint in a shared bucket would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, in_process):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "model": {}, "config": {}, "payload": RunsCode(str(marker))}, path)
    with pytest.raises(ValueError, match=r"checkpoint .*evil.pt holds Python objects besides tensors and plain data; refused"):
        load_checkpoint(str(path))
    from jobs.evaluate import main

    r = in_process(main, ["--checkpoint", str(path)])
    assert r.returncode == 2 and "refused, since loading it could run code" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_deepspeed_files_are_read_safely_too(tmp_path):
    from mtl.distributed.deepspeed_strategy import safe_deepspeed_load

    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": RunsCode(str(marker))}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt holds Python objects"):
        safe_deepspeed_load(str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert not marker.exists()


def test_rng_state_survives_a_safe_round_trip(tmp_path):
    import random

    import numpy as np

    (tmp_path / "c.pt").write_bytes(checkpoint_bytes({"rng": rng_state()}))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(str(tmp_path / "c.pt"))["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_checkpoints_of_earlier_versions_still_load(tmp_path):
    """Before the RNG state was stored as tensors, numpy's was pickled as numpy's own tuple."""
    import numpy as np

    state = {**rng_state(), "numpy": np.random.get_state()}
    torch.save({"format": FORMAT, "rng": state, "model": {}}, tmp_path / "old.pt")
    expected = np.random.rand(3)
    set_rng_state(load_checkpoint(str(tmp_path / "old.pt"))["rng"])
    assert np.array_equal(np.random.rand(3), expected)


def test_a_run_folder_opens_at_its_latest_checkpoint_in_either_layout(tmp_path):
    """Every mode writes checkpoints/<tag>/state.pt + latest.json; run folders of earlier
    versions (checkpoints/<tag>.pt locally; epoch-NNNN/state.pt or only final.pt/best.pt on Ray)
    open too, by their run folder."""
    from mtl.checkpoint import CheckpointIndex, checkpoint_in_folder

    for epoch in (1, 2):
        (tmp_path / "run" / "checkpoints" / f"epoch-000{epoch}").mkdir(parents=True)
        (tmp_path / "run" / "checkpoints" / f"epoch-000{epoch}" / "state.pt").write_bytes(
            checkpoint_bytes({"train_state": {"epoch": epoch}}))
    CheckpointIndex(str(tmp_path / "run")).commit("epoch-0001")
    assert load_checkpoint(str(tmp_path / "run"))["train_state"]["epoch"] == 1  # the pointer, not the newest folder
    assert load_checkpoint(str(tmp_path / "run/checkpoints/epoch-0002"))["train_state"]["epoch"] == 2

    def v1(epoch):  # the train state as top-level keys
        buf = io.BytesIO()
        torch.save({"format": "streetmtl-checkpoint-v1", "epoch": epoch, "best_grader": 3.0}, buf)
        return buf.getvalue()

    for epoch in (1, 2):
        (tmp_path / "ddp" / f"epoch-000{epoch}").mkdir(parents=True)
        (tmp_path / "ddp" / f"epoch-000{epoch}" / "state.pt").write_bytes(v1(epoch))
    assert load_checkpoint(str(tmp_path / "ddp"))["train_state"] == {"epoch": 2, "best": 3.0}
    (tmp_path / "ds" / "epoch-0001").mkdir(parents=True)
    (tmp_path / "ds" / "best.pt").write_bytes(v1(1))
    assert checkpoint_in_folder(str(tmp_path / "ds")).endswith("ds/best.pt")
    (tmp_path / "local" / "checkpoints").mkdir(parents=True)
    (tmp_path / "local" / "checkpoints" / "epoch-0003.pt").write_bytes(v1(3))
    (tmp_path / "local" / "checkpoints" / "latest.json").write_text('{"latest": "epoch-0003", "history": ["epoch-0003"]}')
    assert load_checkpoint(str(tmp_path / "local"))["train_state"]["epoch"] == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*empty \(looked for checkpoints/latest.json, state.pt and best.pt"):
        load_checkpoint(str(tmp_path / "empty"))


def test_a_broken_pointer_is_named_and_nothing_older_is_read_in_its_place(tmp_path):
    """latest.json names the run's checkpoint: a corrupt pointer, or one naming a checkpoint
    that is gone, is an error naming it, not a quiet fall-back to best.pt or an older folder."""
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run / "checkpoints" / "epoch-0001" / "state.pt").write_bytes(checkpoint_bytes({"train_state": {"epoch": 1}}))
    (run / "best.pt").write_bytes(checkpoint_bytes({"train_state": {"epoch": 1}}))
    (run / "checkpoints" / "latest.json").write_text('{"latest": "epoch-0009", "history": ["epoch-0009"]}')
    with pytest.raises(FileNotFoundError, match="latest.json names checkpoint epoch-0009, but .*epoch-0009/state.pt is missing"):
        load_checkpoint(str(run))
    from mtl.checkpoint import FolderStorage

    with pytest.raises(FileNotFoundError, match=f"^{run}/checkpoints/latest.json names checkpoint epoch-0009, but {run}/"
                                                f"checkpoints/epoch-0009/state.pt is missing$"):
        with FolderStorage(str(run)).latest():  # (what a resume reads)
            pass
    (run / "checkpoints" / "epoch-0009.pt").write_bytes(b"x")  # an earlier version's layout
    with pytest.raises(FileNotFoundError, match="is missing; .*epoch-0009.pt, an earlier version's checkpoint, cannot be resumed"):
        with FolderStorage(str(run)).latest():
            pass
    for broken in ('{"latest": "epo', '{"history": []}', '["epoch-0001"]'):
        (run / "checkpoints" / "latest.json").write_text(broken)
        with pytest.raises(ValueError, match="checkpoints/latest.json is corrupt"):
            load_checkpoint(str(run))


def test_a_checkpoint_published_but_never_committed_is_deleted_by_the_next_commit(tmp_path):
    """A run that died between publishing a checkpoint and pointing at it leaves a folder no
    reader trusts; the resumed run's next commit deletes it with those past --keep-last."""
    from mtl.checkpoint import FolderStorage

    storage = FolderStorage(str(tmp_path / "run"), keep_last=2)
    src = tmp_path / "src"
    src.mkdir()
    (src / "state.pt").write_bytes(b"x")
    for tag in ("epoch-0001", "epoch-0002", "epoch-0002-step-00000009", "epoch-0003"):
        storage.publish(str(src), tag, {})
        if tag != "epoch-0002-step-00000009":  # (the attempt that died before committing it)
            storage.commit(tag)
    assert sorted(os.listdir(tmp_path / "run/checkpoints")) == ["epoch-0002", "epoch-0003", "latest.json"]
    keep_all = FolderStorage(str(tmp_path / "all"), keep_last=0)
    for tag in ("epoch-0001", "epoch-0002"):
        keep_all.publish(str(src), tag, {})
    keep_all.commit("epoch-0002")
    assert sorted(os.listdir(tmp_path / "all/checkpoints")) == ["epoch-0001", "epoch-0002", "latest.json"]  # 0: all kept
    # a write killed inside a folder left its temporary file; the same tag written again (the resumed
    # run trained that step again) holds only its own files
    (tmp_path / "all/checkpoints/epoch-0003").mkdir()
    (tmp_path / "all/checkpoints/epoch-0003/state.pt.tmp-0123abcd").write_bytes(b"a killed write")
    keep_all.publish(str(src), "epoch-0003", {})
    assert os.listdir(tmp_path / "all/checkpoints/epoch-0003") == ["state.pt"]


def test_two_writers_on_one_run_folder_never_leave_a_pointer_to_a_deleted_checkpoint(tmp_path):
    """A second driver started on a run whose first is still going (closing `ray job submit`'s
    terminal does not stop a job): the first has published step 130, the second resumed from
    an older point commits step 120. Its commit must not delete 130, which the first commits
    next: the pointer would name a folder that is gone, and no resume would work again."""
    from mtl.checkpoint import FolderStorage

    run = str(tmp_path / "run")
    first, second = FolderStorage(run, keep_last=2), FolderStorage(run, keep_last=2)
    src = tmp_path / "src"
    src.mkdir()
    (src / "state.pt").write_bytes(b"x")
    for tag in ("epoch-0000-step-00000110", "epoch-0000-step-00000120"):
        first.publish(str(src), tag, {})
        first.commit(tag)
    first.publish(str(src), "epoch-0000-step-00000130", {})
    second.publish(str(src), "epoch-0000-step-00000120", {})
    second.commit("epoch-0000-step-00000120")
    first.commit("epoch-0000-step-00000130")
    with FolderStorage(run).latest() as (folder, url):
        assert url.endswith("epoch-0000-step-00000130") and os.path.exists(f"{folder}/state.pt")


def test_best_pt_holds_only_a_committed_epoch(tmp_path, monkeypatch):
    """An attempt that dies before its commit leaves best.pt as it was (the resumed run trains
    the epoch again, maybe to a lower score); one that dies between its commit and best.pt's
    write gets best.pt written when the run resumes from that epoch."""
    from torch import nn

    from mtl.checkpoint import Checkpointer, FolderStorage, TrainState
    from mtl.strategy import PlainStrategy

    run, model = str(tmp_path / "run"), nn.Linear(3, 2)
    state = TrainState()
    storage = FolderStorage(run)
    ckpt = Checkpointer(storage, run, PlainStrategy(model, torch.optim.SGD(model.parameters(), lr=0.1)), {"train_state": state})

    def epoch(n: int, score: float) -> None:
        state.epoch, state.best = n, max(state.best, score)
        ckpt.save(f"epoch-{n:04d}", {}, {"score": score}, is_best=score == state.best)

    def best_epoch() -> int:
        return load_checkpoint(f"{run}/best.pt")["train_state"]["epoch"]

    epoch(1, 1.0)
    monkeypatch.setattr(storage, "commit", lambda tag: (_ for _ in ()).throw(RuntimeError("node lost")))
    with pytest.raises(RuntimeError, match="node lost"):
        epoch(2, 2.0)  # published, never committed
    monkeypatch.undo()
    assert best_epoch() == 1
    state.best = 1.0  # (what the resumed run restores)
    monkeypatch.setattr(Checkpointer, "_write_best", lambda self, s: (_ for _ in ()).throw(RuntimeError("node lost")))
    with pytest.raises(RuntimeError, match="node lost"):
        epoch(2, 1.5)  # committed, then lost before best.pt
    monkeypatch.undo()
    assert best_epoch() == 1 and storage.index.latest_tag() == "epoch-0002"
    resumed = TrainState()
    Checkpointer(FolderStorage(run), run, PlainStrategy(model, torch.optim.SGD(model.parameters(), lr=0.1)),
                 {"train_state": resumed}).restore()
    assert resumed.epoch == 2 and best_epoch() == 2


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_checkpointer_keeps_the_last_k_and_restores_every_part(where, tmp_path, request):
    """Folder storage on a local disk and on S3: checkpoints/<tag>/state.pt, the pointer,
    retention, best.pt, and a restore that vets the checkpoint before any part changes."""
    import fsspec
    from torch import nn

    from mtl.checkpoint import Checkpointer, FolderStorage, TrainState
    from mtl.strategy import PlainStrategy

    run = str(tmp_path) if where == "local" else request.getfixturevalue("s3_prefix")
    fs, path = fsspec.core.url_to_fs(run)
    ls = lambda sub: sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{path}/{sub}", detail=False))  # noqa: E731

    def parts(seed):
        torch.manual_seed(seed)
        model = nn.Linear(3, 2)
        return PlainStrategy(model, torch.optim.AdamW(model.parameters())), TrainState()

    strategy, state = parts(0)
    strategy.backward(strategy.model(torch.ones(4, 3)).sum())
    strategy.step(last_micro_batch=True)
    ckpt = Checkpointer(FolderStorage(run, keep_last=2), run, strategy, {"train_state": state})
    for epoch in (1, 2, 3):
        state.epoch, state.best = epoch, float(epoch)
        ckpt.save(f"epoch-000{epoch}", {"cfg": 1}, {"grader": float(epoch)}, is_best=epoch == 2)
    fs.invalidate_cache()
    assert ls("checkpoints") == ["epoch-0002", "epoch-0003", "latest.json"]
    assert ls("checkpoints/epoch-0003") == ["state.pt"]
    assert load_checkpoint(f"{run}/best.pt")["train_state"]["epoch"] == 2
    assert "optimizer" not in load_checkpoint(f"{run}/best.pt")
    assert ls("metrics") == ["epoch-0001.json", "epoch-0002.json", "epoch-0003.json"]

    other, other_state = parts(1)
    again = Checkpointer(FolderStorage(run), run, other, {"train_state": other_state})

    def refuse(loaded):
        raise ValueError("not this one")

    with pytest.raises(ValueError, match="not this one"):
        again.restore(refuse)
    assert other_state.epoch == 0 and not torch.equal(other.module.weight, strategy.module.weight)  # nothing changed
    assert again.restore()["url"] == f"{run}/checkpoints/epoch-0003/state.pt"
    assert other_state.epoch == 3 and torch.equal(other.module.weight, strategy.module.weight)
    assert torch.equal(other.optimizer.state_dict()["state"][0]["exp_avg"], strategy.optimizer.state_dict()["state"][0]["exp_avg"])


DEEPSPEED_RESUME = """
import os, sys, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo")
from mtl.config import DistConfig, ExperimentConfig, ModelConfig, TrainConfig
from mtl.distributed.deepspeed_strategy import DeepSpeedStrategy, safe_deepspeed_load
from mtl.engine import build_optimizer
from mtl.models import build_model
cfg = ExperimentConfig(model=ModelConfig(arch="deeplabv3p", encoder="resnet18"), train=TrainConfig(batch_size=2),
                       dist=DistConfig(strategy="deepspeed", zero_stage=2))
def strategy(seed):
    torch.manual_seed(seed)
    model = build_model(cfg.model).to(memory_format=torch.channels_last)
    return DeepSpeedStrategy(model, build_optimizer(model, cfg), cfg)
def fingerprint(s):  # the weights and the optimizer's moments, as the engine holds them after a load
    opt = s.optimizer.state_dict()  # (ZeRO's: its base optimizer's state over the flat fp32 partition)
    moments = [v for st in opt["base_optimizer_state"]["state"].values() for k, v in sorted(st.items()) if torch.is_tensor(v) and v.numel() > 1]
    return [p.detach().clone() for p in s.module.parameters()], moments
if sys.argv[3] == "save":
    s = strategy(0)
    assert s.engine.checkpoint_engine.load is safe_deepspeed_load  # every file DeepSpeed reads goes through it
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    out = s.model(x)
    s.backward(sum(t.float().mean() for t in torch.utils._pytree.tree_leaves(out)))
    s.step(True)
    s.save_shards(sys.argv[1])
    torch.save(fingerprint(s), sys.argv[1] + "/fingerprint")
    assert s.engine.global_steps == 1 and fingerprint(s)[1], "one optimizer step, with moments"
s = strategy(1)  # other initial weights: what the load restores shows
saved, mine = torch.load(sys.argv[1] + "/fingerprint"), None
assert any(not torch.equal(a, b) for a, b in zip(saved[0], fingerprint(s)[0]))
s.load_shards(sys.argv[1])
mine = fingerprint(s)
assert all(torch.equal(a, b) for a, b in zip(saved[0], mine[0])), "weights differ after the load"
assert len(saved[1]) == len(mine[1]) and all(torch.equal(a, b) for a, b in zip(saved[1], mine[1])), "optimizer moments differ"
print("restored step", s.engine.global_steps)
"""


@pytest.mark.slow
def test_deepspeed_resumes_through_the_safe_reader_and_refuses_a_planted_file(tmp_path, free_port):
    """The real DeepSpeed engine (ZeRO-2) trains a step and saves; an engine built from other
    weights loads it through `safe_deepspeed_load` and holds the same weights, optimizer moments
    and step count; a file of its checkpoint replaced by one carrying code is refused, and the
    code never runs."""
    ckpt, marker = tmp_path / "ckpt", tmp_path / "pwned"
    ckpt.mkdir()
    run = lambda mode: subprocess.run([sys.executable, "-c", DEEPSPEED_RESUME, str(ckpt), str(free_port()), mode],  # noqa: E731
                                      cwd=REPO, capture_output=True, text=True, timeout=600)
    r = run("save")
    assert r.returncode == 0 and "restored step 1" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    (optim,) = ckpt.glob("zero/*optim_states.pt")
    torch.save({"optimizer_state_dict": RunsCode(str(marker))}, optim)
    r = run("load")
    assert r.returncode != 0 and f"checkpoint {optim} holds Python objects besides tensors and plain data; refused" in r.stderr
    assert not marker.exists()


def test_before_a_ray_run_starts_only_checkpoints_nothing_refers_to_are_deleted(tmp_path):
    """The pointer lists epoch-0003 and epoch-0004; Ray's snapshot still holds epoch-0002 (it
    deletes that one itself once it registers the next); epoch-0003-step-00000007 was committed,
    but Ray never registered it; epoch-0004-step-00000009, newer than the pointer's latest, may
    still be written by a worker of an attempt Ray tears down; not-a-checkpoint is none of ours."""

    from mtl.distributed.ray_train import RAY_SNAPSHOT, drop_unreferenced_checkpoints

    run = tmp_path / "run"
    for tag in ("epoch-0002", "epoch-0003", "epoch-0003-step-00000007", "epoch-0004", "epoch-0004-step-00000009",
                "not-a-checkpoint"):
        (run / "checkpoints" / tag).mkdir(parents=True)
        (run / "checkpoints" / tag / "state.pt").write_bytes(b"x")
    (run / "checkpoints/latest.json").write_text(json.dumps({"latest": "epoch-0004", "history": ["epoch-0003", "epoch-0004"]}))
    (run / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "checkpoints/epoch-0002"},
                                                                       {"checkpoint_dir_name": "checkpoints/epoch-0003"}],
                                                "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoints/epoch-0003"}}))
    said = []
    assert drop_unreferenced_checkpoints(str(run), said.append) == ["epoch-0003-step-00000007"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0002", "epoch-0003", "epoch-0004",
                                                                        "epoch-0004-step-00000009", "latest.json", "not-a-checkpoint"]
    assert said == [f"deleted checkpoint folder(s) epoch-0003-step-00000007 of {run}: neither its latest.json nor Ray's "
                    f"record lists them"]
    assert drop_unreferenced_checkpoints(str(tmp_path / "new-run")) == []  # a run that has no folder yet

    # local mode continued the run and deleted epoch-0002 (out of its --keep-last): Ray would refuse
    # a snapshot that names it, so the snapshot goes, and with it Ray's claim on epoch-0003
    shutil.rmtree(run / "checkpoints/epoch-0002")
    (run / "checkpoints/latest.json").write_text(json.dumps({"latest": "epoch-0005", "history": ["epoch-0004", "epoch-0005"]}))
    (run / "checkpoints/epoch-0005").mkdir()
    said.clear()
    assert drop_unreferenced_checkpoints(str(run), said.append) == ["epoch-0003", "epoch-0004-step-00000009"]
    assert not (run / RAY_SNAPSHOT).exists()
    assert said[0] == (f"deleted Ray's checkpoint record {run}/{RAY_SNAPSHOT}: it names checkpoint folder(s) epoch-0002, "
                       f"which are gone (a run continued outside Ray deletes the folders that fall out of its --keep-last); "
                       f"the run goes on from {run}/checkpoints/latest.json")


def test_a_run_continued_on_ray_deletes_the_checkpoints_ray_never_registered_as_they_fall_out(tmp_path):
    """A run begun in local mode (epoch-0001, epoch-0002 listed) and continued on Ray, whose record
    names epoch-0002 only (it restored it, say): Ray deletes what it registered, never
    epoch-0001, so a commit does once the pointer no longer lists it, as a local commit would."""
    from mtl.checkpoint import CheckpointIndex
    from mtl.distributed.ray_train import RAY_SNAPSHOT, RayStorage, prepare_run_folder

    run = tmp_path / "run"
    for tag in ("epoch-0001", "epoch-0002", "epoch-0003", "epoch-0004"):
        (run / "checkpoints" / tag).mkdir(parents=True)
        (run / "checkpoints" / tag / "state.pt").write_bytes(b"x")
    (run / "checkpoints/latest.json").write_text(json.dumps({"latest": "epoch-0002", "history": ["epoch-0001", "epoch-0002"]}))
    (run / RAY_SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoints/epoch-0002"}}))
    outside = prepare_run_folder(str(run), print)
    assert outside == ["epoch-0001"]
    assert prepare_run_folder(str(tmp_path / "new-run")) == []
    storage = RayStorage(str(run), keep_last=2, outside_ray=tuple(outside))
    storage.commit("epoch-0003")  # (Ray keeps 2: the pointer lists epoch-0002 and epoch-0003)
    assert sorted(os.listdir(run / "checkpoints")) == ["epoch-0002", "epoch-0003", "epoch-0004", "latest.json"]
    storage.commit("epoch-0004")  # epoch-0002 is Ray's to delete: it stays here
    assert sorted(os.listdir(run / "checkpoints")) == ["epoch-0002", "epoch-0003", "epoch-0004", "latest.json"]
    assert CheckpointIndex(str(run)).read()["history"] == ["epoch-0003", "epoch-0004"]


def test_a_ray_restart_moves_a_pointer_that_lags_rays_record(tmp_path, monkeypatch):
    """Ray took epoch-0002's report, but its rank 0 died before moving latest.json: the restart
    resumes from Ray's epoch-0002 and moves the pointer to it, which every other reader follows
    (local mode, evaluation, the next start's clean-up). A pointer ahead of Ray's stays."""
    from types import SimpleNamespace

    import ray.train

    from mtl.checkpoint import CheckpointIndex
    from mtl.distributed.ray_train import RayStorage

    run = tmp_path / "run"
    for tag in ("epoch-0001", "epoch-0002", "epoch-0003"):
        (run / "checkpoints" / tag).mkdir(parents=True)
        (run / "checkpoints" / tag / "state.pt").write_bytes(b"x")
    CheckpointIndex(str(run)).commit("epoch-0001")
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(run / "checkpoints/epoch-0002")))
    with RayStorage(str(run), keep_last=2).latest() as (folder, url):
        assert url == f"{run}/checkpoints/epoch-0002" and os.listdir(folder) == ["state.pt"]
    assert json.loads((run / "checkpoints/latest.json").read_text()) == {"latest": "epoch-0002", "history": ["epoch-0001", "epoch-0002"]}
    CheckpointIndex(str(run)).commit("epoch-0003")  # (a run continued outside Ray)
    with RayStorage(str(run), keep_last=2).latest() as (folder, url):
        assert url == f"{run}/checkpoints/epoch-0003"
    assert CheckpointIndex(str(run)).latest_tag() == "epoch-0003"
    # --keep-last 1 on Ray: Ray keeps 2 (it deletes the one before as it registers the next), and the
    # pointer lists both, so the way past a corrupt latest names the one still there
    (run / "checkpoints" / "epoch-0004").mkdir()
    RayStorage(str(run), keep_last=1).commit("epoch-0004")
    assert json.loads((run / "checkpoints/latest.json").read_text())["history"] == ["epoch-0003", "epoch-0004"]


def test_a_file_system_that_is_no_object_store_gets_its_files_renamed_into_place(tmp_path):
    """A PUT replaces an object whole; sftp, hdfs and the like write in place, where a process
    killed mid-write would leave latest.json cut short: there a temporary file is renamed."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from mtl.storage import read_bytes, write_bytes_atomic

    opened = []

    class InPlace(MemoryFileSystem):  # a file system that writes in place, as sftp does
        protocol = "streetmtl-inplace"

        @classmethod
        def _strip_protocol(cls, path):
            return MemoryFileSystem._strip_protocol(path.replace("streetmtl-inplace://", "memory://", 1))

        def _open(self, path, mode="rb", **kw):
            opened.append((path, mode))
            return super()._open(path, mode, **kw)

    fsspec.register_implementation("streetmtl-inplace", InPlace, clobber=True)
    write_bytes_atomic("streetmtl-inplace://run/checkpoints/latest.json", b'{"latest": "epoch-0001"}')
    assert [m for _, m in opened] == ["wb"] and ".tmp-" in opened[0][0]
    assert read_bytes("streetmtl-inplace://run/checkpoints/latest.json") == b'{"latest": "epoch-0001"}'
    assert InPlace().ls("/run/checkpoints", detail=False) == ["/run/checkpoints/latest.json"]
    opened.clear()
    write_bytes_atomic("memory://run/checkpoints/latest.json", b"x")  # an object store: one PUT
    assert opened == []  # (not through InPlace)
    InPlace().rm("/run", recursive=True)  # (fsspec's memory store is shared by the whole process)


def test_a_local_checkpoint_is_on_the_disk_before_its_pointer_names_it(tmp_path, disk_events):
    """A power loss or a kernel crash (not only a killed process) must leave a pointer that
    names a whole checkpoint: every file of the checkpoint and every folder entry leading to it
    is fsync'ed before the pointer's rename, the pointer before its rename, and its folder after
    it; the epoch's metrics file before the pointer too, best.pt after it. (The disk's own order
    cannot be observed here: the calls can.)"""
    from torch import nn

    from mtl.checkpoint import Checkpointer, FolderStorage, TrainState
    from mtl.strategy import PlainStrategy

    run, model = os.path.realpath(tmp_path / "run"), nn.Linear(3, 2)
    strategy = PlainStrategy(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ckpt = Checkpointer(FolderStorage(run), run, strategy, {"train_state": TrainState()})
    ckpt.save("epoch-0001", {}, {"score": 1.0}, is_best=True)
    events = disk_events()
    checkpoints = f"{run}/checkpoints"
    pointer = events.index(("rename", f"{checkpoints}/latest.json"))
    before = {path for what, path in events[:pointer] if what == "fsync"}
    assert {f"{checkpoints}/epoch-0001/state.pt", f"{checkpoints}/epoch-0001", checkpoints, f"{run}/metrics/epoch-0001.json",
            f"{run}/metrics"} <= before, events
    assert any(p.startswith(f"{checkpoints}/latest.json.tmp-") for p in before), events
    assert ("fsync", checkpoints) in events[pointer:], events
    best = events.index(("rename", f"{run}/best.pt"))
    assert any(w == "fsync" and p.startswith(f"{run}/best.pt.tmp-") for w, p in events[:best]) and ("fsync", run) in events[best:]


def test_a_synced_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    """A file's fsync that fails (EIO) fails the write; a folder's that the file system does not
    support (EINVAL, as on some network file systems) is skipped, as PostgreSQL does."""
    import errno
    import stat

    from mtl.storage import write_bytes_atomic

    target, fsync = tmp_path / "checkpoints" / "latest.json", os.fsync
    write_bytes_atomic(str(target), b"old", sync=True)

    def failing_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        if b"fail" in open(f"/proc/self/fd/{fd}", "rb").read():
            raise OSError(errno.EIO, "Input/output error")
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_bytes_atomic(str(target), b"fail", sync=True)
    assert target.read_bytes() == b"old" and os.listdir(target.parent) == ["latest.json"]
    write_bytes_atomic(str(target), b"new", sync=True)
    assert target.read_bytes() == b"new"


def test_syncing_a_folder_leaves_links_and_special_files_alone(tmp_path, disk_events):
    """A named pipe would block its open forever, a dangling link cannot be opened: only regular
    files and folders are synced."""
    import threading

    from mtl.storage import sync_local

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "shard.tar").write_bytes(b"x")
    os.mkfifo(tmp_path / "d" / "pipe")
    os.symlink(tmp_path / "nowhere", tmp_path / "d" / "dangling")
    worker = threading.Thread(target=sync_local, args=(str(tmp_path / "d"),), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "sync_local blocked on the named pipe"
    d = os.path.realpath(tmp_path / "d")
    assert {p for _, p in disk_events()} >= {f"{d}/sub/shard.tar", f"{d}/sub", d, os.path.dirname(d)}
    assert not {p for _, p in disk_events()} & {f"{d}/pipe", f"{d}/dangling"}


class HeldStorage:
    """A FolderStorage whose uploads wait until the test lets them go (or fail, when told to):
    a slow object store, made deterministic."""

    def __new__(cls, run: str, fail: bool | set[str] = False):
        import threading

        from mtl.checkpoint import FolderStorage

        class Held(FolderStorage):
            def publish(self, folder, tag, metrics):
                self.started.append(tag)
                assert self.go.wait(60), "never let go"
                if fail is True or (fail and tag in fail):
                    raise OSError(f"the store refused {tag}")
                super().publish(folder, tag, metrics)

        storage = Held(run, keep_last=0)
        storage.go, storage.started = threading.Event(), []
        return storage


def _plain_run(seed: int = 0):
    from torch import nn

    from mtl.checkpoint import TrainState
    from mtl.strategy import PlainStrategy

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    strategy = PlainStrategy(model, torch.optim.Adam(model.parameters(), fused=True))
    strategy.backward(strategy.model(torch.randn(8, 3)).sum())
    strategy.step(last_micro_batch=True)
    return strategy, TrainState()


def test_a_background_checkpoint_holds_its_steps_state_and_becomes_the_latest_once_written(tmp_path):
    """A step checkpoint in the background returns while the store is still busy; the pointer
    names it only once it is written, and what it holds is the state of its step, although
    training has changed the weights, the optimizer's moments and the train state in place
    since. The next save waits for it (checkpoints commit in order)."""
    import threading

    from mtl.checkpoint import Checkpointer, CheckpointIndex, load_checkpoint

    run = str(tmp_path / "run")
    storage, written = HeldStorage(run), []
    strategy, state = _plain_run()
    ckpt = Checkpointer(storage, run, strategy, {"train_state": state}, on_written=lambda tag, s: written.append(tag))
    state.step = 4
    weight = strategy.module[0].weight.detach().clone()
    moment = strategy.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    ckpt.save("epoch-0000-step-00000004", {"cfg": 1}, {"step": 4}, is_best=False, metrics_file=False, background=True)
    deadline = time.time() + 30
    while not storage.started and time.time() < deadline:  # (the writer thread takes it up)
        time.sleep(0.01)
    assert storage.started == ["epoch-0000-step-00000004"] and CheckpointIndex(run).read() is None and not written
    # training goes on meanwhile: another step changes every part in place
    strategy.backward(strategy.model(torch.randn(8, 3)).sum())
    strategy.step(last_micro_batch=True)
    state.step = 5
    assert not torch.equal(strategy.module[0].weight, weight)
    second = threading.Thread(target=ckpt.save, args=("epoch-0000-step-00000005", {"cfg": 1}, {"step": 5}, False),
                              kwargs={"metrics_file": False, "background": True})
    second.start()
    second.join(0.5)
    assert second.is_alive() and storage.started == ["epoch-0000-step-00000004"]  # waits for the first
    storage.go.set()
    second.join(60)
    assert ckpt.waited_s >= 0.5  # (what the engine's log line says: checkpoints due faster than they are written)
    ckpt.wait()
    assert written == ["epoch-0000-step-00000004", "epoch-0000-step-00000005"]
    assert CheckpointIndex(run).read()["history"] == written
    first = load_checkpoint(f"{run}/checkpoints/epoch-0000-step-00000004")
    assert first["train_state"]["step"] == 4 and torch.equal(first["model"]["0.weight"], weight)
    assert torch.equal(first["optimizer"]["state"][0]["exp_avg"], moment)
    assert first["model"]._metadata[""]["version"] == strategy.module.state_dict()._metadata[""]["version"]
    last = load_checkpoint(f"{run}/checkpoints/epoch-0000-step-00000005")
    assert last["train_state"]["step"] == 5 and torch.equal(last["model"]["0.weight"], strategy.module[0].weight)


def test_a_background_checkpoint_that_fails_costs_itself_only_and_two_in_a_row_stop_the_run(tmp_path):
    """A write that fails in the background moves no pointer: the checkpoint before stays the
    latest. The next save finds it failed and is taken all the same, saying which one it
    replaces (when it is the run's last epoch's, that epoch is not lost too); a second failure
    in a row is raised there: the storage is not coming back."""
    from mtl.checkpoint import Checkpointer, CheckpointIndex

    run = str(tmp_path / "run")
    strategy, state = _plain_run()
    ok = HeldStorage(run)
    ok.go.set()
    Checkpointer(ok, run, strategy, {"train_state": state}).save("epoch-0001", {}, {"score": 1.0}, is_best=False)
    failing = HeldStorage(run, fail={"epoch-0001-step-00000009", "epoch-0002-step-00000012", "epoch-0002-step-00000015"})
    ckpt = Checkpointer(failing, run, strategy, {"train_state": state})
    ckpt.save("epoch-0001-step-00000009", {}, {}, is_best=False, metrics_file=False, background=True)
    failing.go.set()
    ckpt.save("epoch-0002", {}, {"score": 2.0}, is_best=False)
    assert ckpt.replaced == "checkpoint epoch-0001-step-00000009 was not written (the store refused epoch-0001-step-00000009)"
    assert CheckpointIndex(run).latest_tag() == "epoch-0002"
    ckpt.save("epoch-0002-step-00000012", {}, {}, is_best=False, metrics_file=False, background=True)
    ckpt.save("epoch-0002-step-00000015", {}, {}, is_best=False, metrics_file=False, background=True)
    assert ckpt.replaced.startswith("checkpoint epoch-0002-step-00000012 was not written")
    with pytest.raises(OSError, match="the store refused epoch-0002-step-00000015"):
        ckpt.save("epoch-0003", {}, {"score": 3.0}, is_best=False)
    assert CheckpointIndex(run).latest_tag() == "epoch-0002"
    ckpt.wait()  # (the error was raised once)


def test_an_abandoned_background_checkpoint_commits_nothing_and_stops_writing(tmp_path, monkeypatch):
    """A second Ctrl-C while the run's end waits for a background write gives it up
    (`Checkpointer.abandon`): the lease is released next and another driver may take the run,
    so the write must not go on into it. Given up during the state file's write, it stops there
    and publishes nothing; given up during the upload, it is not committed."""
    import threading

    from mtl import checkpoint
    from mtl.checkpoint import Checkpointer, CheckpointIndex

    run = str(tmp_path / "run")
    strategy, state = _plain_run()
    storage = HeldStorage(run)
    storage.go.set()
    ckpt = Checkpointer(storage, run, strategy, {"train_state": state})
    ckpt.save("epoch-0001", {}, {"score": 1.0}, is_best=False)
    assert ckpt.abandon() is None  # (nothing in flight)

    writing, chunks = threading.Event(), []
    plain_write = checkpoint._AbandonableFile.write

    def slow_write(self, data):  # (a state file of many tensors on a slow disk)
        writing.set()
        time.sleep(0.05)
        chunks.append(len(data))
        return plain_write(self, data)

    monkeypatch.setattr(checkpoint._AbandonableFile, "write", slow_write)
    ckpt.save("epoch-0001-step-00000009", {}, {}, is_best=False, metrics_file=False, background=True)
    assert writing.wait(30)
    assert ckpt.abandon(wait_s=30) == ("epoch-0001-step-00000009", "abandoned")
    assert ckpt._pending.done() and isinstance(ckpt._pending.exception(), checkpoint.Abandoned)
    assert len(chunks) < 5 and storage.started == ["epoch-0001"]  # (stopped at its next tensor: never uploaded)
    monkeypatch.setattr(checkpoint._AbandonableFile, "write", plain_write)

    uploading = HeldStorage(run)  # (written, then held in the upload when it is given up)
    ckpt = Checkpointer(uploading, run, strategy, {"train_state": state})
    ckpt.save("epoch-0002", {}, {"score": 2.0}, is_best=True, background=True)
    deadline = time.time() + 30
    while not uploading.started and time.time() < deadline:
        time.sleep(0.01)
    assert ckpt.abandon(wait_s=0.2) == ("epoch-0002", "uploading")  # (its caller waits for it: `Trainer._abandon_checkpoint`)
    uploading.go.set()
    with pytest.raises(checkpoint.Abandoned):
        ckpt._pending.result(timeout=30)
    assert CheckpointIndex(run).latest_tag() == "epoch-0001" and not os.path.exists(f"{run}/best.pt")

    # committed before the abandon reached it (best.pt being written): said so, not "abandoned"
    best_written, write_best = threading.Event(), Checkpointer._write_best

    def slow_best(self, state):
        best_written.wait(30)
        write_best(self, state)

    monkeypatch.setattr(Checkpointer, "_write_best", slow_best)
    ckpt = Checkpointer(storage, run, strategy, {"train_state": state})
    ckpt.save("epoch-0003", {}, {"score": 3.0}, is_best=True, background=True)
    deadline = time.time() + 30
    while CheckpointIndex(run).latest_tag() != "epoch-0003" and time.time() < deadline:
        time.sleep(0.01)
    threading.Timer(0.3, best_written.set).start()
    assert ckpt.abandon(wait_s=30) == ("epoch-0003", "committed") and os.path.exists(f"{run}/best.pt")


def test_a_failed_background_write_of_the_best_epoch_still_makes_best_pt_and_one_after_its_commit_is_no_failure(tmp_path):
    """The best epoch's write fails: the run goes on from that state and no later epoch may beat
    its score, so its best.pt is written from the write's host copy. A failure after a commit
    (the log line's callback here) leaves a committed checkpoint: said, and not counted as a
    failed write."""
    from mtl.checkpoint import BEST_FILE, Checkpointer, CheckpointIndex, load_checkpoint

    run = str(tmp_path / "run")
    strategy, state = _plain_run()
    failing = HeldStorage(run, fail={"epoch-0002"})
    failing.go.set()
    ckpt = Checkpointer(failing, run, strategy, {"train_state": state})
    ckpt.save("epoch-0001", {}, {"score": 1.0}, is_best=True)
    ckpt.save("epoch-0002", {}, {"score": 2.0}, is_best=True, background=True)
    ckpt.save("epoch-0003", {}, {"score": 1.5}, is_best=False)
    assert ckpt.replaced == "checkpoint epoch-0002 was not written (the store refused epoch-0002)" and ckpt.replacing
    assert load_checkpoint(f"{run}/{BEST_FILE}")["metrics"] == {"score": 2.0}
    assert CheckpointIndex(run).read()["history"] == ["epoch-0001", "epoch-0003"]

    def log_fails(tag, seconds):
        raise OSError("train.log cannot be written")

    ckpt.on_written = log_fails
    ckpt.save("epoch-0004", {}, {"score": 1.0}, is_best=False, background=True)
    ckpt.save("epoch-0005", {}, {"score": 1.0}, is_best=False, background=True)
    assert ckpt.replaced == "checkpoint epoch-0004 was written, but what follows its commit failed (train.log cannot be written)"
    assert not ckpt.replacing
    ckpt.save("epoch-0006", {}, {"score": 1.0}, is_best=False)  # (epoch-0005's failure after its commit: not a second in a row)
    assert ckpt.replaced.startswith("checkpoint epoch-0005 was written") and CheckpointIndex(run).latest_tag() == "epoch-0006"


@pytest.mark.parametrize("background", [True, False], ids=["background", "foreground"])
def test_a_checkpoint_is_committed_only_once_what_it_waits_for_is_done(background, tmp_path):
    """``after`` (the tracker's points up to the checkpoint, stored on the tracker's thread):
    the pointer moves only once it is done, in the background or the foreground, and a failure
    there is its owner's to raise: the checkpoint is committed all the same, as it is when the
    tracker takes longer than `TRACKING_WAIT_S`."""
    import threading
    from concurrent.futures import Future

    from mtl.checkpoint import Checkpointer, CheckpointIndex

    run = str(tmp_path / "run")
    storage = HeldStorage(run)
    storage.go.set()
    strategy, state = _plain_run()
    ckpt = Checkpointer(storage, run, strategy, {"train_state": state})
    for tag, outcome in (("epoch-0001", None), ("epoch-0002", OSError("the run folder is unreachable"))):
        stored: Future = Future()
        saving = threading.Thread(target=ckpt.save, args=(tag, {}, {"score": 1.0}, False),
                                  kwargs={"background": background, "after": stored})
        saving.start()
        saving.join(0.5)
        assert saving.is_alive() != background  # (the foreground save returns only after its commit)
        time.sleep(0.3 if background else 0)
        assert CheckpointIndex(run).latest_tag() == (None if tag == "epoch-0001" else "epoch-0001")
        stored.set_exception(outcome) if outcome else stored.set_result(None)
        saving.join(60)
        ckpt.wait()
        assert CheckpointIndex(run).latest_tag() == tag
    import mtl.checkpoint  # a tracking server that never answers holds the commit back for TRACKING_WAIT_S only

    mtl.checkpoint.TRACKING_WAIT_S, wait_s = 0.2, mtl.checkpoint.TRACKING_WAIT_S
    try:
        ckpt.save("epoch-0003", {}, {"score": 1.0}, False, background=background, after=Future())
        ckpt.wait()
    finally:
        mtl.checkpoint.TRACKING_WAIT_S = wait_s
    assert CheckpointIndex(run).latest_tag() == "epoch-0003"


def test_host_copy_keeps_the_structure_and_owns_its_tensors():
    from collections import OrderedDict

    from mtl.checkpoint import host_copy

    sd = OrderedDict(w=torch.ones(2))
    sd._metadata = {"": {"version": 2}}
    obj = {"model": sd, "groups": [{"betas": (0.9, 0.99), "lr": 1e-3}], "n": 3, "name": "x", "none": None}
    copy = host_copy(obj)
    sd["w"].add_(1)
    assert copy["model"]["w"].tolist() == [1.0, 1.0] and type(copy["model"]) is OrderedDict
    assert copy["model"]._metadata == {"": {"version": 2}} and copy["groups"] == [{"betas": (0.9, 0.99), "lr": 1e-3}]
    assert copy["n"] == 3 and copy["name"] == "x" and copy["none"] is None


def test_a_background_checkpoint_on_ray_fails_only_once_rays_retries_are_spent(tmp_path, monkeypatch):
    """On Ray the write runs as the report's upload function, which Ray retries on a transient
    S3 error (its own retry, as in Ray's upload path): a retry that succeeds commits, and the
    training thread sees no error; a failure that Ray will not retry reaches it."""
    import ray.train
    from ray._common.retry import retry
    from ray.train.v2._internal.constants import AWS_RETRYABLE_TOKENS

    from mtl.distributed.ray_train import _ray_retries, _uploader

    # (Ray's own limits, read from its upload's decorator: 3 attempts on its transient S3 errors)
    assert _ray_retries(OSError("AWS Error SLOW_DOWN"), 2) and not _ray_retries(OSError("AWS Error SLOW_DOWN"), 3)
    assert not _ray_retries(OSError("AWS Error ACCESS_DENIED"), 1)

    errors = [OSError("AWS Error SLOW_DOWN during PutObject"), None]

    class Storage:
        def persist_current_checkpoint(self, checkpoint, dir_name):
            error = errors.pop(0)
            if error is not None:
                raise error
            return ("persisted", dir_name)

    monkeypatch.setattr(ray.train, "get_context", lambda: type("Context", (), {"get_storage": lambda self: Storage()})())
    rays = retry(description="upload checkpoint", max_attempts=3, match=AWS_RETRYABLE_TOKENS, max_backoff_s=0)
    committed, done = [], Future()
    folder = str(tmp_path / "ckpt")
    upload = _uploader(folder, lambda d: open(os.path.join(d, "state.pt"), "wb").close(), lambda: committed.append(1), done)
    assert rays(upload)(None, "checkpoints/epoch-0000-step-00000004") == ("persisted", "checkpoints/epoch-0000-step-00000004")
    assert done.result(timeout=0) is None and committed == [1]  # the retry succeeded: no error for training

    errors[:] = [OSError("AWS Error ACCESS_DENIED")]  # (not transient: Ray does not retry it)
    done = Future()
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        rays(_uploader(folder, lambda d: None, None, done))(None, "checkpoints/x")
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        done.result(timeout=0)
    assert not os.path.exists(folder)  # (its folder removed: Ray deletes it only after an upload)


_TWO_RANKS_RESTORE = """
import os, sys, torch, torch.distributed as dist
from mtl.checkpoint import Checkpointer, FolderStorage, TrainState
from mtl.strategy import PlainStrategy
rank, store, runs = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
run = runs[rank]  # (what each rank finds in the run folder: the same pointer, or one that moved in between)
model = torch.nn.Linear(3, 2)
state = TrainState()
try:
    Checkpointer(FolderStorage(run), run, PlainStrategy(model, torch.optim.SGD(model.parameters(), lr=0.1)),
                 {"train_state": state}, rank=rank).restore()
    print("resumed at epoch", state.epoch)
except (RuntimeError, ValueError) as e:
    print("refused:", e, "| epoch", state.epoch)
sys.stdout.flush()
os._exit(0)  # (gloo's teardown aborts now and then once the other rank has left: "terminate called without an active exception")
"""


@pytest.mark.parametrize("rank_1_finds", ["the same", "a newer one", "a corrupt pointer"])
def test_every_rank_resumes_from_the_same_checkpoint(tmp_path, rank_1_finds):
    """Each rank reads the pointer on its own. Should it move between their reads (a writer of an
    attempt being torn down), the ranks would train on from different steps: they compare what
    they found first, and refuse, naming each rank's, before any of them loads it; a rank that
    cannot read it makes every rank fail, not wait for it. Two gloo ranks."""
    from torch import nn

    from mtl.checkpoint import Checkpointer, FolderStorage, TrainState
    from mtl.strategy import PlainStrategy

    runs = [str(tmp_path / "run-a"), str(tmp_path / ("run-a" if rank_1_finds == "the same" else "run-b"))]
    for epoch, run in enumerate(sorted(set(runs)), start=3):
        model, state = nn.Linear(3, 2), TrainState(epoch=epoch)
        Checkpointer(FolderStorage(run), run, PlainStrategy(model, torch.optim.SGD(model.parameters(), lr=0.1)),
                     {"train_state": state}).save(f"epoch-000{epoch}", {}, {}, is_best=False)
    if rank_1_finds == "a corrupt pointer":
        (tmp_path / "run-b/checkpoints/latest.json").write_text("{")
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_RANKS_RESTORE, str(r), str(tmp_path / "store"), *runs], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs, errs = zip(*(p.communicate(timeout=120) for p in procs))
    outs = list(outs)
    assert all(p.returncode == 0 for p in procs), (outs, errs)
    if rank_1_finds == "the same":
        assert outs == ["resumed at epoch 3\n"] * 2
    elif rank_1_finds == "a newer one":
        for rank, out in enumerate(outs):
            assert out == (f"refused: the ranks found different checkpoints to resume (rank 0: {runs[0]}/checkpoints/epoch-0003, "
                           f"rank 1: {runs[1]}/checkpoints/epoch-0004): {runs[rank]}/checkpoints/latest.json changed while "
                           f"they read it; nothing was loaded, and a new attempt reads it again | epoch 0\n")
    else:
        corrupt = f"{runs[1]}/checkpoints/latest.json is corrupt (not a checkpoint pointer: b'{{')"
        assert outs[1].startswith(f"refused: {corrupt}") and outs[1].endswith("| epoch 0\n")
        assert outs[0].startswith(f"refused: rank 1 could not choose a checkpoint to resume: {corrupt}"), outs


def test_a_run_gone_on_from_an_earlier_checkpoint_keeps_it_among_its_last(tmp_path):
    """After a resume past a deleted (corrupt) latest checkpoint, the checkpoints of the line of
    training that goes on fill --keep-last: the deleted one, still listed, holds no place, so
    the next commit does not delete the checkpoint the run went on from."""
    from mtl.checkpoint import CheckpointIndex

    index = CheckpointIndex(str(tmp_path / "run"))
    for tag in ("epoch-0002", "epoch-0003", "epoch-0004"):
        index.commit(tag, keep_last=2)
    # epoch-0004 was corrupt and deleted; the run went on from epoch-0003
    history, dropped = index.commit("epoch-0003-step-00000350", keep_last=2)
    assert history == ["epoch-0003", "epoch-0003-step-00000350"] and dropped == []
    assert index.commit("epoch-0004", keep_last=2) == (["epoch-0003-step-00000350", "epoch-0004"], ["epoch-0003"])


def test_a_corrupt_latest_checkpoint_says_how_to_go_on_and_its_deletion_resumes_the_one_before(tmp_path):
    """A latest checkpoint that cannot be read (cut short on the disk, damaged in the bucket) is
    refused, naming the way on: delete its folder, and the resume takes the newest whole one the
    pointer lists before it, saying which it passed over. Nothing listed before it: start over."""
    from torch import nn

    from mtl.checkpoint import Checkpointer, FolderStorage, TrainState, load_checkpoint
    from mtl.strategy import PlainStrategy

    run = str(tmp_path / "run")

    def checkpointer(state):
        model = nn.Linear(3, 2)
        return Checkpointer(FolderStorage(run, keep_last=3), run, PlainStrategy(model, torch.optim.SGD(model.parameters(), lr=0.1)),
                            {"train_state": state})

    for epoch in (1, 2, 3):
        checkpointer(TrainState(epoch=epoch)).save(f"epoch-000{epoch}", {}, {}, is_best=False)
    state = tmp_path / "run/checkpoints/epoch-0003/state.pt"
    state.write_bytes(state.read_bytes()[:100])
    resumed = TrainState()
    with pytest.raises(ValueError, match=rf"checkpoint {run}/checkpoints/epoch-0003/state.pt is unreadable or corrupt \(.*\); "
                                         rf"delete the folder {run}/checkpoints/epoch-0003 and the resume goes on from epoch-0002, "
                                         rf"the checkpoint before it$"):
        checkpointer(resumed).restore()
    assert resumed.epoch == 0
    shutil.rmtree(tmp_path / "run/checkpoints/epoch-0002")  # (damaged too, and deleted first: the advice skips it)
    with pytest.raises(ValueError, match=r"; delete the folder .*/epoch-0003 and the resume goes on from epoch-0001, "):
        checkpointer(resumed).restore()
    # evaluate.py and predict.py load the run folder's latest: refused too, naming the run's other checkpoints
    with pytest.raises(ValueError, match=rf"epoch-0003/state.pt is unreadable or corrupt \(.*\); the run's other checkpoints: "
                                         rf"{run}/checkpoints/epoch-0001$"):
        load_checkpoint(run)
    shutil.rmtree(tmp_path / "run/checkpoints/epoch-0003")
    with pytest.raises(FileNotFoundError, match=rf"names checkpoint epoch-0003, but .* is missing; the run's other checkpoints: "
                                                rf"{run}/checkpoints/epoch-0001$"):  # (evaluation picks none by itself)
        load_checkpoint(run)
    loaded = checkpointer(resumed).restore()
    assert resumed.epoch == 1 and loaded["skipped"] == ["epoch-0003", "epoch-0002"]
    assert loaded["url"] == f"{run}/checkpoints/epoch-0001/state.pt"
    state = tmp_path / "run/checkpoints/epoch-0001/state.pt"
    state.write_bytes(b"")
    with pytest.raises(ValueError, match=r"epoch-0001/state.pt is unreadable or corrupt \(the file is empty \(0 bytes\)\)$"):
        load_checkpoint(str(state))
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"; no checkpoint before it is listed: delete {run}/checkpoints to train the run from "
                                         rf"its start$"):
        checkpointer(TrainState()).restore()


def test_a_killed_writers_staging_folder_is_deleted_by_the_next_checkpointer(tmp_path, monkeypatch):
    """A checkpoint is written whole into the temporary folder first: a process killed meanwhile
    leaves hundreds of MB there. The next checkpointer of this machine deletes the folders of its
    processes that have ended, never a live one's; another namespace's once a day old."""
    import tempfile

    from mtl.checkpoint import STAGING, drop_stale_staging, staging_prefix
    from mtl.machine import knows_its_processes

    if not knows_its_processes():
        pytest.skip("this machine's processes cannot be told apart")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    mine = staging_prefix()
    dead = mine.replace(f"-{os.getpid()}-", f"-{ended}-") + "abc"
    for name in (dead, mine + "live", f"{STAGING}0badf00d-{ended}-other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(b"x")
    assert drop_stale_staging() == [dead]
    assert sorted(os.listdir(tmp_path)) == sorted([mine + "live", f"{STAGING}0badf00d-{ended}-other"])
    # another namespace's (a container restarted with its /tmp): once a day old
    two_days = time.time() - 2 * 86400
    os.utime(tmp_path / f"{STAGING}0badf00d-{ended}-other", (two_days, two_days))
    assert drop_stale_staging() == [f"{STAGING}0badf00d-{ended}-other"] and os.listdir(tmp_path) == [mine + "live"]


def test_the_runs_end_waits_for_an_abandoned_upload_and_another_interrupt_ends_the_process(monkeypatch):
    """An abandoned checkpoint still uploading (one file, uncommitted) is waited for before the
    lease is released; interrupted again, the process ends at once (exit 130), its lease left to
    expire, instead of releasing it while the upload writes into the run."""
    from types import SimpleNamespace

    import mtl.engine as engine

    logs, waits = [], []

    class Uploading:
        def abandon(self):
            return "epoch-0002", "uploading"

        def wait(self):
            waits.append(1)
            raise KeyboardInterrupt

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(engine.os, "_exit", exit_now)
    with pytest.raises(SystemExit) as e:
        engine.Trainer._abandon_checkpoint(SimpleNamespace(checkpointer=Uploading(), log=logs.append))
    assert e.value.code == 130 and waits == [1]

    class InterruptedWhileAbandoning:  # (the interrupt during abandon's own wait: the same)
        def abandon(self):
            raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        engine.Trainer._abandon_checkpoint(SimpleNamespace(checkpointer=InterruptedWhileAbandoning(), log=print))
    assert e.value.code == 130
    assert logs == ["checkpoint epoch-0002, being written, was abandoned: --resume goes on from the one before it",
                    "its upload ends first, uncommitted (interrupt again to end this process now, leaving its lease to expire)"]
