"""Run tracking (`mtl.tracking`): TensorBoard files read back with TensorBoard's own reader,
curves.png, resume hiding the steps a failed attempt logged, S3 run folders, MLflow."""

from __future__ import annotations

import io
import json
import math
import os
import sys

import numpy as np
import pytest
from PIL import Image

from mtl.storage import StorageError, url_to_fs, write_bytes_atomic
from mtl.tracking import MLFLOW_FILE, NO_MATPLOTLIB, Tracker, TrackingError, clean_name, epoch_scalars, flatten

STEPS = 4  # optimizer steps per simulated epoch
CONFIG = {"optim": {"lr": 4e-4, "poly_power": 0.9}, "data": {"workers": 2, "crop": [64, 128]}, "name": "x"}


def _metrics(epoch: int, attempt: int) -> dict:
    """An epoch's metrics as the trainer passes them (values differ per attempt)."""
    step = epoch * STEPS
    return {"miou": 10.0 * epoch + attempt, "si_log_rmse": 30.0 - epoch, "grader": 10.0 * epoch - 30, "score": 9.0 * epoch,
            "mae": 1.0, "iou/road": 80.0 + epoch + attempt, "iou/traffic light": float("nan"), "train_loss": 1.0 / epoch,
            "train_loss_semseg": 0.6 / epoch, "train_loss_depth": 0.4 / epoch, "lr": 1e-3 / epoch, "epoch": epoch, "step": step,
            "epoch_lrs": [1e-3 / epoch] * STEPS, "weights/semseg": 0.5, "weights/depth": 0.5, "restarts": attempt,
            "note": "not a number"}


def _steps(tracker: Tracker, steps: range, attempt: int) -> None:
    """Step scalars as the trainer logs them; step s of attempt a logs loss 1000 * a + s."""
    for step in steps:
        tracker.step(step, {"train/loss": 1000.0 * attempt + step, "train/lr": 1e-3, "train/images_per_s": 5.0,
                            "weights/semseg": 0.5, "weights/depth": 0.5, "train/odd": "skip me"})


def _train(tracker: Tracker, run_url: str, epochs: range, attempt: int, images: bool = False, last: int = 0) -> None:
    """What the trainer does: step scalars, then per epoch the checkpointer's metrics file and
    `Tracker.epoch` (``last``: the run's last epoch)."""
    for epoch in epochs:
        _steps(tracker, range((epoch - 1) * STEPS + 1, epoch * STEPS + 1), attempt)
        m = _metrics(epoch, attempt)
        write_bytes_atomic(f"{run_url}/metrics/epoch-{epoch:04d}.json", json.dumps(m).encode())
        pictures = {"val_0": np.full((8, 16, 3), 40 * epoch, np.uint8)} if images else None
        tracker.epoch(epoch, epoch * STEPS, m, pictures, last=epoch == last)
        tracker.wait()  # (the tracker's thread has stored it and drawn curves.png if due)


