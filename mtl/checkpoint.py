"""Checkpoints: one layout in every mode, written by one checkpointer through a storage backend.

A run folder (`mtl.runs`) holds::

    checkpoints/<tag>/state.pt     rank 0's part: config, train state, RNG, metrics, model (+ optimizer)
    checkpoints/<tag>/shards/      every rank's own files, for sharded strategies (DeepSpeed's ZeRO)
    checkpoints/latest.json        {"latest": <tag>, "history": [...]}, written once the checkpoint is whole
    best.pt                        the best epoch's model (no optimizer): what one evaluates or ships
    metrics/<tag>.json             the validation metrics of that checkpoint

locally, on S3, and on Ray alike. `Checkpointer` saves and restores the run's stateful parts
(torchtitan's ``CheckpointManager`` over ``Stateful`` parts): the strategy's model and
optimizer, the `TrainState` and the RNGs. Where the folder goes is the storage backend's job: an
fsspec folder (`FolderStorage`) or Ray Train's ``report`` (`mtl.distributed.ray_train`), which
uploads the same folder to the same place. Readers (`load_checkpoint`: evaluation, prediction,
resume) never need to know which mode wrote a run.

A checkpoint is written so that a crash never leaves a half-written one that looks valid: the
folder first, then the small ``latest.json`` pointer that readers trust. It holds tensors and
plain data only (dicts, lists, tuples, numbers, strings) and is read with
``torch.load(weights_only=True)``: a file from a shared bucket cannot run code in the process
that evaluates or resumes from it, and one that tries is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import random
import re
import tempfile
import threading
import time
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from mtl.storage import (exists, is_local, json_bytes, missing_bucket, read_bytes, storage_errors, sync_local, url_to_fs,
                         write_bytes_atomic)
from mtl.strategy import Strategy

FORMAT = "streetmtl-checkpoint-v2"
READABLE_FORMATS = ("streetmtl-checkpoint-v1", FORMAT)  # v1: train state as top-level keys
CHECKPOINTS = "checkpoints"  # the run folder's sub-folder of checkpoints
STATE_FILE = "state.pt"
SHARDS_DIR = "shards"
POINTER = "latest.json"
BEST_FILE = "best.pt"
METRICS_DIR = "metrics"  # metrics/<tag>.json: an epoch's validation (step checkpoints have none)
_EPOCH_FILE = re.compile(r"epoch-(\d+)\.json")  # not a step checkpoint's tag (epoch-NNNN-step-NNNNNNNN)


def epoch_tag(epoch: int, step: int | None = None) -> str:
    """A checkpoint's tag: ``epoch-NNNN`` after epoch NNNN's validation, ``epoch-NNNN-step-SSSSSSSS``
    at global step S inside the epoch after it. Tags sort in the order they are written."""
    return f"epoch-{epoch:04d}" if step is None else f"epoch-{epoch:04d}-step-{step:08d}"


def tag_epoch(tag: str) -> int | None:
    """The epochs completed at checkpoint ``tag`` (None: not a checkpoint's tag)."""
    m = re.fullmatch(r"epoch-(\d+)(?:-step-\d+)?", tag)
    return int(m.group(1)) if m else None


def inside_epoch(tag: str) -> bool:
    """Whether checkpoint ``tag`` is a step checkpoint: inside the epoch after its epoch number."""
    return "-step-" in tag


def metrics_url(run_url: str, tag: str) -> str:
    """``<run>/metrics/<tag>.json``: the validation of epoch checkpoint ``tag``."""
    return f"{run_url.rstrip('/')}/{METRICS_DIR}/{tag}.json"


def _numpy_array_globals() -> list:
    """What a pickled numpy array needs: checkpoints written before the RNG state was stored as
    tensors hold numpy's MT19937 key array. Rebuilding an array runs no user code (torch's own
    recipe for numpy arrays under ``weights_only``)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def host_copy(obj: Any) -> Any:
    """``obj`` with every tensor copied into host memory that training does not touch: what a
    background write serialises while the next steps update the weights and the optimizer's
    moments in place. CUDA tensors are queued as non-blocking copies into pinned memory and
    waited for once (the copy follows the step on the current stream); CPU tensors are cloned.
    Dicts keep their type and attributes (a module's state dict carries ``_metadata``, which
    ``load_state_dict`` reads). A checkpoint holds tensors and plain data only (it is read with
    ``weights_only``): dicts, lists and tuples are the containers there are; other values are
    immutable and kept as they are."""
    on_gpu: list[torch.device] = []

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            if o.device.type == "cpu":
                return o.detach().clone()
            on_gpu.append(o.device)
            return o.detach().to("cpu", non_blocking=True)
        if isinstance(o, dict):
            out = type(o)()
            out.update((k, walk(v)) for k, v in o.items())
            if hasattr(o, "__dict__"):  # (an OrderedDict's attributes; a plain dict has none)
                out.__dict__.update(o.__dict__)
            return out
        if type(o) in (list, tuple):
            return type(o)(walk(v) for v in o)
        return o

    copy = walk(obj)
    for device in set(on_gpu):
        torch.cuda.synchronize(device)
    return copy


def finished() -> Future:
    """A future that is already done: a background write with nothing to wait for."""
    done: Future = Future()
    done.set_result(None)
    return done


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    return buf.getvalue()


def load_safely(data: bytes | io.IOBase, name: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain data; anything else (a pickled object,
    possibly one that runs code when loaded) is refused with an error naming ``name``."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else type(e).__name__)
        if "GLOBAL" not in detail:  # not a forbidden class: bytes that are no pickle at all
            raise ValueError(f"checkpoint {name} is unreadable or corrupt ({_why_corrupt(data, detail)})") from None
        raise ValueError(f"checkpoint {name} holds Python objects besides tensors and plain data; refused, since loading "
                         f"it could run code ({detail})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise ValueError(f"checkpoint {name} is unreadable or corrupt ({_why_corrupt(data, str(e))})") from e


def _why_corrupt(data: bytes | io.IOBase, detail: str) -> str:
    """torch's reason, or what the bytes show when it gives none (an empty file: EOFError(''))."""
    if isinstance(data, bytes) and not data:
        return "the file is empty (0 bytes)"
    first = next((ln.strip() for ln in detail.splitlines() if ln.strip()), "")
    return first or "no reason given by torch.load"


def rng_state() -> dict[str, Any]:
    """Every RNG the run uses, as tensors and plain data (numpy's state as its key tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}  # this rank's device's


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # (older checkpoints: numpy's own tuple)
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        # this rank's device only: the process that resumes may see fewer GPUs than the one
        # that saved (a local run's checkpoint continued on Ray, an elastic restart); older
        # checkpoints hold one state per device the saving process saw: its first (its own)
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)




# ------------------------------------------------------------------------ the stateful parts

class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Where training stands, saved in every checkpoint and restored on resume. The LR plan is a
    function of (``step``, ``total_steps``) and the data order of (seed, ``epoch``), and a
    checkpoint inside an epoch records how far into it the ranks got (``epoch_step``): these
    numbers are all a resume needs besides weights, optimizer and RNGs."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    epochs: int = 0  # epochs planned
    total_steps: int = 0  # optimizer steps planned: the LR plan's length
    best: float = float("-inf")  # best validation score so far (`mtl.multitask.selection_score`)
    restarts: int = 0  # how often this run was resumed
    input_size: list[int] | None = None  # (H, W) the model trains at (`mtl.data.build.Loaders.image_size`)
    # inside an unfinished epoch (a step checkpoint, `--checkpoint-every`): the data position
    epoch_step: int = 0  # optimizer steps of epoch ``epoch`` done (its first batches, per rank)
    epoch_loss: list[float] | None = None  # their summed losses [total, semseg, depth]
    lr: float | None = None  # the LR of the last of them (the epoch's, when a resume finds none left to train)
    epoch_lrs: list[float] | None = None  # the LRs of them all: a resumed epoch's LR curve is whole (curves.png)
    world: int = 1  # ranks that consumed them
    # loader worker processes per rank that dealt them: a shard stream's order depends on it
    # (None in checkpoints of earlier versions)
    loader_workers: int | None = None
    # samples trained on over all ranks, in the run and in epoch ``epoch`` (the data position
    # that ranks of another world size continue from; the LR plan runs over samples); None in
    # checkpoints of earlier versions (then: step and epoch_step times the planned global batch)
    samples: int | None = None
    epoch_samples: int | None = None
    # samples in the training split the LR plan and the data order were made for (None in
    # checkpoints of earlier versions): a resume on a split of another size is refused
    train_samples: int | None = None
    # where the data is (`mtl.runs.data_location`: absolute) the run was started on; None for the
    # synthetic set and in checkpoints of earlier versions. A relative --root resumed from another
    # folder names other data: refused (`mtl.engine.check_resumable`)
    data_location: str | None = None
    # the values Δm compares against (--baselines: task -> metrics), read when the run started
    # and kept: a baseline run still training between attempts would change the scores' scale
    baselines: dict[str, dict[str, float]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {f.name for f in dataclasses.fields(self)}
        for k, v in state.items():
            if k in known:
                setattr(self, k, list(v) if isinstance(v, tuple) else v)

    @classmethod
    def of(cls, checkpoint: dict[str, Any]) -> "TrainState":
        """The train state of a loaded checkpoint (`load_checkpoint` output)."""
        state = cls()
        state.load_state_dict(checkpoint.get("train_state") or {})
        return state


class RNGState:
    """Every RNG of this process as a stateful part (see `rng_state`)."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


# ------------------------------------------------------------------------- storage backends

class CheckpointIndex:
    """``<run>/checkpoints/latest.json``: the newest complete checkpoint and the ones kept."""

    def __init__(self, run_url: str) -> None:
        self.url = f"{run_url.rstrip('/')}/{CHECKPOINTS}"

    def read(self) -> dict[str, Any] | None:
        """The pointer, or None when there is none; ValueError naming it when it is unreadable."""
        data = read_bytes(f"{self.url}/{POINTER}")
        if data is None:
            return None
        try:
            pointer = json.loads(data)
            if isinstance(pointer["latest"], str) and all(isinstance(t, str) for t in pointer.get("history", [])):
                return pointer
        except (ValueError, KeyError, TypeError):
            pass
        raise ValueError(f"{self.url}/{POINTER} is corrupt (not a checkpoint pointer: {data[:80]!r}); it names the run's "
                         f"latest checkpoint, so nothing guesses one")

    def latest_tag(self) -> str | None:
        pointer = self.read()
        return None if pointer is None else pointer["latest"]

    def commit(self, tag: str, keep_last: int = 0) -> tuple[list[str], list[str]]:
        """Point at ``tag``; returns the tags the pointer now lists and those that fell out of the
        last ``keep_last`` (0: keep all, e.g. when Ray's own retention deletes them). Listed tags
        newer than ``tag`` leave the list: the run went on from an earlier checkpoint (past one
        deleted for being corrupt), and they would hold places of the ``keep_last`` that the
        checkpoints of this line of training need. On a local disk the checkpoint's files are
        synced to it first, and the pointer with them (`mtl.storage.sync_local`): after a power
        loss it names a checkpoint that is whole."""
        sync_local(f"{self.url}/{tag}")
        history = [t for t in (self.read() or {}).get("history", []) if t < tag] + [tag]  # (tags sort in write order)
        dropped = history[:-keep_last] if keep_last > 0 else []
        history = history[len(dropped):]
        write_bytes_atomic(f"{self.url}/{POINTER}", json.dumps({"latest": tag, "history": history}).encode(), sync=True)
        return history, dropped


class CheckpointStorage(Protocol):
    """Where checkpoint folders go. ``publish`` is called on every rank with the local folder
    that rank wrote (its shards; rank 0 also ``state.pt``), ``commit`` on rank 0 once all ranks
    published; ``latest`` yields ``(local folder, URL)`` of the checkpoint to resume, or None."""

    def publish(self, folder: str, tag: str, metrics: dict[str, Any]) -> None: ...

    def publish_later(self, tag: str, metrics: dict[str, Any], write: Callable[[str], None] | None,
                      then: Callable[[], None] | None) -> Future:
        """``publish`` in the background, on every rank: ``write(folder)`` fills a local folder
        (None: this rank has nothing to write), which is then published, and ``then()`` runs
        (rank 0: the commit). Returns at once; the future is done when ``then`` has run."""
        ...

    def commit(self, tag: str) -> None: ...

    def latest(self) -> contextlib.AbstractContextManager[tuple[str, str] | None]: ...

    @property
    def skipped(self) -> list[str]:
        """The tags the last ``latest`` passed over, their folders gone (`FolderStorage.latest`)."""
        ...

    def before(self, tag: str) -> str | None:
        """The newest checkpoint listed before ``tag``, if any."""
        ...


class FolderStorage:
    """Checkpoints in ``<run>/checkpoints/`` of any fsspec URL, the last ``keep_last`` kept."""

    def __init__(self, run_url: str, keep_last: int = 2) -> None:
        self.run_url, self.keep_last = run_url.rstrip("/"), keep_last
        self.index = CheckpointIndex(self.run_url)
        self._writer: ThreadPoolExecutor | None = None  # one thread: background checkpoints commit in order
        self.skipped: list[str] = []  # the tags the last `latest` passed over: their folders are gone

    def publish_later(self, tag: str, metrics: dict[str, Any], write: Callable[[str], None] | None,
                      then: Callable[[], None] | None) -> Future:
        if write is None and then is None:  # (a rank without files of its own)
            return finished()

        def job() -> None:
            if write is not None:
                with tempfile.TemporaryDirectory(prefix=staging_prefix()) as d:
                    write(d)
                    self.publish(d, tag, metrics)
            if then is not None:
                then()

        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streetmtl-checkpoint")
        return self._writer.submit(job)

    def publish(self, folder: str, tag: str, metrics: dict[str, Any]) -> None:
        """Copy ``folder`` into ``checkpoints/<tag>/`` (local mode: one process writes it). A
        folder of that tag already there was never committed (the pointer would have resumed from
        it): an attempt that died writing it, whose files (a killed write's temporary file of
        hundreds of MB among them) would otherwise stay in the new checkpoint for good."""
        self.delete([tag])
        for root, _, files in os.walk(folder):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
                with open(os.path.join(root, name), "rb") as fh:
                    write_bytes_atomic(f"{self.index.url}/{tag}/{rel}", fh.read())

    def commit(self, tag: str) -> None:
        """Point at ``tag``; delete the checkpoints that fell out of the last ``keep_last``, and
        (when not all are kept) any other checkpoint folder older than ``tag`` that the pointer
        does not list: one that a run published but died before committing, which nothing reads
        and nothing else deletes. A newer one stays (tags sort in the order they are written): a
        writer this one does not know of may be about to commit it (two drivers on one run
        folder; an attempt Ray is still tearing down), and its pointer must not name a folder
        that is gone."""
        listed, dropped = self.index.commit(tag, self.keep_last)
        if self.keep_last > 0:
            dropped += [name for name in self.folders() if name < tag and name not in listed and name not in dropped]
        self.delete(dropped)

    def folders(self) -> list[str]:
        """The tags of the checkpoint folders there are, whatever the pointer lists."""
        with storage_errors(self.index.url):
            fs, base = url_to_fs(self.index.url)
            if not fs.exists(base):
                return []
            return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(base, detail=True) if e["type"] == "directory"]

    def delete(self, tags: list[str]) -> None:
        with storage_errors(self.index.url):
            fs, base = url_to_fs(self.index.url)
            for old in tags:
                if fs.exists(f"{base}/{old}"):
                    fs.rm(f"{base}/{old}", recursive=True)

    @contextlib.contextmanager
    def latest(self) -> Iterator[tuple[str, str] | None]:
        """The checkpoint the pointer names; should its folder be gone (deleted by hand: the one
        named was corrupt, `Checkpointer.restore`'s advice), the newest whole one it lists before
        it, the skipped tags recorded in ``skipped`` (the resume says so)."""
        pointer, self.skipped = self.index.read(), []
        if pointer is None:
            yield None
            return
        tag = pointer["latest"]
        url = f"{self.index.url}/{tag}"
        if not exists(f"{url}/{STATE_FILE}"):
            whole = self.before(tag)
            if whole is None:
                old = exists(f"{url}.pt")  # (the layout before checkpoint folders: it evaluates, it does not resume)
                raise FileNotFoundError(_missing(self.index.url, tag) + (f"; {url}.pt, an earlier version's checkpoint, cannot "
                                                                        f"be resumed (it evaluates)" if old else ""))
            self.skipped = [tag, *(t for t in reversed(pointer.get("history", [])) if whole < t < tag)]
            url = f"{self.index.url}/{whole}"
        with local_copy(url) as folder:
            yield folder, url

    def before(self, tag: str) -> str | None:
        """The newest checkpoint the pointer lists before ``tag`` that is there (None: none)."""
        older = [t for t in reversed((self.index.read() or {}).get("history", [])) if t < tag]
        return next((t for t in older if exists(f"{self.index.url}/{t}/{STATE_FILE}")), None)


