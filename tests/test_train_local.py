"""Local training as a user runs it: it learns, it resumes exactly, it exports."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mtl.checkpoint import load_checkpoint
from mtl.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig
from mtl.data.batch import to_model_batch
from mtl.data.folder import MiniscapesFolder
from mtl.data.miniscapes import decode_depth, decode_semseg
from mtl.engine import fit, local_runtime
from mtl.metrics import MultiTaskMetrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(root: str, out: str, **train) -> ExperimentConfig:
    return ExperimentConfig(
        data=DataConfig(root=root, workers=0),
        model=ModelConfig(arch="deeplabv3p", encoder="resnet18"),
        optim=OptimConfig(lr=1e-3),
        train=TrainConfig(**{"epochs": 5, "batch_size": 8, "out": out, "device": "cpu", "log_every": 100, **train}),
    ).validate()


def baselines(root: str) -> dict[str, float]:
    """Majority class for segmentation, the train set's median depth for depth, on val."""
    train, val = MiniscapesFolder(root, "train"), MiniscapesFolder(root, "val")
    counts = np.zeros(256, np.int64)
    depths = []
    cpu = torch.device("cpu")
    for i in range(len(train)):
        s = to_model_batch({k: v[None] for k, v in train[i].items()}, cpu)
        counts += np.bincount(s["semseg"].flatten().numpy(), minlength=256)
        depths.append(s["depth"][s["valid"]])
    majority, median = int(counts[:19].argmax()), float(torch.cat(depths).median())
    m = MultiTaskMetrics()
    for i in range(len(val)):
        b = to_model_batch({k: v[None] for k, v in val[i].items()}, cpu)
        m.update(torch.full_like(b["semseg"], majority), torch.full_like(b["depth"], median), b)
    return m.compute()


@pytest.mark.slow
def test_short_training_beats_trivial_baselines(tiny_root, tmp_path):
    base = baselines(tiny_root)
    result = fit(tiny_cfg(tiny_root, str(tmp_path)), local_runtime(tiny_cfg(tiny_root, str(tmp_path))))
    final = result.metrics[-1]
    # thresholds: mIoU at least 3x the majority-class mIoU (and > 25 points); SI-logRMSE at most
    # 60% of the constant-depth one (a constant has no relative structure at all)
    assert final["miou"] > max(3 * base["miou"], 25.0), (final["miou"], base["miou"])
    assert final["si_log_rmse"] < 0.6 * base["si_log_rmse"], (final["si_log_rmse"], base["si_log_rmse"])
    assert final["grader"] > base["grader"] + 30
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]


class Interrupt(Exception):
    pass


def test_resume_continues_lr_and_weights_exactly(tiny_root, tmp_path):
    kw = dict(epochs=4, batch_size=4, max_steps_per_epoch=3, seed=3)
    straight_cfg = tiny_cfg(tiny_root, str(tmp_path / "a"), **kw)
    straight = fit(straight_cfg, local_runtime(straight_cfg))

    cfg = tiny_cfg(tiny_root, str(tmp_path / "b"), **kw)

    def stop_after_two(epoch, metrics):
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(cfg, local_runtime(cfg), on_epoch_end=stop_after_two)
    # the resumed half uses loader workers: the augmentation must not depend on them
    resumed_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True),
                                      data=dataclasses.replace(cfg.data, workers=2))
    resumed = fit(resumed_cfg, local_runtime(resumed_cfg))

    assert len(straight.lrs) == 12 and len(resumed.lrs) == 6
    assert resumed.lrs == straight.lrs[6:]
    assert straight.lrs[0] == pytest.approx(1e-3) and straight.lrs[-1] < straight.lrs[5]
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [m["epoch"] for m in resumed.metrics] == [3, 4] and all(m["val_s"] > 0 for m in straight.metrics + resumed.metrics)
    assert resumed.metrics[-1]["grader"] == pytest.approx(straight.metrics[-1]["grader"])