def _read(tb_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _read_s3(fs, path: str, local):
    """An S3 run folder's event files, downloaded into ``local`` and read."""
    fs.get(f"{path}/tb/", str(local), recursive=True)
    return _read(str(local))


def _points(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _assert_png(data: bytes) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.size == (1040, 560)


def test_local_run_writes_tensorboard_files_and_curves(tmp_path):
    run = str(tmp_path / "run")
    lines: list[str] = []
    with Tracker(run, "run", CONFIG, log=lines.append) as t:
        _train(t, run, range(1, 3), attempt=0, images=True)
    acc = _read(os.path.join(run, "tb"))
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/images_per_s", "weights/semseg", "val/miou", "iou/road", "val/train_loss",
                "val/weights/semseg"):
        assert tag in tags["scalars"], tag
    assert not {"train/odd", "val/note", "val/epoch_lrs", "val/step"} & set(tags["scalars"])
    assert tags["images"] == ["images/val_0"]
    assert [(i.step, i.width, i.height) for i in acc.Images("images/val_0")] == [(4, 16, 8), (8, 16, 8)]
    assert _points(acc, "train/loss") == [(s, float(s)) for s in range(1, 9)]
    assert _points(acc, "val/miou") == [(4, 10.0), (8, 20.0)]
    assert [s for s, v in _points(acc, "iou/traffic_light") if math.isnan(v)] == [4, 8]  # one name in TB and MLflow
    _assert_png((tmp_path / "run" / "curves.png").read_bytes())
    assert lines == []  # MLflow is off without MLFLOW_TRACKING_URI, matplotlib is there


def test_resumed_tracker_hides_what_the_failed_attempt_logged_after_its_checkpoint(tmp_path):
    """Attempt 0 trains 2 epochs but only epoch 1's checkpoint (step 4) survives; attempt 1
    resumes from it and trains epoch 2 again: every step appears once, the later value wins,
    and epoch 1's validation (logged at step 4, the checkpoint's step) stays."""
    run = str(tmp_path / "run")
    with Tracker(run, "run", CONFIG, log=print) as t:
        _train(t, run, range(1, 3), attempt=0)
    with Tracker(run, "run", CONFIG, start_step=STEPS, log=print) as t:
        _train(t, run, range(2, 3), attempt=1)
    assert len(os.listdir(os.path.join(run, "tb"))) == 3  # a file per epoch, closed at its end (all stored)
    acc = _read(os.path.join(run, "tb"))
    assert _points(acc, "train/loss") == [(s, float(s if s <= STEPS else 1000 + s)) for s in range(1, 9)]
    assert _points(acc, "val/miou") == [(4, 10.0), (8, 21.0)]


def test_s3_run_folder_gets_tb_files_and_curves(s3_prefix, tmp_path):
    run = f"{s3_prefix}/run"
    fs, path = url_to_fs(run)
    t = Tracker(run, "run", CONFIG, log=print)
    _train(t, run, range(1, 2), attempt=0, images=True)
    assert len(fs.ls(f"{path}/tb")) == 1  # epoch 1's file, uploaded at its end
    _assert_png(fs.cat_file(f"{path}/curves.png"))  # an attempt's first validation is drawn
    _steps(t, range(STEPS + 1, 2 * STEPS + 1), attempt=0)  # epoch 2, then a failure
    t.close()
    assert not os.path.exists(t.events.dir)  # the staging folder, all uploaded
    _assert_png(fs.cat_file(f"{path}/curves.png"))
    with Tracker(run, "run", CONFIG, start_step=STEPS, log=print) as t:  # resumed from epoch 1's checkpoint
        _train(t, run, range(2, 3), attempt=1)
    local = tmp_path / "tb"
    acc = _read_s3(fs, path, local)
    assert len(os.listdir(local)) == 3  # epoch 1's file, the rest of attempt 0, attempt 1's
    assert _points(acc, "train/loss") == [(s, float(s if s <= STEPS else 1000 + s)) for s in range(1, 9)]
    assert _points(acc, "val/miou") == [(4, 10.0), (8, 21.0)]
    assert [i.step for i in acc.Images("images/val_0")] == [4]
    _assert_png(fs.cat_file(f"{path}/curves.png"))


def test_training_logs_on_while_the_trackers_thread_uploads_an_epoch(s3_prefix, tmp_path, monkeypatch):
    """`epoch` only hands the epoch over: its file is closed and uploaded on the tracker's thread
    while the training thread logs the next steps into a new file, which that upload leaves
    alone; the future `epoch` returned is done once the epoch is stored."""
    import threading

    import mtl.tracking as tracking

    run, release, upload = f"{s3_prefix}/run", threading.Event(), tracking.write_bytes_atomic
    fs, path = url_to_fs(run)

    def held(url: str, data: bytes) -> None:
        if "/tb/" in url:
            assert release.wait(30)
        upload(url, data)

    monkeypatch.setattr(tracking, "write_bytes_atomic", held)
    t = Tracker(run, "run", CONFIG, log=print)
    _steps(t, range(1, STEPS + 1), attempt=0)
    write_bytes_atomic(f"{run}/metrics/epoch-0001.json", json.dumps(_metrics(1, 0)).encode())
    stored = t.epoch(1, STEPS, _metrics(1, 0), {"val_0": np.full((8, 16, 3), 40, np.uint8)})
    _steps(t, range(STEPS + 1, 2 * STEPS + 1), attempt=0)  # while epoch 1's file waits for its upload
    assert not stored.done() and not fs.exists(f"{path}/tb")
    release.set()
    stored.result()
    assert len(fs.ls(f"{path}/tb")) == 1
    t.close()
    local = tmp_path / "tb"
    acc = _read_s3(fs, path, local)
    assert len(os.listdir(local)) == 2
    assert _points(acc, "train/loss") == [(s, float(s)) for s in range(1, 2 * STEPS + 1)]
    assert _points(acc, "val/miou") == [(STEPS, 10.0)] and [i.step for i in acc.Images("images/val_0")] == [STEPS]
    _assert_png(fs.cat_file(f"{path}/curves.png"))


def test_an_earlier_failure_is_raised_only_once_the_epoch_is_handed_over(s3_prefix, tmp_path, monkeypatch):
    """A step checkpoint's upload fails on the tracker's thread; the epoch's end raises it, but
    only after its own values are handed over and stored (the checkpoint that follows is
    committed without waiting, and a resume from it must not lose the epoch's validation). A
    failure nothing raised yet is logged by a close of a failing run, or raised by a close."""
    import mtl.tracking as tracking

    run, upload, failures = f"{s3_prefix}/run", tracking.write_bytes_atomic, [1]
    fs, path = url_to_fs(run)

    def flaky(url: str, data: bytes) -> None:
        if "/tb/" in url and failures:
            failures.pop()
            raise OSError("the store is busy")
        upload(url, data)

    monkeypatch.setattr(tracking, "write_bytes_atomic", flaky)
    lines: list[str] = []
    t = Tracker(run, "run", CONFIG, log=lines.append)
    _steps(t, range(1, STEPS + 1), attempt=0)
    assert isinstance(t.sync().exception(), OSError)  # (a step checkpoint's: no step is logged after it)
    write_bytes_atomic(f"{run}/metrics/epoch-0001.json", json.dumps(_metrics(1, 0)).encode())
    with pytest.raises(OSError, match="the store is busy"):
        t.epoch(1, STEPS, _metrics(1, 0))
    acc = _read_s3(fs, path, tmp_path / "tb")  # stored before it raised: both files
    assert _points(acc, "train/loss") == [(s, float(s)) for s in range(1, STEPS + 1)] and _points(acc, "val/miou") == [(4, 10.0)]
    t.close(failed=True)
    assert lines == []  # (raised already)

    failures.append(1)
    t = Tracker(run, "run", CONFIG, start_step=STEPS, log=lines.append)
    _steps(t, range(STEPS + 1, STEPS + 3), attempt=1)
    t.sync().exception()
    t.close(failed=True)  # the run fails for another reason: the tracker's failure is one line
    assert lines == ["tracking also failed: the store is busy"]
    failures.append(1)
    t = Tracker(run, "run", CONFIG, start_step=STEPS, log=lines.append)
    _steps(t, range(STEPS + 1, STEPS + 3), attempt=2)
    t.sync().exception()
    with pytest.raises(OSError, match="the store is busy"):
        t.close()
    failures.extend([1, 1])  # the last upload fails too: that error is raised, the earlier one logged
    t = Tracker(run, "run", CONFIG, start_step=STEPS, log=lines.append)
    _steps(t, range(STEPS + 1, STEPS + 3), attempt=3)
    t.sync().exception()
    with pytest.raises(OSError, match="the store is busy"):
        t.close()
    assert lines[-1] == "tracking had failed before: the store is busy" and not failures


def test_unreachable_s3_is_an_error_naming_the_url_and_keeps_the_events(unreachable_s3):
    """The upload fails on the tracker's thread: the future `epoch` returned holds the error, and
    the training thread's next call raises it (once); the closed file waits in the staging folder."""
    t = Tracker("s3://streetmtl/nowhere", "nowhere", CONFIG, log=print)
    assert t.events.dir is None  # no staging folder before the first event
    try:
        t.step(1, {"train/loss": 1.0})
        stored = t.epoch(1, 1, _metrics(1, 0))
        with pytest.raises(StorageError, match="cannot reach s3://streetmtl/nowhere/tb/"):  # (curves.png: one line)
            stored.result()
        with pytest.raises(StorageError, match="cannot reach s3://streetmtl/nowhere/tb/"):
            t.step(2, {"train/loss": 1.0})
        t.step(2, {"train/loss": 1.0})  # (raised once)
        assert t.events.writer is not None  # step 2's new file, while epoch 1's closed one waits for an upload:
        closed, current = [os.path.join(t.events.dir, d) for d in sorted(os.listdir(t.events.dir))]
        assert [os.path.getsize(os.path.join(closed, n)) > 0 for n in os.listdir(closed)] == [True]
        assert len(os.listdir(current)) == 1
        with pytest.raises(StorageError, match="cannot reach s3://streetmtl/nowhere/tb/"):
            t.close()
    finally:
        import shutil

        shutil.rmtree(t.events.dir, ignore_errors=True)


def test_mlflow_run_is_continued_on_resume(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow-skinny; the dev extra has it)")
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3.x: file stores only on request
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tracking-test")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    run = str(tmp_path / "run")
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="node lost"):
        with Tracker(run, "my-run", {**CONFIG, "train": {"resume": False}}, log=lines.append) as t:
            _train(t, run, range(1, 2), attempt=0)
            _steps(t, range(STEPS + 1, STEPS + 3), attempt=0)
            raise RuntimeError("node lost")
    run_id = json.loads((tmp_path / "run" / MLFLOW_FILE).read_text())["run_id"]
    client = MlflowClient(uri)
    got = client.get_run(run_id)
    assert got.info.status == "FAILED" and got.info.run_name == "my-run"
    assert client.get_experiment(got.info.experiment_id).name == "tracking-test"
    assert got.data.params["optim.lr"] == "0.0004" and got.data.params["data.crop"] == "[64, 128]"
    assert [f.path for f in client.list_artifacts(run_id)] == ["curves.png"]

    resumed = {**CONFIG, "data": {"workers": 8, "crop": [64, 128]}, "train": {"resume": True}}  # an operational setting changed
    with Tracker(run, "my-run", resumed, start_step=STEPS, log=lines.append) as t:  # from epoch 1's checkpoint
        _train(t, run, range(2, 3), attempt=1)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.data.params["data.workers"] == "2"
    assert any("data.workers" in line for line in lines) and not any("train.resume" in line for line in lines)
    assert "train.resume" not in got.data.params  # (--resume differs on every resume: no setting of the run)
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    # the steps trained twice (5, 6) keep the failed attempt's values, sent on its way out: MLflow
    # cannot replace points, and two values for a step would read as two runs
    assert loss == [(s, float(s)) for s in range(1, 7)] + [(s, 1000.0 + s) for s in range(7, 9)]
    assert ("MLflow: an earlier attempt sent values up to step 6, after this attempt's checkpoint (step 4); MLflow "
            "cannot replace points, so steps 5-6 keep that attempt's values there (TensorBoard shows this attempt's)") in lines
    assert got.data.tags["streetmtl.logged_through_step"] == got.data.tags["streetmtl.validated_through_step"] == "8"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/miou")) == [4, 8]
    assert sorted(m.step for m in client.get_metric_history(run_id, "iou/traffic_light")) == [4, 8]
    assert len(client.search_runs([got.info.experiment_id])) == 1
    # an attempt that fails in validation has sent its epoch's last steps, not the validation:
    # the next one keeps those steps' values and sends the validation
    with pytest.raises(RuntimeError, match="validation failed"):
        with Tracker(run, "my-run", resumed, start_step=2 * STEPS, log=lines.append) as t:
            _steps(t, range(2 * STEPS + 1, 3 * STEPS + 1), attempt=2)
            raise RuntimeError("validation failed")
    with Tracker(run, "my-run", resumed, start_step=2 * STEPS, log=lines.append) as t:
        _train(t, run, range(3, 4), attempt=3)
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/miou")) == [4, 8, 12]
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert loss[-4:] == [(s, 2000.0 + s) for s in range(9, 13)] and len(loss) == 12

    other = (tmp_path / "other-mlruns").as_uri()  # a tracking server without that run: a new one begins
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    Tracker(run, "my-run", CONFIG, start_step=2 * STEPS, log=lines.append).close()
    assert f"MLflow: run {run_id} of {MLFLOW_FILE} is not at {other}; a new MLflow run begins" in lines
    new_id = json.loads((tmp_path / "run" / MLFLOW_FILE).read_text())["run_id"]
    assert new_id != run_id and MlflowClient(other).get_run(new_id).info.status == "FINISHED"

    # an attempt with no checkpoint starts over: a new MLflow run, not the old one's points beside its own
    with Tracker(run, "my-run", CONFIG, start_step=0, log=lines.append) as t:
        _steps(t, range(1, 3), attempt=2)
    over = json.loads((tmp_path / "run" / MLFLOW_FILE).read_text())["run_id"]
    assert over != new_id and any(f"a new MLflow run begins (run {new_id} keeps" in line for line in lines)
    assert sorted((m.step, m.value) for m in MlflowClient(other).get_metric_history(over, "train/loss")) == [(1, 2001.0), (2, 2002.0)]