STAGING = "streetmtl-ckpt-"  # temporary folders a checkpoint is written or downloaded into (`staging_prefix`)


def staging_prefix() -> str:
    """A checkpoint's temporary folder's name: this machine's and process's, so that one left by
    a process killed while it wrote (a whole checkpoint: hundreds of MB) is known for
    `drop_stale_staging`."""
    from mtl.machine import machine_token

    return f"{STAGING}{machine_token()}-{os.getpid()}-"


def drop_stale_staging() -> list[str]:
    """Delete the checkpoint folders in the temporary folder that ended processes of this machine
    left (killed while writing or reading one); returns their names. Those of another process
    namespace, or where processes cannot be told apart (`mtl.machine.knows_its_processes`), once
    a day old (`STALE_STAGING_S`)."""
    import shutil

    from mtl.machine import knows_its_processes, machine_token, process_gone

    mine, tmp = f"{STAGING}{machine_token()}-", tempfile.gettempdir()
    ours = knows_its_processes()
    stale = [n for n in os.listdir(tmp) if n.startswith(STAGING) and (
        ours and n.startswith(mine) and process_gone(n[len(mine):].split("-", 1)[0])
        or not n.startswith(mine) and _age_s(os.path.join(tmp, n)) > STALE_STAGING_S)]
    for name in stale:
        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    return stale