def test_a_resume_past_a_deleted_latest_checkpoint_says_so(tiny_root, tmp_path):
    """The folder of the checkpoint latest.json names was deleted (it was corrupt: the refusal's
    advice): the resume goes on from the newest whole one listed before it, and says so."""
    import shutil

    from mtl.runs import run_url

    cfg = tiny_cfg(tiny_root, str(tmp_path), epochs=2, batch_size=4, max_steps_per_epoch=1)
    fit(cfg, local_runtime(cfg))
    shutil.rmtree(f"{run_url(cfg)}/checkpoints/epoch-0002")
    again = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True))
    assert [m["epoch"] for m in fit(again, local_runtime(again)).metrics] == [2]
    log = open(f"{run_url(cfg)}/train.log").read()
    assert (f"checkpoint epoch-0002 of {run_url(cfg)}/checkpoints/latest.json is gone: the resume goes on from the newest whole "
            f"one it lists") in log and f"resumed from {run_url(cfg)}/checkpoints/epoch-0001/state.pt" in log


def test_a_resume_does_not_need_the_pretrained_weights_again(tiny_root, tmp_path):
    """A run started from --pretrained weights whose file is gone since (a mirror cleaned up, a
    node without torch hub's cache after a restart) resumes: its checkpoint holds every weight.
    A run starting from scratch without the file is refused, naming it."""
    import torchvision

    from mtl.runs import run_url

    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    cfg = tiny_cfg(tiny_root, str(tmp_path), epochs=2, batch_size=4, max_steps_per_epoch=1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=str(weights)),
                              train=dataclasses.replace(cfg.train, epochs=1, name="pre"))
    fit(cfg, local_runtime(cfg))
    assert f"encoder weights from {weights}" in open(f"{run_url(cfg)}/train.log").read()
    os.remove(weights)
    again = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2, resume=True))
    assert [m["epoch"] for m in fit(again, local_runtime(again)).metrics] == [2]
    log = open(f"{run_url(cfg)}/train.log").read()
    assert log.count(f"encoder weights from {weights}") == 1  # (the resume's weights are its checkpoint's)
    fresh = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, name="fresh"))
    with pytest.raises(FileNotFoundError, match=f"pretrained encoder weights not found: {weights}"):
        fit(fresh, local_runtime(fresh))


def _after_steps(monkeypatch, n: int):
    """An event set once the trainer has taken more than ``n`` train steps."""
    import threading

    import mtl.engine

    steps, done, train_step = [], threading.Event(), mtl.engine.train_step

    def counted(*args, **kwargs):
        out = train_step(*args, **kwargs)
        steps.append(1)
        if len(steps) > n:
            done.set()
        return out

    monkeypatch.setattr(mtl.engine, "train_step", counted)
    return done


@pytest.mark.parametrize("run_fails", [True, False])
def test_a_failing_last_write_of_train_log_does_not_hide_the_runs_own_error(run_fails, tiny_root, tmp_path, monkeypatch):
    """The run's end writes train.log (an object store's) last: if that fails too, the run's own
    error is raised and the log's failure shown; a run that succeeded raises the log's."""
    from mtl.progress import RunLog
    from mtl.runs import run_url

    flush = RunLog.flush

    def refused(self, wait=True):
        if wait:
            raise OSError("the store refused train.log")
        return flush(self, wait)

    def stop(epoch, metrics):
        if run_fails:
            raise Interrupt

    monkeypatch.setattr(RunLog, "flush", refused)
    cfg = tiny_cfg(tiny_root, str(tmp_path), epochs=1, batch_size=4, max_steps_per_epoch=1, name="run")
    with pytest.raises(Interrupt) if run_fails else pytest.raises(OSError, match="the store refused train.log"):
        fit(cfg, local_runtime(cfg), on_epoch_end=stop)
    shown = "train.log could not be written to" in open(f"{run_url(cfg)}/train.log").read()
    assert shown == run_fails