def test_mlflow_tracking_uri_without_mlflow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:secret@mlflow.example:5000")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now fails as if it were not installed
    run = tmp_path / "run"
    with pytest.raises(TrackingError, match=r"^MLFLOW_TRACKING_URI is set \(http://mlflow.example:5000\) but the mlflow "
                                            r"package is not installed: pip install mlflow-skinny"):
        Tracker(str(run), "run", CONFIG)
    assert not run.exists()  # nothing started
    with Tracker(str(run), "run", CONFIG, mlflow=False) as t:  # tracking without MLflow still works
        t.step(1, {"train/loss": 1.0})
    assert _points(_read(str(run / "tb")), "train/loss") == [(1, 1.0)]


def test_curves_are_drawn_at_first_and_last_and_once_a_minute_at_most_between(tmp_path, monkeypatch):
    """A redraw keeps a core busy for a second or more: after an attempt's first validation and
    the run's last; in between only when the last drawing is a minute old (and 50 times older
    than it took); an attempt that stops early draws its last epoch at close."""
    import mtl.tracking as tracking

    clock, drawn = [0.0], []

    def draw(epochs, title):  # the real drawing, which takes 3 s on this clock
        drawn.append((sorted(epochs), title))
        clock[0] += 3.0
        return real_draw(epochs, title)

    real_draw = tracking.draw_curves
    monkeypatch.setattr(tracking, "_clock", lambda: clock[0])
    monkeypatch.setattr(tracking, "draw_curves", draw)
    run = str(tmp_path / "run")
    t = Tracker(run, "run", CONFIG, log=print)
    for epoch, at in ((1, 10.0), (2, 61.0), (3, 100.0), (4, 165.0), (5, 200.0)):
        clock[0] = at
        _train(t, run, range(epoch, epoch + 1), attempt=0, last=7)
    # epoch 1 first; 2 and 3 before 13 + 150 s (50 x 3 s); 4 drawn; 5 within the next 150 s
    assert [d[1] for d in drawn] == ["run: epoch 1, step 4", "run: epoch 4, step 16"]
    assert drawn[-1][0] == [1, 2, 3, 4]  # the earlier epochs from their metrics files
    t.close()  # the attempt stops (a failure): its last epoch is drawn now
    t.close()
    assert [d[1] for d in drawn][2:] == ["run: epoch 5, step 20"] and drawn[-1][0] == [1, 2, 3, 4, 5]
    _assert_png((tmp_path / "run" / "curves.png").read_bytes())
    with Tracker(run, "run", CONFIG, start_step=5 * STEPS, log=print) as t:  # resumed: first and last validation drawn
        clock[0] = 210.0
        _train(t, run, range(6, 8), attempt=1, last=7)
    assert [d[1] for d in drawn][3:] == ["run: epoch 6, step 24", "run: epoch 7, step 28"]
    monkeypatch.setattr(tracking, "draw_curves", lambda epochs, title: 1 / 0)
    lines: list[str] = []
    with Tracker(run, "run", CONFIG, start_step=7 * STEPS, log=lines.append) as t:
        clock[0] = 400.0
        t._draw_at = 1e9  # (as if drawn a moment ago)
        _train(t, run, range(8, 9), attempt=2)
    assert lines == ["curves.png not drawn: division by zero"]  # one line at close, not the run's error
    lines.clear()
    with Tracker(run, "run", CONFIG, start_step=8 * STEPS, log=lines.append) as t:  # the first validation's drawing fails
        clock[0] = 500.0
        _train(t, run, range(9, 11), attempt=3)  # ... and training goes on
    assert lines == ["curves.png not drawn: division by zero"] * 2  # (epoch 9's; then at close, epoch 10's: not due before)