#: a staging folder of another process namespace (a container restarted with its /tmp, a machine
#: whose processes cannot be told apart) is left behind once this old: a checkpoint's write or
#: download takes minutes, and the folder goes with it
STALE_STAGING_S = 24 * 3600.0


def _age_s(path: str) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return 0.0


def older_checkpoints(run_url: str, tag: str) -> str:
    """What else the run at ``run_url`` holds when its checkpoint ``tag`` cannot be used: the
    newest one its pointer lists before it that is there, and ``best.pt`` (for an error's end;
    "" when there is none, or they cannot be looked up: the error stays what it was)."""
    try:
        whole = FolderStorage(run_url).before(tag)
        other = ([f"{run_url}/{CHECKPOINTS}/{whole}"] if whole else []) + ([f"{run_url}/{BEST_FILE}"]
                                                                          if exists(f"{run_url}/{BEST_FILE}") else [])
    except Exception:  # noqa: BLE001 - a pointer or store that fails too: no hint
        return ""
    return f"; the run's other checkpoints: {', '.join(other)}" if other else ""


def _missing(checkpoints_url: str, tag: str) -> str:
    return f"{checkpoints_url}/{POINTER} names checkpoint {tag}, but {checkpoints_url}/{tag}/{STATE_FILE} is missing"


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """A checkpoint folder on this machine: itself when local, else downloaded to a temporary one."""
    if is_local(url):
        yield url_to_fs(url)[1]
        return
    with tempfile.TemporaryDirectory(prefix=staging_prefix()) as d:
        with storage_errors(url):  # (the download only: what the caller does with the copy is not storage's)
            fs, path = url_to_fs(url)
            fs.get(path.rstrip("/") + "/", d, recursive=True)
        yield d