def test_an_epochs_checkpoint_is_written_while_the_next_epoch_trains(tiny_root, tmp_path, monkeypatch):
    """Epoch checkpoints go to the background too: epoch 1's state is serialised only once epoch
    2 has trained a step (in the foreground that would never happen: the test would time out),
    and still holds epoch 1's model, which training has changed in place since; it becomes the
    latest and best.pt only once written; the run's last epoch's checkpoint is written in the
    foreground (nothing left to overlap it with)."""
    import re

    import mtl.checkpoint
    import mtl.engine
    from mtl.checkpoint import CheckpointIndex, Checkpointer
    from mtl.runs import run_url

    cfg = tiny_cfg(tiny_root, str(tmp_path), epochs=2, batch_size=4, max_steps_per_epoch=3, name="run")
    run, at_save = run_url(cfg), {}
    epoch_two = _after_steps(monkeypatch, 3)  # (3 steps per epoch: epoch 2 has updated the weights)
    write_state, save, task_metrics = mtl.checkpoint._write_state, Checkpointer.save, mtl.engine.task_metrics

    def held(folder, state, *abandoned):
        if state["train_state"]["epoch"] == 1:
            assert epoch_two.wait(60), "epoch 2 never trained while epoch 1's checkpoint was being written"
            assert CheckpointIndex(run).latest_tag() is None and not os.path.exists(f"{run}/best.pt")
        write_state(folder, state, *abandoned)

    def snapshot(self, tag, *args, **kwargs):  # the model as the epoch ended
        at_save[tag] = {k: v.clone() for k, v in self.strategy.module.state_dict().items()}
        return save(self, tag, *args, **kwargs)

    def epoch_one_best(*args, **kwargs):  # (best.pt is then written in the background)
        metrics = task_metrics(*args, **kwargs)
        return {**metrics, "score": 1.0 if metrics["epoch"] == 1 else 0.0}

    monkeypatch.setattr(mtl.checkpoint, "_write_state", held)
    monkeypatch.setattr(Checkpointer, "save", snapshot)
    monkeypatch.setattr(mtl.engine, "task_metrics", epoch_one_best)
    result = fit(cfg, local_runtime(cfg))
    log = open(f"{run}/train.log").read()
    assert re.search(r"epoch checkpoint epoch-0001 \([\d.]+ s of training stalled; written in the background\)", log)
    assert re.search(r"checkpoint epoch-0001 written in the background \([\d.]+ s after it was taken\)", log)
    assert re.search(r"epoch checkpoint epoch-0002 \([\d.]+ s of training stalled; the run's last[;)]", log)
    assert CheckpointIndex(run).read()["history"] == ["epoch-0001", "epoch-0002"]
    assert [m["score"] for m in result.metrics] == [1.0, 0.0]
    first, best = load_checkpoint(f"{run}/checkpoints/epoch-0001"), load_checkpoint(f"{run}/best.pt")
    assert first["train_state"]["epoch"] == best["train_state"]["epoch"] == 1
    for k, v in at_save["epoch-0001"].items():
        assert torch.equal(first["model"][k], v) and torch.equal(best["model"][k], v), k
    assert not all(torch.equal(at_save["epoch-0002"][k], v) for k, v in at_save["epoch-0001"].items())  # (epoch 2 changed them)


def test_the_trackers_epoch_work_runs_while_the_next_epoch_trains(tiny_root, tmp_path, monkeypatch):
    """What the tracker does at an epoch's end beyond taking the values (closing the epoch's
    TensorBoard file with its validation pictures, for a remote run folder uploading it, sending
    MLflow's values, drawing curves.png) runs on its own thread: epoch 1's is done only once
    epoch 2 has trained a step (in the foreground the test would time out), and epoch 1's
    checkpoint, written in the background, is committed only after it, so a resume from it has
    every point up to it and logs only later ones."""
    import threading
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import mtl.checkpoint
    from mtl.checkpoint import CheckpointIndex
    from mtl.runs import run_url
    from mtl.tracking import EventFiles

    cfg = tiny_cfg(tiny_root, str(tmp_path), epochs=2, batch_size=4, max_steps_per_epoch=3, log_every=1, name="run")
    run, written, latest_then = run_url(cfg), threading.Event(), []
    epoch_two = _after_steps(monkeypatch, 3)  # (3 steps per epoch: epoch 2 has trained one)
    store, write_state = EventFiles.store, mtl.checkpoint._write_state

    def held(self, detached, images=None, step=0):
        if images and step == 3:  # (epoch 1's end: the only store with pictures at step 3)
            assert epoch_two.wait(60), "epoch 2 never trained while the tracker stored epoch 1"
            assert written.wait(60)
            time.sleep(0.5)  # (time enough for a commit that would not wait)
            latest_then.append(CheckpointIndex(run).latest_tag())
        store(self, detached, images, step)

    def state_written(folder, state, *abandoned):
        write_state(folder, state, *abandoned)
        written.set()

    monkeypatch.setattr(EventFiles, "store", held)
    monkeypatch.setattr(mtl.checkpoint, "_write_state", state_written)
    fit(cfg, local_runtime(cfg))
    assert latest_then == [None]  # epoch 1's checkpoint waited for the tracker
    assert CheckpointIndex(run).read()["history"] == ["epoch-0001", "epoch-0002"]
    acc = EventAccumulator(f"{run}/tb", size_guidance={"scalars": 0, "images": 0}).Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))
    assert [e.step for e in acc.Scalars("val/miou")] == [e.step for e in acc.Images("images/val/0")] == [3, 6]
    assert os.path.getsize(f"{run}/curves.png") > 1000


