"""Run tracking: what a person watches while a run trains, written by rank 0 only.

A `Tracker` records one training run in its run folder (`mtl.runs`; a local path or any fsspec
URL such as ``s3://bucket/prefix``)::

    tb/            TensorBoard event files: per-step scalars (train/..., weights/...), validation
                   scalars per epoch (val/<key>, iou/<class>) and images (images/<name>)
    curves.png     the whole run at a glance: drawn after an attempt's first validation and the
                   run's last, in between once a minute at most (`CURVES_EVERY_S`)
    mlflow.json    the MLflow run this training run logs to (only with MLFLOW_TRACKING_URI)

Event files are written with tensorboardX: pure Python over protobuf and numpy (what a core
install already has), while ``torch.utils.tensorboard`` needs the ``tensorboard`` package (its
web server, grpcio, Markdown...) on every training node just to write files. Viewing them
takes ``pip install tensorboard`` wherever one looks (`dev` extra).

Local run folders get the events directly in ``<run>/tb/`` (``tensorboard --logdir`` shows them
live). At every `Tracker.epoch` and `Tracker.sync` (the trainer's step checkpoints) the file so
far is closed and a new one begun. Object stores cannot append, so a remote run writes into a
local staging folder, and each closed file is uploaded whole (one PUT, `write_bytes_atomic`):
each byte is uploaded once and nothing half-written ever appears. Closing and uploading happen
on the tracker's own thread (`Tracker`); a checkpoint is committed only once the points before
it are stored, so the steps up to a checkpoint are never lost with the process that logged them.

Steps are global optimizer steps completed (`mtl.checkpoint.TrainState.step` after the update),
the number a checkpoint stores. A resumed attempt (``start_step`` = its checkpoint's step k)
opens its first event file with ``purge_step`` k + 1: readers (TensorBoard's accumulator through
the SessionLog START event that writes, its Rust data server through the step going back) then
hide what earlier attempts logged after step k, which this attempt trains again, so curves never
double back; what they logged up to k (the checkpoint's own epoch-end validation) stays. A step
checkpoint at an epoch's last step (a preemption notice) comes before that epoch's validation,
which an earlier attempt may have logged at k too: there ``purge_from`` k hides step k as well,
and the attempt logs its step values again (from the checkpoint) with the validation. MLflow
can neither hide nor replace points, so there each batch sent also sets the run's tags
``streetmtl.logged_through_step`` (step scalars) and ``streetmtl.validated_through_step`` (an
epoch's validation), and a resumed attempt sends nothing of either kind for the steps up to its
tag: an earlier attempt that failed after its checkpoint (and sent its last values on the way
out) keeps its values for the steps this one trains again, and no step has two. (Two tags: an
attempt that failed in validation sent its epoch's last step values, not its validation.)

MLflow (``MLFLOW_TRACKING_URI`` set): one MLflow run per training run, continued on resume (its
id in ``mlflow.json``; an attempt with no checkpoint to resume from begins a new one), in the
experiment ``MLFLOW_EXPERIMENT_ID`` / ``MLFLOW_EXPERIMENT_NAME`` names (else "streetmtl").
Step scalars are buffered and sent (by the tracker's thread) at every checkpoint and epoch end,
the validation metrics with them (`Tracker.step` stays free of network calls); curves.png goes up as an
artifact at `Tracker.close`. A tracking server that fails in the middle of a run costs its MLflow
record (one line in the log), never the training.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np

from mtl.checkpoint import epoch_metrics
from mtl.curves import draw_curves, number
from mtl.errors import one_line
from mtl.storage import StorageError, is_local, read_bytes, url_to_fs, write_bytes_atomic

TB_DIR = "tb"
CURVES_FILE = "curves.png"
# curves.png is redrawn after a validation only when the last drawing is this old, and at
# least 50 times as old as that drawing took (about a second of a child process, `mtl.curves`):
# a CPU core of the training node busy at most 2 % of the time (when drawing stalled training,
# a redraw after every epoch cost 3-4 % of a 40 s Miniscapes epoch). An attempt's first
# validation and the run's last are always drawn; an attempt that stops early draws its last
# epoch at close.
CURVES_EVERY_S = 60.0
CURVES_MAX_SHARE = 0.02
_clock = time.monotonic  # (tests move it)
MLFLOW_FILE = "mlflow.json"
# the last step an MLflow run has values for: step scalars, and an epoch's validation values
LOGGED_THROUGH_TAGS = {"step": "streetmtl.logged_through_step", "epoch": "streetmtl.validated_through_step"}
DEFAULT_EXPERIMENT = "streetmtl"
NO_MATPLOTLIB = "curves.png not drawn: matplotlib is not installed (pip install matplotlib)"
_BAD_CHARS = re.compile(r"[^\w./\-]")  # what both TensorBoard tags and MLflow names may hold


class TrackingError(ValueError):
    """Run tracking cannot start as configured (e.g. MLFLOW_TRACKING_URI set, mlflow missing).
    A ValueError, so the command lines report it as one line (`mtl.errors.USER_ERRORS`)."""


# ------------------------------------------------------------------------------ names, values

def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The real-number values of ``values``, under their `clean_name`."""
    return {clean_name(k): x for k, v in values.items() if (x := number(v)) is not None}