# ------------------------------------------------------------------------- the checkpointer

class Checkpointer:
    """Saves and restores a run's stateful parts, the same way in every mode.

    ``states`` (e.g. ``{"train_state": TrainState, "rng": RNGState()}``) and the strategy's
    ``state_dict`` (model, optimizer) go into rank 0's ``state.pt``; a sharded strategy's files
    into ``shards/`` on every rank; rank 0 also writes ``metrics/<tag>.json``. Then the storage
    publishes the folder; once every rank has (a barrier), rank 0 commits the pointer and, for a
    new best score, writes ``best.pt``: only a committed epoch can be the best one (an attempt
    that fails before its commit trains the epoch again, maybe to another score).

    A save in the background (``background=True``: the engine's step and epoch checkpoints)
    copies rank 0's state into host memory and returns; serialising, publishing and the commit
    run on a writer thread while training goes on, so a checkpoint stalls training for the copy
    instead of the write (which, for ResNet34 with Adam's moments on S3, takes seconds). The
    pointer moves only once the checkpoint is whole, as before; until then the previous one is
    the latest. One write is in flight at a time: the next save waits for it, so checkpoints
    commit in the order they were taken and host memory holds one copy of the state. A sharded
    strategy's ranks write their own files, which a background write cannot coordinate: it
    always saves in the foreground.

    A background write that fails (a full disk, a store past its retries) costs that checkpoint
    only: the next save, which finds it failed, is taken all the same and says so (``replaced``),
    so a run that goes on loses no more than the steps since the one before; when it has the
    run's last epoch, none. A second failure in a row is raised: the storage is not coming back."""

    def __init__(self, storage: CheckpointStorage, run_url: str, strategy: Strategy, states: dict[str, Stateful],
                 rank: int = 0, on_written: Callable[[str, float], None] | None = None) -> None:
        self.storage, self.run_url, self.strategy, self.states, self.rank = storage, run_url.rstrip("/"), strategy, states, rank
        self.on_written = on_written  # rank 0, after a background checkpoint's commit: (tag, seconds it took)
        self._pending: Future | None = None  # the background write in flight
        self._pending_tag, self._replacing = "", False  # its tag; whether the last save replaced a failed one
        self._pending_best: dict[str, Any] | None = None  # rank 0: its host copy, when it is the best epoch's
        self.waited_s = 0.0  # how long the last save waited for the write before it
        self.replaced: str | None = None  # the last save's: the failed write it was taken in place of, and why
        self._abandoned = threading.Event()  # (`abandon`: the write in flight commits nothing)
        drop_stale_staging()  # (a killed run's: a whole checkpoint each, in this machine's temporary folder)

    def save(self, tag: str, config: dict[str, Any], metrics: dict[str, Any], is_best: bool, metrics_file: bool = True,
             background: bool = False, after: Future | None = None) -> bool:
        """Every rank: checkpoint ``tag``. ``metrics_file``: also ``metrics/<tag>.json`` (an
        epoch's validation; a step checkpoint inside an epoch has none). ``background``: return
        once the state is copied, if the strategy allows (see the class docstring). ``after``:
        the commit waits until it is done (the tracker's points up to this checkpoint stored,
        `mtl.tracking.Tracker.sync`); its failure is for its owner to raise, the checkpoint is
        committed all the same. Returns whether it is being written in the background."""
        t0 = time.perf_counter()
        self._wait_or_replace(tag)  # (the one in flight first: checkpoints commit in order)
        self.waited_s = time.perf_counter() - t0
        if background and not self.strategy.sharded:
            self._save_later(tag, config, metrics, is_best, metrics_file, after)
            return True
        state = None
        with tempfile.TemporaryDirectory(prefix=staging_prefix()) as d:
            if self.strategy.sharded:
                self.strategy.save_shards(os.path.join(d, SHARDS_DIR))
            if self.rank == 0:
                state = self._state(config, metrics, is_best)
                _write_state(d, state)
                if metrics_file:
                    self._write_metrics(tag, metrics)
            self.storage.publish(d, tag, metrics)
        self.strategy.barrier()  # every rank's files are in place before the pointer moves
        if self.rank == 0:
            _wait_for(after)
            self._commit(tag, metrics_file)
            if is_best:
                self._write_best(state)
        return False

    def _save_later(self, tag: str, config: dict[str, Any], metrics: dict[str, Any], is_best: bool, metrics_file: bool,
                    after: Future | None) -> None:
        """A background save (non-sharded: rank 0 alone writes files; the other ranks still call
        the storage, whose publishing may be collective, as Ray's report is)."""
        if self.rank != 0:
            self._pending = self.storage.publish_later(tag, metrics, None, None)
            return
        t0, held = time.perf_counter(), {"state": host_copy(self._state(config, metrics, is_best))}
        if metrics_file:
            self._write_metrics(tag, metrics)

        def then() -> None:
            _wait_for(after)
            if self._abandoned.is_set():
                raise Abandoned(f"checkpoint {tag} was abandoned before its commit")
            self._commit(tag, metrics_file)
            if is_best:
                self._write_best(held["state"])
            held.clear()  # (the copy is freed now, even while the storage's thread still holds these functions)
            if self.on_written:
                self.on_written(tag, time.perf_counter() - t0)

        self._pending_best = held if is_best else None  # (a failed write's best epoch: `_wait_or_replace`)
        self._pending = self.storage.publish_later(tag, metrics, lambda folder: _write_state(folder, held["state"], self._abandoned), then)  # (abandoned: raises before the upload)

    def _wait_or_replace(self, tag: str) -> None:
        """`wait`; a failed write is replaced by checkpoint ``tag`` (said in ``replaced``), unless
        the one before it failed too (then raised). The failed one's best epoch still becomes
        ``best.pt`` (from its host copy: the run goes on from that state, and no later epoch may
        beat its score). A failure after the commit (``best.pt``, the log line) is said, not
        counted: the checkpoint is the latest."""
        failed, best, self.replaced = self._pending_tag, self._pending_best, None
        self._pending_tag, self._pending_best = tag, None
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 - whatever the storage raised
            why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            if self._committed(failed):
                self.replaced, self._replacing = f"checkpoint {failed} was written, but what follows its commit failed ({why})", False
            elif self._replacing:
                raise
            else:
                self.replaced, self._replacing = f"checkpoint {failed} was not written ({why})", True
            if best and best.get("state") is not None:  # (rank 0: its best.pt, not yet written)
                self._write_best(best["state"])
                best.clear()
        else:
            self._replacing = False

    @property
    def replacing(self) -> bool:
        """Whether the last save replaced a checkpoint whose write failed (a second such failure
        in a row is raised)."""
        return self._replacing

    def _committed(self, tag: str) -> bool:
        """Whether the pointer names ``tag`` (rank 0's commit of a background write happened)."""
        try:
            return self.rank == 0 and CheckpointIndex(self.run_url).latest_tag() == tag
        except Exception:  # noqa: BLE001 - a store that fails here too: taken as not committed
            return False

    def abandon(self, wait_s: float = 10.0) -> tuple[str, str] | None:
        """Give up the background write in flight, if any (a second Ctrl-C or SIGTERM while the
        run's end waits for it): it commits nothing, its state file stops at its next tensor and
        is not uploaded; an upload under way goes on to its end (one file's write), uncommitted.
        Waited for up to ``wait_s`` seconds: returns its tag and what became of it, "abandoned"
        (not committed), "committed" (before the abandon reached it), or "uploading" (still: the caller
        must not let another driver take the run before it ends, `wait`). None: nothing in flight."""
        pending = self._pending
        if pending is None or pending.done():
            return None
        self._abandoned.set()
        tag = self._pending_tag
        try:
            error = pending.exception(timeout=wait_s)
        except futures.TimeoutError:
            return tag, "uploading"
        # (torch's writer may wrap the `Abandoned` of a write in a RuntimeError; best.pt's write may fail after the commit)
        return tag, ("committed" if error is None or self._committed(tag) else "abandoned")

    def wait(self) -> None:
        """Until the background write in flight, if any, is committed; raises its error if it
        failed (the pointer then still names the checkpoint before it). Interrupted (Ctrl-C),
        the write stays pending: the run's end waits for it again."""
        pending = self._pending
        if pending is None:
            return
        try:
            pending.result()
        finally:
            if pending.done():
                self._pending = None

    def _state(self, config: dict[str, Any], metrics: dict[str, Any], is_best: bool) -> dict[str, Any]:
        """Rank 0's part: ``is_best`` in it (a resume from it writes best.pt again, `restore`)."""
        return {"config": config, "metrics": metrics, "is_best": is_best, **{k: s.state_dict() for k, s in self.states.items()},
                **self.strategy.state_dict()}

    def _write_metrics(self, tag: str, metrics: dict[str, Any]) -> None:
        """At once, before the checkpoint exists: a failure in between resumes from the checkpoint
        before, which trains this epoch again and writes the file again. Synced to a local disk
        by the commit (`_commit`), off the training thread when the checkpoint is."""
        write_bytes_atomic(self._metrics_url(tag), json_bytes(metrics))

    def _metrics_url(self, tag: str) -> str:
        return metrics_url(self.run_url, tag)

    def _commit(self, tag: str, metrics_file: bool) -> None:
        """Rank 0: the pointer moves to ``tag``; on a local disk the epoch's metrics file is synced
        first, as the checkpoint is (`CheckpointIndex.commit`): after a power loss the pointer
        names no epoch whose metrics are lost (readers of a run's epochs need every one)."""
        if metrics_file:
            sync_local(self._metrics_url(tag))
        self.storage.commit(tag)

    def _write_best(self, state: dict[str, Any]) -> None:
        best = {k: v for k, v in state.items() if k in ("config", "metrics", "train_state", "model")}
        write_bytes_atomic(f"{self.run_url}/{BEST_FILE}", checkpoint_bytes(best), sync=True)

    def restore(self, check: Callable[[dict[str, Any]], None] = lambda state: None) -> dict[str, Any] | None:
        """Load the latest checkpoint into every part; ``check`` vets it (e.g. that it belongs to
        this configuration) before any part changes. Returns the loaded state, None if none."""
        with contextlib.ExitStack() as stack:
            try:
                found, failed = stack.enter_context(self.storage.latest()), None
            except Exception as e:  # (raised on every rank below: the others would wait for this one's gather)
                found, failed = None, e
            self._check_same_on_every_rank(found, failed)
            if found is None:
                return None
            folder, url = found
            try:
                state = _read(os.path.join(folder, STATE_FILE), f"{url}/{STATE_FILE}")
            except ValueError as e:  # (corrupt on the disk or in the bucket: the way on from the one before)
                raise ValueError(f"{e}; {self._way_past(url)}") from e
            state["skipped"] = list(self.storage.skipped)
            check(state)
            for key, part in self.states.items():
                part.load_state_dict(state[key])
            self.strategy.load_state_dict(state)
            if self.strategy.sharded:
                self.strategy.load_shards(os.path.join(folder, SHARDS_DIR))
        if self.rank == 0 and state.get("is_best"):  # (a failure between its commit and best.pt: best.pt is an older epoch)
            self._write_best(state)
        return state

    def _way_past(self, url: str) -> str:
        """What a checkpoint that cannot be read leaves to do."""
        tag = url.rstrip("/").rsplit("/", 1)[-1]
        before = self.storage.before(tag)
        if before is None:
            return f"no checkpoint before it is listed: delete {self.run_url}/{CHECKPOINTS} to train the run from its start"
        return f"delete the folder {url} and the resume goes on from {before}, the checkpoint before it"

    def _check_same_on_every_rank(self, found: tuple[str, str] | None, failed: Exception | None) -> None:
        """Every rank chose the same checkpoint (or none), before any part changes. Each reads
        the pointer on its own: one that moved in between (a writer of an attempt being torn
        down, a second driver on the run folder) would have the ranks train on from different
        steps, waiting for each other's collectives until a timeout or silently apart. A rank
        that could not choose (``failed``) raises its error, and the others one naming it."""
        gathered = self.strategy.gather_objects((None if found is None else found[1], None if failed is None else str(failed)))
        if failed is not None:
            raise failed
        errors = [(r, error) for r, (_, error) in enumerate(gathered) if error is not None]
        if errors:
            raise RuntimeError(f"rank {errors[0][0]} could not choose a checkpoint to resume: {errors[0][1]}")
        chosen = [url for url, _ in gathered]
        if len(set(chosen)) > 1:
            each = ", ".join(f"rank {r}: {url or 'none'}" for r, url in enumerate(chosen))
            raise RuntimeError(f"the ranks found different checkpoints to resume ({each}): {self.run_url}/{CHECKPOINTS}/"
                               f"{POINTER} changed while they read it; nothing was loaded, and a new attempt reads it again")