def test_resume_refuses_another_architecture_other_data_and_a_training_split_of_another_size(tiny_root, tmp_path, monkeypatch,
                                                                                                   in_process):
    """A checkpoint continues only the training it belongs to: the same configuration, the data
    it was trained on (the same relative --root given in another folder names other data), and
    the same split size (the LR plan's length is in steps per epoch of the split trained on, and
    a step checkpoint's data position a place in its order: grown by a copy, the plan would end
    early and the last steps train at LR 0). The refusals name both sides; nothing is loaded."""
    import shutil

    from mtl.runs import RunConflict, run_url

    root = shutil.copytree(tiny_root, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg("data", str(tmp_path / "runs"), epochs=1, batch_size=8, max_steps_per_epoch=1, name="run")
    fit(cfg, local_runtime(cfg))
    with pytest.raises(ValueError, match=r"checkpoints/epoch-0001/state.pt exists: pass --resume to continue that run"):
        fit(cfg, local_runtime(cfg))  # the library, like the CLI, never continues (or overwrites) a run unasked
    other = dataclasses.replace(cfg, model=ModelConfig(arch="branched", encoder="resnet18"),
                                train=dataclasses.replace(cfg.train, resume=True, epochs=2))
    with pytest.raises(ValueError, match=r"resume refused: checkpoint .*checkpoints/epoch-0001/state.pt was trained with another configuration: "
                                         r"model.arch 'deeplabv3p' -> 'branched'"):
        fit(other, local_runtime(other))
    again = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True, epochs=2))
    shutil.copytree(tiny_root, tmp_path / "elsewhere" / "data")  # (other data: a copy is another place)
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(RunConflict, match=rf"resume refused: {run_url(cfg)}/checkpoints/epoch-0001/state.pt was trained on "
                                          rf"{root}, and --root data names {tmp_path}/elsewhere/data here \(a relative path given in "
                                          r"another folder\?\): give the run's data, or add --data-moved if it was moved there"):
        fit(again, local_runtime(again))
    from jobs import evaluate  # (evaluating it from there reads the data it trained on, as the checkpoint recorded)

    r = in_process(evaluate.main, ["--checkpoint", run_url(cfg), "--split", "val", "--no-metrics"])
    assert r.returncode == 0 and f"24 val samples from {root}/val" in r.stdout, r.stdout + r.stderr
    for i in range(90, 96):  # six training samples gone
        for folder, ext in (("rgb", "jpg"), ("semseg", "png"), ("depth", "png")):
            (root / "train" / folder / f"{i}.{ext}").unlink()
    # the same place spelt otherwise, from another folder (as a Ray worker continues a local run): no refusal for it
    spelt = again.with_values({"data.root": f"{root}/"})
    with pytest.raises(RunConflict, match=rf"resume refused: the training split of {root}/ has 90 samples, but "
                                          rf"{run_url(cfg)}/checkpoints/epoch-0001/state.pt was trained on 96: its LR plan"):
        fit(spelt, local_runtime(spelt))
    assert sorted(os.listdir(f"{run_url(cfg)}/checkpoints")) == ["epoch-0001", "latest.json"]


def test_a_run_started_with_a_crop_no_zoom_fills_resumes_saying_so(tiny_root, tmp_path, monkeypatch):
    """Such a crop is refused for new runs (`mtl.data.build.crop_note`); a run an earlier version
    started with one still resumes (--crop names it: it could not continue otherwise)."""
    import mtl.engine as engine
    from mtl.runs import run_url

    cfg = tiny_cfg(tiny_root, str(tmp_path), epochs=1, batch_size=4, max_steps_per_epoch=1, name="run")
    cfg = cfg.with_values({"data.crop": (96, 48)})
    with monkeypatch.context() as m:
        m.setattr(engine, "crop_note", lambda *a: None)  # (as before the refusal)
        fit(cfg, local_runtime(cfg))
    again = cfg.with_values({"train.resume": True, "train.epochs": 2})
    assert [r["epoch"] for r in fit(again, local_runtime(again)).metrics] == [2]
    assert ("--crop 96x48 is larger than the 64x128 images zoomed by at most --scale-max 1.25 (80x160): every crop would be "
            "padded with ignored pixels (sizes are HxW); this run started with it and goes on so") in open(f"{run_url(cfg)}/train.log").read()