def test_without_matplotlib_one_line_says_why_there_is_no_curves_png(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = str(tmp_path / "run")
    lines: list[str] = []
    with Tracker(run, "run", CONFIG, log=lines.append) as t:
        _train(t, run, range(1, 3), attempt=0)
    assert lines == [NO_MATPLOTLIB]
    assert not (tmp_path / "run" / "curves.png").exists()
    assert _points(_read(os.path.join(run, "tb")), "val/miou") == [(4, 10.0), (8, 20.0)]


def test_curves_are_drawn_in_a_child_process_that_imports_no_torch(tmp_path, monkeypatch):
    """matplotlib holds the GIL while it draws, which would slow the training thread: the drawing
    runs in a child process (`mtl.curves`), which starts without torch; its failure names it."""
    import subprocess

    from mtl.curves import draw_curves

    _assert_png(draw_curves({1: _metrics(1, 0), 2: _metrics(2, 0)}, "run"))
    r = subprocess.run([sys.executable, "-c", "import sys, mtl.curves; print('torch' in sys.modules)"],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.stdout.strip() == "False", r.stderr
    (tmp_path / "numbers.py").write_text("raise ImportError('a folder of the working directory shadowed a module')\n")
    monkeypatch.chdir(tmp_path)  # (the child has no working directory on its path)
    _assert_png(draw_curves({1: _metrics(1, 0)}, "run"))
    with pytest.raises(RuntimeError, match=r"^the child process drawing curves.png \(mtl.curves\): TypeError: unsupported operand"):
        draw_curves({1: _metrics(1, 0)}, 3)  # (a title that is no string)


def test_the_curves_child_imports_the_package_its_parent_imported(tmp_path):
    """A parent that found this package through a path it added at run time (no install, another
    working directory): the child gets that root, not whatever else is installed under the name."""
    import shutil
    import subprocess

    root = tmp_path / "copy"
    (root / "mtl").mkdir(parents=True)
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mtl", "curves.py"), root / "mtl")
    (root / "mtl" / "__init__.py").write_text("import os\nopen(os.path.join(os.path.dirname(__file__), f'imported-by-{os.getpid()}'), 'w').close()\n")
    (tmp_path / "elsewhere").mkdir()
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); from mtl.curves import draw_curves; "
            f"png = draw_curves({{1: {{'miou': 1.0, 'score': 1.0}}}}, 'run'); print(png[:4] == b'\\x89PNG')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "elsewhere", capture_output=True, text=True)
    assert r.stdout.strip() == "True", r.stderr
    assert len([n for n in os.listdir(root / "mtl") if n.startswith("imported-by-")]) == 2  # the parent and the child


def test_names_and_values():
    assert clean_name("val/../a:b/./c d") == "val/a_b/c_d"
    assert epoch_scalars({"miou": 1, "iou/road": 2.0, "step": 3, "epoch_lrs": [1.0], "ok": True, "x": None}) == \
        {"val/miou": 1.0, "iou/road": 2.0}
    assert flatten({"a": {"b": 1, "c": [1, 2], "d": {}}, "e": None}) == {"a.b": "1", "a.c": "[1, 2]", "a.d": "{}", "e": "None"}


def test_curves_shade_a_resume_inside_the_first_epoch_and_draw_its_whole_lr_curve():
    """Resumed inside epoch 1 (its restarts count is 1 from the start): shaded like any other
    resumed epoch; its LRs are the epoch's, those before the resume included (the checkpoint's)."""
    from mtl.curves import _lr_curve, _resumed

    epochs = {1: {"restarts": 1, "step": 3, "epoch_lrs": [3e-3, 2e-3, 1e-3], "lr": 1e-3},
              2: {"restarts": 1, "step": 6, "epoch_lrs": [9e-4, 8e-4, 7e-4], "lr": 7e-4},
              3: {"restarts": 2, "step": 9, "epoch_lrs": [6e-4, 5e-4, 4e-4], "lr": 4e-4}}
    assert _resumed(epochs) == [1, 3]
    assert _resumed({1: {"restarts": 0}, 2: {"restarts": 0}}) == []
    xs, ys = _lr_curve(epochs)
    assert xs == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2, 7 / 3, 8 / 3, 3]) and ys[0] == 3e-3