#: how long a checkpoint's commit waits for the tracker's points up to it (`Checkpointer.save`'s
#: ``after``): a tracking server that hangs (MLflow's client retries a request for minutes) must
#: not hold the checkpoint back; past this the checkpoint commits, and a resume from it may miss
#: or repeat a few points on the curves
TRACKING_WAIT_S = 60.0


def _wait_for(future: Future | None) -> None:
    """Until ``future`` is done, whatever its outcome, for `TRACKING_WAIT_S` at most."""
    if future is not None:
        futures.wait([future], timeout=TRACKING_WAIT_S)


class Abandoned(Exception):
    """A background checkpoint given up at the run's end (`Checkpointer.abandon`)."""


class _AbandonableFile:
    """A file torch.save writes into that raises `Abandoned` once ``abandoned`` is set."""

    def __init__(self, fh, abandoned: threading.Event | None) -> None:
        self.fh, self.abandoned = fh, abandoned

    def write(self, data) -> int:
        if self.abandoned is not None and self.abandoned.is_set():
            raise Abandoned("the checkpoint's write was abandoned")
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def _write_state(folder: str, state: dict[str, Any], abandoned: threading.Event | None = None) -> None:
    """``state.pt``, streamed into the file (no second copy in memory) through a Python file
    object: a full disk is then an ``OSError`` (ENOSPC, `mtl.errors.no_space`), where torch's own
    writer of a path raises a RuntimeError that names nothing; it stops once ``abandoned`` is set."""
    with open(os.path.join(folder, STATE_FILE), "wb") as fh:
        torch.save({"format": FORMAT, **state}, _AbandonableFile(fh, abandoned))
    if abandoned is not None and abandoned.is_set():  # (given up after its last tensor: not uploaded)
        raise Abandoned("the checkpoint's write was abandoned")