def test_cli_train_evaluate_export(tiny_root, tmp_path, run_layout):
    run = [sys.executable, "jobs/train.py", "--local", "--arch", "branched", "--encoder", "resnet18", "--root", tiny_root,
           "--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "2", "--workers", "0", "--out", str(tmp_path),
           "--name", "cli"]
    r = subprocess.run(run, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validation after epoch 1" in r.stdout
    run_layout(str(tmp_path / "cli"), epochs=1)
    again = subprocess.run(run + ["--resume"], cwd=REPO, capture_output=True, text=True)  # a finished run stays finished
    assert again.returncode == 0 and "nothing to train" in again.stdout, again.stdout + again.stderr

    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "jobs/evaluate.py", "--checkpoint", str(tmp_path / "cli"), "--split", "test",
                        "--export", str(out), "--viz", "2", "--json", str(tmp_path / "m.json")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(os.listdir(out / "semseg")) == sorted(f"{i}.png" for i in range(16))
    assert len(os.listdir(out / "viz")) == 2

    # the exported files decode back to the model's predictions
    from mtl.engine import autocast, predict
    from mtl.losses import DepthCodec
    from mtl.models import build_model
    state = load_checkpoint(str(tmp_path / "cli" / "best.pt"))
    model = build_model(ExperimentConfig.from_dict(state["config"]).model)
    model.load_state_dict(state["model"])
    model.eval()
    s = to_model_batch({k: v[None] for k, v in MiniscapesFolder(tiny_root, "test")[4].items()}, torch.device("cpu"))
    labels, depth = predict(model, s["rgb"], DepthCodec("log"), autocast(torch.device("cpu"), False))
    got_l = decode_semseg((out / "semseg/4.png").read_bytes())
    got_d, valid = decode_depth((out / "depth/4.png").read_bytes())
    assert np.array_equal(got_l, labels[0].numpy())
    assert valid.all()
    want = depth[0].clamp(4, 300).numpy()
    half_step = (1 / 4 - 1 / 300) / 254 / 2
    assert np.abs(1 / got_d - 1 / want).max() <= half_step + 1e-6


def test_a_diverged_run_stops_with_an_error_naming_the_step(tiny_root, tmp_path):
    """NaN weights would train on, write no best.pt and report success: the first loss readout
    that is not finite stops the run instead."""
    cfg = tiny_cfg(tiny_root, str(tmp_path), epochs=1, batch_size=4, max_steps_per_epoch=3, log_every=1)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e30))
    with pytest.raises(ValueError, match=r"training diverged: the loss is nan by step \d of epoch 1 \(LR .*\): lower --lr"):
        fit(cfg, local_runtime(cfg))
    from mtl.runs import run_url

    last = open(f"{run_url(cfg)}/train.log").read().splitlines()[-1]  # (the run's record says how it ended)
    assert "the run failed: TrainingDiverged: training diverged: the loss is nan by step" in last


def test_a_loader_that_cannot_start_ends_the_run_as_failed(tiny_root, tmp_path, monkeypatch):
    """The first epoch's loader starts inside the run's ending: its error is the run's, train.log
    says so, and the tracker ends the run as failed."""
    import mtl.engine
    from mtl.runs import run_url
    from mtl.tracking import Tracker

    def cannot(self, *a, **k):
        raise OSError("the loader cannot start")

    closed = []
    close = Tracker.close
    monkeypatch.setattr(mtl.engine.Trainer, "_batches", cannot)
    monkeypatch.setattr(Tracker, "close", lambda self, failed=False: (closed.append(failed), close(self, failed=failed)))
    cfg = tiny_cfg(tiny_root, str(tmp_path), epochs=1, batch_size=4, max_steps_per_epoch=1)
    with pytest.raises(OSError, match="the loader cannot start"):
        fit(cfg, local_runtime(cfg))
    assert closed == [True]
    assert open(f"{run_url(cfg)}/train.log").read().splitlines()[-1].endswith("the run failed: OSError: the loader cannot start")