def epoch_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """An epoch's metrics as scalar tags: per-class IoU as ``iou/<class>``, the rest as
    ``val/<key>``; ``step`` is the axis itself and non-numeric values are left out."""
    return {(k if k.startswith("iou/") else f"val/{k}"): v for k, v in numeric(metrics).items() if k != "step"}


class _NoNanWarnings(logging.Filter):
    """tensorboardX warns "NaN or Inf found in input tensor." for every NaN it writes, a line
    without context in the run's log; here NaN is a value (the IoU of a class absent from the
    validation split), written as such."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "NaN or Inf found" not in record.getMessage()


def _quiet_nan_warnings() -> None:
    logger = logging.getLogger("tensorboardX.x2num")
    if not any(isinstance(f, _NoNanWarnings) for f in logger.filters):
        logger.addFilter(_NoNanWarnings())


def clean_name(key: str) -> str:
    """``key`` as a name TensorBoard and MLflow both keep as it is, so one value has one name in
    both (``iou/traffic light`` -> ``iou/traffic_light``): other characters become "_", path
    segments that MLflow would resolve to another name ("", ".", "..") are dropped."""
    parts = [p for p in _BAD_CHARS.sub("_", key).split("/") if p not in ("", ".", "..")]
    return "/".join(parts)[:250] or "_"


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested configuration as MLflow params: dotted keys (``optim.lr``), string values (lists
    as JSON), cut to 500 characters, the limit of older tracking servers."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
            out[clean_name(name)] = text[:500]
    return out


def public_uri(uri: str) -> str:
    """A tracking URI without the user and password it may carry, for logs and files."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.password and not parts.username:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ------------------------------------------------------------------------- TensorBoard files