# ---------------------------------------------------------------------------------- readers

def _read(path: str, url: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    with open(path, "rb") as fh:
        return _checked(load_safely(fh, url, map_location), url)


def _checked(state: Any, url: str) -> dict[str, Any]:
    """A loaded file as a current checkpoint (v1's top-level train state moved into place)."""
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{url} is not a streetmtl checkpoint")
    if state["format"] != FORMAT:
        old = {k: state.pop(k) for k in ("epoch", "step", "epochs", "total_steps", "restarts", "input_size") if k in state}
        if "best_grader" in state:
            old["best"] = state.pop("best_grader")
        state["train_state"] = old
    state["url"] = url
    return state


def load_checkpoint(url: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint: a ``state.pt`` or ``best.pt`` file, a checkpoint folder, or a run
    folder (its latest checkpoint: `checkpoint_in_folder`). Errors name the file."""
    with storage_errors(url):
        fs, path = url_to_fs(url)
        if fs.isdir(path):
            url = checkpoint_in_folder(url)
            fs, path = url_to_fs(url)
        if not fs.exists(path):
            raise FileNotFoundError(missing_bucket(url) or f"checkpoint not found: {url}")
        data = fs.cat_file(path)
    try:
        return _checked(load_safely(data, url, map_location), url)
    except ValueError as e:  # (the run folder's latest, corrupt: name what else loads)
        run, tag = _run_and_tag(url)
        raise ValueError(f"{e}{older_checkpoints(run, tag) if run else ''}") from e


def _run_and_tag(url: str) -> tuple[str | None, str]:
    """``(<run>, <tag>)`` for ``<run>/checkpoints/<tag>/state.pt``, else ``(None, "")``."""
    head, _, file = url.rpartition("/")
    run, _, tag = head.rpartition("/")
    if file != STATE_FILE or not run.endswith(f"/{CHECKPOINTS}"):
        return None, ""
    return run[: -len(CHECKPOINTS) - 1], tag


def checkpoint_in_folder(url: str) -> str:
    """The checkpoint file a folder stands for: a checkpoint folder's ``state.pt``; a run
    folder's latest checkpoint (``checkpoints/latest.json``), else its ``best.pt``. Run folders
    written before the one layout are read too (``checkpoints/<tag>.pt``; Ray's
    ``epoch-NNNN/state.pt`` and ``final.pt``)."""
    url = url.rstrip("/")
    fs, path = url_to_fs(url)

    def candidates() -> Iterator[str]:  # in order of preference; the folder is listed only if needed
        yield STATE_FILE
        tag = CheckpointIndex(url).latest_tag()
        if tag:  # the run's pointer names its checkpoint: that one or an error, never an older file
            found = [n for n in (f"{CHECKPOINTS}/{tag}/{STATE_FILE}", f"{CHECKPOINTS}/{tag}.pt") if fs.exists(f"{path}/{n}")]
            if not found:
                raise FileNotFoundError(_missing(f"{url}/{CHECKPOINTS}", tag) + older_checkpoints(url, tag))
            yield found[0]
            return
        entries = sorted((p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)), reverse=True)
        yield from [f"{e}/{STATE_FILE}" for e in entries if e.startswith("epoch-")] + ["final.pt", BEST_FILE]

    for name in candidates():
        if fs.exists(f"{path}/{name}"):
            return f"{url}/{name}"
    raise FileNotFoundError(f"no checkpoint in {url} (looked for {CHECKPOINTS}/{POINTER}, {STATE_FILE} and {BEST_FILE})")


def committed_metrics(run_url: str) -> dict[int, dict[str, Any]]:
    """`epoch_metrics` of the epochs up to the checkpoint ``latest.json`` names: an epoch's file
    is written before its checkpoint commits, so an attempt that died in between (or one that
    started over, with another configuration, since) left the numbers of a model no checkpoint
    holds; {} before the first commit."""
    latest = CheckpointIndex(run_url.rstrip("/")).latest_tag()
    done = (tag_epoch(latest) or 0) if latest else 0
    return {e: m for e, m in epoch_metrics(run_url).items() if e <= done}


def epoch_metrics(run_url: str, cache: dict[str, dict[str, Any]] | None = None,
                  before: int | None = None) -> dict[int, dict[str, Any]]:
    """Every validated epoch's metrics (those before epoch ``before``, if given), by epoch number,
    from ``<run>/metrics/epoch-NNNN.json``: a resumed run's earlier attempts included. ``cache``
    (file -> metrics) spares re-reading files this process has read: an epoch's file is written
    once per attempt."""
    cache = {} if cache is None else cache
    url = f"{run_url.rstrip('/')}/{METRICS_DIR}"
    with storage_errors(url):
        fs, path = url_to_fs(url)
        fs.invalidate_cache(path)
        try:
            files = fs.ls(path, detail=False)
        except FileNotFoundError:
            return {}
        out = {}
        for file in files:
            m = _EPOCH_FILE.fullmatch(file.rstrip("/").rsplit("/", 1)[-1])
            if m and (before is None or int(m.group(1)) < before):
                if file not in cache:
                    cache[file] = {k: math.nan if v is None else v for k, v in json.loads(fs.cat_file(file)).items()}
                out[int(m.group(1))] = cache[file]
    return out