def test_an_interrupted_run_says_how_to_continue_in_its_log_and_on_the_terminal(tiny_root, tmp_path, capsys, monkeypatch):
    """Ctrl-C: no traceback; the terminal and train.log say that --resume continues; exit 130."""
    from jobs.train import main
    import mtl.engine

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mtl.engine.Trainer, "train_epoch", interrupted)
    assert main(["--local", "--root", tiny_root, "--out", str(tmp_path), "--name", "r", "--encoder", "resnet18", "--epochs", "1",
                 "--device", "cpu"]) == 130
    assert capsys.readouterr().err.endswith("interrupted; the same command with --resume continues from the latest checkpoint\n")
    last = open(tmp_path / "r/train.log").read().splitlines()[-1]
    assert last.endswith("interrupted (Ctrl-C or SIGINT); the same command with --resume continues from the latest checkpoint")


def test_sigterm_checkpoints_the_step_it_came_at_and_ends_the_run(tiny_root, tmp_path):
    """SIGTERM (docker stop, a pod's end, Slurm): the local run checkpoints the step it is at,
    in the foreground, and ends with exit 143, its lease released; --resume continues from that
    step, so the signal costs no step."""
    import json
    import signal

    args = ["jobs/train.py", "--local", "--root", tiny_root, "--out", str(tmp_path), "--name", "r", "--encoder", "resnet18",
            "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--log-every", "1", "--log-interval-s", "0"]
    p = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in p.stdout:  # (a progress line per step: the signal comes inside the epoch)
        seen.append(line)
        if "epoch 1/1 step 3/24" in line:
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=300)
    log = (tmp_path / "r/train.log").read_text()
    assert p.returncode == 143, "".join(seen) + out + err
    tag = json.loads((tmp_path / "r/checkpoints/latest.json").read_text())["latest"]
    step = int(tag.rsplit("-", 1)[1])
    assert tag.startswith("epoch-0000-step-") and 3 <= step < 24
    assert f"termination signal (SIGTERM) at step {step}: a checkpoint of this step, then the run ends" in log
    assert f"stopped by SIGTERM after checkpoint {tag}; the same command with --resume continues" in err
    assert log.splitlines()[-1].endswith(f"stopped by a termination signal (SIGTERM) after checkpoint {tag}; the same command "
                                         f"with --resume continues from the latest checkpoint")
    assert not (tmp_path / "r/driver.lease").exists()
    again = subprocess.run([sys.executable, *args, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resumed from {tmp_path}/r/checkpoints/{tag}/state.pt: epoch 0, step {step}/24 ({step} steps into epoch 1)" in again.stdout


def test_a_second_interrupt_while_the_run_waits_for_its_checkpoint_abandons_it_before_the_lease_goes(tiny_root, tmp_path,
                                                                                                    capsys, monkeypatch):
    """Ctrl-C: the run's end waits for the background checkpoint being written. Ctrl-C again:
    that write is given up, commits nothing and stops before the lease is released, since
    another driver may take the run from then on (it used to go on writing, and commit into the
    new driver's run)."""
    import signal
    import threading
    import time

    import mtl.checkpoint
    import mtl.engine
    import mtl.lease
    from jobs.train import main

    ending, signals, events = threading.Event(), [], []
    finish, write, release = (mtl.engine.Trainer._finish_checkpoint, mtl.checkpoint._AbandonableFile.write,
                              mtl.lease.RunLease.release)

    def slow_write(self, data):  # (a slow store; the interrupts come while it writes)
        if not signals:
            signals.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # (the first Ctrl-C, while training goes on)
        elif ending.is_set() and len(signals) == 1:
            signals.append(2)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)  # (the second, while the run's end waits for this write)
        events.append("write")
        time.sleep(0.05)
        return write(self, data)

    def finishing(self, failed):
        ending.set()
        return finish(self, failed)

    def releasing(self):
        events.append("release")
        return release(self)

    monkeypatch.setattr(mtl.checkpoint._AbandonableFile, "write", slow_write)
    monkeypatch.setattr(mtl.engine.Trainer, "_finish_checkpoint", finishing)
    monkeypatch.setattr(mtl.lease.RunLease, "release", releasing)
    # Ctrl-C as in a terminal (a Ray or Tune test before this one in the process may have left its own handler)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(["--local", "--root", tiny_root, "--out", str(tmp_path), "--name", "r", "--encoder", "resnet18", "--epochs", "2",
                     "--batch-size", "4", "--max-steps-per-epoch", "6", "--checkpoint-every", "2", "--workers", "0", "--device", "cpu"])
    finally:
        signal.signal(signal.SIGINT, before)
    assert code == 130 and signals == [1, 2]
    assert events[-1] == "release" and events.count("write") < 20  # (the write stopped, then the lease went)
    out = capsys.readouterr().out
    assert "checkpoint epoch-0000-step-00000002, being written, was abandoned: --resume goes on from the one before it" in out
    assert not (tmp_path / "r/checkpoints/latest.json").exists() and not list((tmp_path / "r").glob("checkpoints/*/state.pt"))