class EventFiles:
    """The TensorBoard event files of one attempt of a run (see the module docstring): written
    into ``<run>/tb/`` directly for a local run, else staged locally and uploaded once closed.
    Nothing is created before the first event: a trainer built but never run leaves no file.

    Two threads share it (`Tracker`): the training thread adds scalars to the current file and
    `detach`-es it; the tracker's thread closes a detached file (with the images it is given)
    and uploads it (`store`). A remote run stages each file in its own numbered folder, so an
    upload takes only closed files, never the one the training thread is writing. (A local
    run's next file may begin before the last is closed: TensorBoard's default reader follows
    every file of a run; its older Python one, ``--load_fast=false``, may show that file's last
    points only after a reload.)"""

    def __init__(self, run_url: str, start_step: int, flush_secs: int = 30, purge_from: int | None = None) -> None:
        self.url, self.remote, self.flush_secs = f"{run_url}/{TB_DIR}", not is_local(run_url), flush_secs
        self.dir: str | None = None if self.remote else url_to_fs(self.url)[1]  # remote: the staging folder, once made
        self.writer: Any | None = None
        self._folder: str | None = None  # remote: the current file's staging folder
        self._opened = 0  # files begun (remote: names the staging folders in order)
        self._closed: list[str] = []  # remote: staging folders of closed files not uploaded yet, in order
        self._purge_step: int | None = start_step + 1 if purge_from is None else purge_from  # for the attempt's first file
        _quiet_nan_warnings()

    def _current(self) -> Any:
        """The writer, opening a new file if there is none (the first event of the attempt, or
        the first after a `detach`). File names sort in the order files are begun (readers
        read them in that order): the second of creation, then our nanosecond suffix, so two
        attempts started within one second neither share a file nor swap places."""
        if self.writer is None:
            from tensorboardX import SummaryWriter  # imports torch: only where a run records

            if self.dir is None:
                self.dir = tempfile.mkdtemp(prefix="streetmtl-tb-")
            logdir = self.dir
            if self.remote:
                self._folder = logdir = os.path.join(self.dir, f"{self._opened:08d}")
            self._opened += 1
            self.writer = SummaryWriter(logdir=logdir, purge_step=self._purge_step, max_queue=1000,
                                        flush_secs=self.flush_secs, filename_suffix=f".{time.time_ns()}")
            self._purge_step = None  # only an attempt's first file hides the steps it trains again
        return self.writer

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._current().add_scalar(tag, value, global_step=step)

    def detach(self, images: dict[str, np.ndarray] | None = None) -> tuple[Any, str | None] | None:
        """(The training thread.) The current file, to be closed by `store`, which adds
        ``images`` (tag -> HxWx3 uint8) to it; the next event begins a new file."""
        for tag, image in (images or {}).items():
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"image {tag} must be HxWx3 uint8, got {image.dtype} {tuple(image.shape)}")
        if images:
            self._current()
        detached = (self.writer, self._folder) if self.writer is not None else None
        self.writer = self._folder = None
        return detached

    def store(self, detached: tuple[Any, str | None] | None, images: dict[str, np.ndarray] | None = None,
              step: int = 0) -> None:
        """A `detach`-ed file with ``images`` at ``step`` closed (remote: and uploaded, with any
        earlier file whose upload failed). Closing, not flushing: tensorboardX's flush does not
        wait for the events its writer thread has yet to take from its queue, so the last points
        could still be missing."""
        if detached is not None:
            writer, folder = detached
            try:
                for tag, image in (images or {}).items():
                    writer.add_image(tag, image, global_step=step, dataformats="HWC")
            finally:
                try:
                    writer.close()
                finally:  # (its steps go with the next upload, whatever failed here)
                    if folder is not None:
                        self._closed.append(folder)
        self._upload()

    def _upload(self) -> None:
        """Each closed file whole to ``<run>/tb/``, then off the staging folder; files a failed
        upload left behind go with the next one."""
        while self._closed:
            folder = self._closed[0]
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                with open(path, "rb") as fh:
                    write_bytes_atomic(f"{self.url}/{name}", fh.read())
                os.remove(path)
            os.rmdir(folder)
            self._closed.pop(0)

    def close(self) -> None:
        """The last file closed and stored (after the tracker's thread has finished)."""
        self.store(self.detach())
        if self.remote and self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------------- MLflow

def _experiment_id(client: Any) -> str:
    """MLFLOW_EXPERIMENT_ID, else the experiment MLFLOW_EXPERIMENT_NAME (else "streetmtl")
    names, created if missing (another run may create it at the same moment)."""
    from mlflow.exceptions import MlflowException

    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(f"the MLflow experiment {name!r} is deleted: restore it, or set MLFLOW_EXPERIMENT_NAME to another")
    return exp.experiment_id


class MlflowRun:
    """The MLflow run of one training run (see the module docstring)."""

    def __init__(self, uri: str, run_url: str, run_name: str, config: dict[str, Any], log: Callable[[str], None],
                 start_step: int = 0) -> None:
        from mlflow import MlflowClient

        self.client, self.uri, self.log = MlflowClient(tracking_uri=uri), public_uri(uri), log
        self.pending: list[tuple[str, Any]] = []  # (kind: "step" or "epoch", metric) not yet sent
        self.broken = False  # a call failed mid-run: no more for this attempt
        self.logged_through = dict.fromkeys(LOGGED_THROUGH_TAGS, 0)  # per kind: the run has values up to this step
        self.run_id, params = self._continue(run_url, start_step) or self._start(run_url, run_name)
        self.skip_through = dict(self.logged_through)  # an earlier attempt's steps: MLflow keeps those values
        # (--resume itself is no setting of the run: it would differ on every resume)
        self._log_params({k: v for k, v in flatten(config).items() if k != "train.resume"}, params)

    def _continue(self, run_url: str, start_step: int) -> tuple[str, dict[str, str]] | None:
        """The run ``mlflow.json`` names, if this tracking server has it (not deleted) and this
        attempt resumes from a checkpoint; one that starts over (no checkpoint: ``start_step``
        0) begins a new MLflow run, since the old one's points would read as this one's."""
        from mlflow.exceptions import MlflowException

        stored = read_bytes(f"{run_url}/{MLFLOW_FILE}")
        if stored is None:
            return None
        run_id = json.loads(stored).get("run_id")
        if not run_id:
            return None
        if start_step == 0:
            self.log(f"MLflow: the run starts over (no checkpoint): a new MLflow run begins (run {run_id} keeps the "
                     f"earlier attempt's points)")
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            self.log(f"MLflow: run {run_id} of {MLFLOW_FILE} is not at {self.uri}; a new MLflow run begins")
            return None
        self.client.update_run(run_id, status="RUNNING")
        self.log(f"MLflow: continuing run {run_id} ({self._link(run.info.experiment_id, run_id)})")
        tags = run.data.tags  # (a tag edited by hand into no number: as if absent)
        self.logged_through = {kind: int(tags[tag]) if tags.get(tag, "").isdigit() else 0
                               for kind, tag in LOGGED_THROUGH_TAGS.items()}
        sent = max(self.logged_through.values())
        if sent > start_step:
            self.log(f"MLflow: an earlier attempt sent values up to step {sent}, after this attempt's checkpoint (step "
                     f"{start_step}); MLflow cannot replace points, so steps {start_step + 1}-{sent} keep that attempt's "
                     f"values there (TensorBoard shows this attempt's)")
        return run_id, dict(run.data.params)

    def _start(self, run_url: str, run_name: str) -> tuple[str, dict[str, str]]:
        experiment = _experiment_id(self.client)
        run = self.client.create_run(experiment, run_name=run_name, tags={"streetmtl.run_url": run_url})
        record = {"run_id": run.info.run_id, "experiment_id": experiment, "tracking_uri": self.uri}
        write_bytes_atomic(f"{run_url}/{MLFLOW_FILE}", json.dumps(record, indent=1).encode())
        self.log(f"MLflow: run {run.info.run_id} ({self._link(experiment, run.info.run_id)})")
        return run.info.run_id, {}

    def _link(self, experiment: str, run_id: str) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
        return f"experiment {experiment} at {self.uri}"

    def _log_params(self, params: dict[str, str], logged: dict[str, str]) -> None:
        """The configuration's params; on resume only new ones (MLflow refuses to change a
        param: settings that may differ on resume, e.g. the loader workers, keep their first)."""
        from mlflow.entities import Param

        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for chunk in _chunks(new, 100):
            self.client.log_batch(self.run_id, params=chunk)
        if changed:
            self.log(f"MLflow: params that differ on resume keep their first values: {', '.join(changed)}")

    def add(self, values: dict[str, float], step: int, kind: str = "step") -> None:
        """``values`` at ``step``: step scalars (``kind`` "step") or an epoch's validation ("epoch")."""
        from mlflow.entities import Metric

        if step <= self.skip_through[kind]:
            return  # sent by an earlier attempt: a second value for the step would read as a second run
        now = int(time.time() * 1000)
        self.pending += [(kind, Metric(k, v, now, step)) for k, v in values.items()]

    def _call(self, what: str, fn: Callable[[], Any]) -> None:
        """``fn``, unless a call failed before; a failure is logged and ends MLflow logging for
        this attempt (the client retries first; more retries would stall training each epoch)."""
        if self.broken:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the tracking server's failure must not end training
            self.broken = True
            self.log(f"MLflow: could not {what} at {self.uri} ({one_line(e)}); no more MLflow logging in this attempt, "
                     f"training goes on")

    def take(self) -> list[tuple[str, Any]]:
        """(The training thread.) The values added so far, for `send`; none are pending after."""
        batch, self.pending = self.pending, []
        return batch

    def send(self, batch: list[tuple[str, Any]]) -> None:
        """(The tracker's thread.) A `take`-n batch to the tracking server."""
        if batch:
            self._call(f"log {len(batch)} values", lambda: self._send(batch))

    def flush(self) -> None:
        self.send(self.take())

    def _send(self, batch: list[tuple[str, Any]]) -> None:
        """``batch`` (in step order) in chunks, each with the tags that say how far the run's values go."""
        from mlflow.entities import RunTag

        for chunk in _chunks(batch, 1000):
            for kind, m in chunk:
                self.logged_through[kind] = max(self.logged_through[kind], m.step)
            tags = [RunTag(tag, str(self.logged_through[kind])) for kind, tag in LOGGED_THROUGH_TAGS.items()]
            self.client.log_batch(self.run_id, metrics=[m for _, m in chunk], tags=tags)

    def finish(self, png: bytes | None, failed: bool) -> None:
        """The last values, curves.png as an artifact, and the run's end state."""
        self.flush()
        if png is not None:
            with tempfile.TemporaryDirectory(prefix="streetmtl-mlflow-") as d:
                with open(os.path.join(d, CURVES_FILE), "wb") as fh:
                    fh.write(png)
                self._call(f"upload {CURVES_FILE}", lambda: self.client.log_artifact(self.run_id, os.path.join(d, CURVES_FILE)))
        self._call("end the run", lambda: self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED"))


def mlflow_tracking_uri() -> str | None:
    """``MLFLOW_TRACKING_URI`` when it is set, else None; TrackingError when it is set and mlflow
    cannot be imported (checked before anything starts)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    try:
        importlib.import_module("mlflow")
    except ImportError:
        raise TrackingError(f"MLFLOW_TRACKING_URI is set ({public_uri(uri)}) but the mlflow package is not installed: "
                            f"pip install mlflow-skinny, or unset MLFLOW_TRACKING_URI") from None
    return uri


def start_mlflow(run_url: str, run_name: str, config: dict[str, Any], log: Callable[[str], None],
                 start_step: int = 0) -> MlflowRun | None:
    """The run's MLflow run when MLFLOW_TRACKING_URI is set, else None. A setup that cannot work
    fails here, before training: mlflow missing, or a server that refuses the run."""
    uri = mlflow_tracking_uri()
    if uri is None:
        return None
    try:
        return MlflowRun(uri, run_url, run_name, config, log, start_step)
    except (TrackingError, StorageError):
        raise
    except Exception as e:  # noqa: BLE001 - the client raises many types; all mean "cannot track"
        raise TrackingError(f"MLflow at MLFLOW_TRACKING_URI={public_uri(uri)}: {one_line(e)}") from e


# ---------------------------------------------------------------------------------- the tracker

class Tracker:
    """Rank 0's record of one run: TensorBoard event files in <run_url>/tb/, <run_url>/curves.png,
    and MLflow when MLFLOW_TRACKING_URI is set.

    Steps are global optimizer steps completed (`TrainState.step` after the update). ``start_step``:
    the step of the checkpoint this attempt resumes from (0 for a new run); what earlier attempts
    logged after it is hidden from TensorBoard, what they logged up to it stays. ``flush_secs``:
    how often a local run's events reach its folder. Use as a context manager (a failure ends
    the MLflow run as FAILED), or call `close` at the end.

    What is slow runs on the tracker's own thread, in the order it was asked for, while
    training goes on: closing and uploading event files, the validation pictures' PNG encoding,
    sending MLflow's values, drawing curves.png. The training thread only hands values over
    (`step`, `epoch`, `sync`); `epoch` and `sync` return a future that is done once the values so
    far are stored, which a checkpoint's commit waits for (`mtl.checkpoint.Checkpointer.save`).
    A failure there is raised by the training thread's next call (`step`, `epoch`, `sync`, or
    `close`), as it would have been by the call that failed, after the values it was given
    are handed over (an epoch's validation is never lost to an earlier failure). That thread's
    work mostly waits with the GIL released (PNG encoding in PIL, the network; s3fs's and
    MLflow's request handling holds it in short slices), so the training thread's steps are
    queued about as fast as before (`python jobs/benchmark.py background`); curves.png, whose
    drawing would hold the GIL for a second, is drawn by a child process (`mtl.curves`)."""

    def __init__(self, run_url: str, run_name: str, config: dict, *, start_step: int = 0, purge_from: int | None = None,
                 mlflow: bool = True, log: Callable[[str], None] = print, flush_secs: int = 30) -> None:
        self.run_url, self.run_name, self.log = run_url.rstrip("/"), run_name, log
        self.mlflow = start_mlflow(self.run_url, run_name, config, log, start_step) if mlflow else None
        self.events = EventFiles(self.run_url, start_step, flush_secs, purge_from)
        self._work = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streetmtl-tracker")  # (one: in order)
        self._failed: BaseException | None = None  # the first failure of the thread's work, not raised yet
        self._lock = threading.Lock()
        # (the tracker's thread alone from here on, and `close` once that thread is done)
        self._read: dict[str, dict[str, Any]] = {}  # metrics files read (`mtl.checkpoint.epoch_metrics`)
        self._png: bytes | None = None  # the last curves.png
        self._drawing = True  # False once matplotlib was found missing
        self._undrawn: tuple[int, int, dict[str, Any]] | None = None  # the last epoch not in curves.png yet
        self._draw_at = -math.inf  # when curves.png is next redrawn: at the first validation
        self._closed = False

    def step(self, step: int, values: dict[str, float]) -> None:
        """Per-step scalars, e.g. {"train/loss": .., "train/loss_semseg": .., "train/loss_depth": ..,
        "train/lr": .., "train/images_per_s": .., "weights/semseg": .., "weights/depth": ..}. Called every
        --log-every steps (already host floats: no GPU sync here). Must be cheap: no file upload here."""
        scalars = numeric(values)
        for tag, value in scalars.items():
            self.events.scalar(tag, value, step)
        if self.mlflow:
            self.mlflow.add(scalars, step)
        self._raise_failed()

    def epoch(self, epoch: int, step: int, metrics: dict[str, Any], images: dict[str, np.ndarray] | None = None,
              last: bool = False) -> Future:
        """After validation of an epoch: the validation metrics dict as mtl.metrics.MultiTaskMetrics.compute()
        returns it plus run keys (keys like miou, si_log_rmse, grader, score, mae, rmse, abs_rel, delta1..3,
        iou/<class name> per class, train_loss..., lr, epoch, step, and a list-valued 'epoch_lrs' to skip;
        non-numeric / NaN values must not crash). Written as TensorBoard scalars under val/<key> (per-class
        IoU under iou/<class>), images (name -> HxWx3 uint8) as TensorBoard images; everything so far
        stored (`sync`: the future returned); then curves.png is redrawn when due (`CURVES_EVERY_S`; always
        for the run's ``last`` epoch)."""
        scalars = epoch_scalars(metrics)
        for tag, value in scalars.items():
            self.events.scalar(tag, value, step)
        if self.mlflow:
            self.mlflow.add(scalars, step, "epoch")
        stored = self._store({clean_name(f"images/{name}"): np.asarray(image) for name, image in (images or {}).items()}, step)
        metrics = dict(metrics)  # (the caller's dict may change once this returns)
        self._work.submit(self._draw_if_due, epoch, step, metrics, last)
        self._raise_failed(stored)
        return stored

    def sync(self) -> Future:
        """Everything logged so far to its destination (the TensorBoard file closed, and uploaded
        for a remote run folder; MLflow's pending values sent), on the tracker's thread: the
        future returned is done once they are. A checkpoint's commit waits for it: a run that dies
        right after the checkpoint resumes from that step and logs only what came after, so the
        points up to it must already be stored."""
        stored = self._store()
        self._raise_failed(stored)
        return stored

    def wait(self) -> None:
        """Until the tracker's thread has done all it was given (curves.png included); raises
        its failure, if any."""
        self._work.submit(lambda: None).result()
        self._raise_failed()

    def _store(self, images: dict[str, np.ndarray] | None = None, step: int = 0) -> Future:
        detached = self.events.detach(images)
        batch = self.mlflow.take() if self.mlflow else []

        def store() -> None:
            try:
                self.events.store(detached, images, step)
            finally:  # (MLflow's values go even when the run folder cannot be reached)
                if self.mlflow:
                    self.mlflow.send(batch)

        return self._work.submit(self._recorded, store)

    def _recorded(self, fn: Callable[[], None]) -> None:
        """(The tracker's thread.) ``fn``; its failure kept for the training thread to raise."""
        try:
            fn()
        except BaseException as e:
            with self._lock:
                self._failed = self._failed or e
            raise

    def _raise_failed(self, stored: Future | None = None) -> None:
        """The tracker's thread's first failure, if any since the last call: raised once, after
        ``stored`` is done (the values just handed over: the checkpoint that follows, committed
        without waiting since this raises, comes after them)."""
        with self._lock:
            failed, self._failed = self._failed, None
        if failed is not None:
            if stored is not None:  # (bounded as a checkpoint's own wait is: a hung tracker holds nothing back)
                from mtl.checkpoint import TRACKING_WAIT_S

                futures.wait([stored], timeout=TRACKING_WAIT_S)
            raise failed

    def _draw_if_due(self, epoch: int, step: int, metrics: dict[str, Any], last: bool) -> None:
        self._undrawn = (epoch, step, metrics)
        if last or _clock() >= self._draw_at:
            self._try_draw()

    def _try_draw(self) -> None:
        """`_draw`; a failure is one line (tried again a minute later at the earliest), never the
        run's error: a picture, where the events, the checkpoint and training matter more."""
        try:
            self._draw()
        except Exception as e:  # noqa: BLE001 - matplotlib and storage raise many types
            self._draw_at = _clock() + CURVES_EVERY_S
            self.log(f"curves.png not drawn: {one_line(e)}")

    def _draw(self) -> None:
        """curves.png from the run folder's epochs up to the last one given to `epoch` (its
        metrics as given), if that one is not drawn yet."""
        if not self._drawing or self._undrawn is None:
            return
        (epoch, step, metrics), self._undrawn = self._undrawn, None
        started = _clock()
        epochs = {**epoch_metrics(self.run_url, self._read, before=epoch), epoch: metrics}
        png = draw_curves(epochs, f"{self.run_name}: epoch {epoch}, step {step}")
        if png is None:
            self._drawing = False
            self.log(NO_MATPLOTLIB)
            return
        write_bytes_atomic(f"{self.run_url}/{CURVES_FILE}", png)
        self._png = png
        took = _clock() - started
        self._draw_at = _clock() + max(CURVES_EVERY_S, took / CURVES_MAX_SHARE)

    def close(self, *, failed: bool = False) -> None:
        """Once the tracker's thread has done what it was given: the last epoch into curves.png
        (if not drawn yet: the run stopped early), the last events to the run folder, curves.png
        to MLflow and its run ended (FAILED with ``failed``: a resume sets it running again). A
        failure of the thread's work not raised yet is raised now, or, when the run already fails
        (``failed``), logged. Closing twice does nothing."""
        self._work.shutdown(wait=True)  # (again after an interrupted close: it waits again)
        if self._closed:
            return
        self._closed = True
        earlier, self._failed = self._failed, None
        try:
            self._try_draw()
            self.events.close()
        except BaseException:
            if earlier is not None:
                self.log(f"tracking had failed before: {one_line(earlier)}")
            raise
        finally:
            if self.mlflow:
                self.mlflow.finish(self._png, failed or earlier is not None)
        if earlier is not None and failed:
            self.log(f"tracking also failed: {one_line(earlier)}")
        elif earlier is not None:
            raise earlier

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)