def test_a_sigterm_during_the_setup_ends_the_run_before_it_trains(tiny_root, tmp_path, capsys, monkeypatch):
    """Asked to end while it builds its data and model: nothing trained, nothing checkpointed
    (the same command starts it again), exit 143."""
    import signal

    import mtl.engine
    from jobs.train import main

    setup = mtl.engine.Trainer.__init__

    def signalled(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # (noted by the run's handler)
        setup(self, *args, **kwargs)

    monkeypatch.setattr(mtl.engine.Trainer, "__init__", signalled)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["--local", "--root", tiny_root, "--out", str(tmp_path), "--name", "r", "--encoder", "resnet18", "--epochs", "1",
                 "--device", "cpu"]) == 143
    assert capsys.readouterr().err.endswith("stopped by SIGTERM; the same command with --resume continues from the latest checkpoint\n")
    assert not (tmp_path / "r/checkpoints").exists() and signal.getsignal(signal.SIGTERM) is before  # (the handler back)


def test_a_full_disk_is_one_line_saying_so(tiny_root, tmp_path, capsys, monkeypatch):
    """ENOSPC (the OS names no file) as a user error: no traceback, where checkpoints are staged.
    The state is written into a full device for real (/dev/full): torch's writer of a path
    would raise a RuntimeError naming nothing."""
    import mtl.checkpoint
    from jobs.train import main

    write = mtl.checkpoint._write_state

    def into_a_full_device(folder, state, *abandoned):
        os.symlink("/dev/full", os.path.join(folder, "state.pt"))
        write(folder, state, *abandoned)

    monkeypatch.setattr(mtl.checkpoint, "_write_state", into_a_full_device)
    assert main(["--local", "--root", tiny_root, "--out", str(tmp_path), "--name", "r", "--encoder", "resnet18", "--epochs", "1",
                 "--max-steps-per-epoch", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: no space left on the device (No space left on device): free space on it") and "TMPDIR" in last
    assert "Traceback" not in err, err


def test_weights_that_are_no_longer_numbers_never_become_a_checkpoint(tiny_root, tmp_path, monkeypatch):
    """An update can turn the weights to NaN while its step's loss was still finite, and the
    loss is read only every --log-every steps: a checkpoint made then would be the latest, which
    every restart resumes. The checkpoint refuses them and the run stops; the last good one stays."""
    import mtl.engine as engine
    from mtl.checkpoint import CheckpointIndex
    from mtl.runs import run_url

    make_step = engine.make_step

    def poisoned_after_two(cfg, strategy, *a, **k):
        step, calls = make_step(cfg, strategy, *a, **k), []

        def run(*b, **c):
            out = step(*b, **c)
            calls.append(1)
            if len(calls) == 2:  # the second update: weights NaN, its loss (computed before) finite
                with torch.no_grad():
                    next(strategy.module.parameters()).fill_(float("nan"))
            return out
        return run

    monkeypatch.setattr(engine, "make_step", poisoned_after_two)
    cfg = tiny_cfg(tiny_root, str(tmp_path), epochs=1, batch_size=4, max_steps_per_epoch=4, log_every=100, checkpoint_every=1)
    with pytest.raises(ValueError, match=r"training diverged: the weights are no longer numbers by step 2 of epoch 1"):
        fit(cfg, local_runtime(cfg))
    assert CheckpointIndex(run_url(cfg)).latest_tag() == "epoch-0000-step-00000001"


def test_cli_bad_inputs_are_named(tmp_path, in_process, tiny_root, monkeypatch):
    """The commands' mains in this process (a shell's exit codes: tests/test_cli.py)."""
    from jobs import evaluate, train

    with monkeypatch.context() as m:  # MLflow asked for but not installed: before the run folder is made
        m.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
        m.setitem(sys.modules, "mlflow", None)
        r = in_process(train.main, ["--local", "--root", tiny_root, "--out", str(tmp_path / "mlf")])
        assert r.returncode == 2 and "MLFLOW_TRACKING_URI is set (http://127.0.0.1:1) but the mlflow package is not installed" in r.stderr
        assert not (tmp_path / "mlf").exists()

    # a crop no zoom of the 64x128 images fills (given as WxH, say): refused before anything is written
    r = in_process(train.main, ["--local", "--root", tiny_root, "--out", str(tmp_path / "runs"), "--crop", "128x64"])
    assert r.returncode == 2 and ("--crop 128x64 is larger than the 64x128 images zoomed by at most --scale-max 1.25 (80x160): "
                                  "every crop would be padded") in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))
    # ... and on the synthetic set, before it is generated (its size is the flag's)
    monkeypatch.setenv("STREETMTL_CACHE", str(tmp_path / "cache"))
    r = in_process(train.main, ["--local", "--quick", "--out", str(tmp_path / "runs"), "--crop", "512x1024"])
    assert r.returncode == 2 and "--crop 512x1024 is larger than the 64x128 images" in r.stderr, r.stderr
    assert not (tmp_path / "cache").exists()

    r = in_process(train.main, ["--local", "--arch", "nope"])
    assert r.returncode == 2 and "--arch must be one of" in r.stderr
    r = in_process(train.main, ["--local", "--semseg-weight", "1.5"])
    assert r.returncode == 2 and "--semseg-weight must lie in [0, 1]" in r.stderr
    r = in_process(train.main, ["--local", "--root", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert r.returncode == 2 and "Miniscapes folder missing" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    r = in_process(evaluate.main, ["--checkpoint", str(bad)])
    assert r.returncode == 2 and "bad.pt is unreadable or corrupt" in r.stderr
    r = in_process(evaluate.main, ["--checkpoint", str(tmp_path / "missing.pt")])
    assert r.returncode == 2 and "checkpoint not found" in r.stderr


def test_a_runs_end_ends_its_loader_workers_also_when_it_fails(tiny_root, tmp_path):
    """Loader workers end with the run that started them, not at some later garbage collection
    of the trainer: one that ran inside a later run's step cost it 5 s per worker (torch's join
    timeout), 80 s in one test process. A failed run ends them too."""
    import multiprocessing

    def fails(epoch, metrics):
        raise RuntimeError("a failure after epoch 1")

    before = set(multiprocessing.active_children())
    cfg = tiny_cfg(tiny_root, str(tmp_path), epochs=2, batch_size=4, max_steps_per_epoch=2).with_values({"data.workers": 2})
    fit(cfg, local_runtime(cfg))
    assert set(multiprocessing.active_children()) - before == set()
    cfg = cfg.with_values({"train.name": "fails"})
    with pytest.raises(RuntimeError, match="a failure after epoch 1"):
        fit(cfg, local_runtime(cfg), on_epoch_end=fails)
    assert set(multiprocessing.active_children()) - before == set()


def test_loaders_start_ahead_of_their_use(tiny_root, tmp_path, monkeypatch):
    """The next epoch's loader workers start (and fill their queues) while validation runs, and
    validation's before the epoch's last train steps, once the train loader has handed out its
    last batches (here, without loader processes: before the last step)."""
    import mtl.engine as engine
    from mtl.data.build import FolderLoader

    events = []
    start, evaluate, make_step, folder_iter = engine.start_epoch, engine.rt_evaluate, engine.make_step, FolderLoader.__iter__
    monkeypatch.setattr(engine, "start_epoch", lambda loader, epoch, *a: events.append(f"start {epoch}") or start(loader, epoch, *a))
    monkeypatch.setattr(engine, "rt_evaluate", lambda *a: events.append("validate") or evaluate(*a))
    monkeypatch.setattr(FolderLoader, "__iter__", lambda self: events.append(
        f"iter {'train' if self.loader.drop_last else 'val'}") or folder_iter(self))

    def counted_step(*a, **k):
        step = make_step(*a, **k)
        return lambda *b, **c: events.append("step") or step(*b, **c)

    monkeypatch.setattr(engine, "make_step", counted_step)
    cfg = tiny_cfg(tiny_root, str(tmp_path), epochs=3, batch_size=4, max_steps_per_epoch=3)
    fit(cfg, local_runtime(cfg))
    epoch = ["step", "step", "iter val", "step"]
    assert events == ["start 0", "iter train", *epoch, "start 1", "iter train", "validate", *epoch, "start 2", "iter train", "validate",
                      *epoch, "validate"]
