"""Checkpoints on any fsspec URL (local folder, s3://...), written so a crash never leaves a
half-written one that looks valid: the data file first (atomically renamed where the filesystem
allows), then the small ``latest.json`` pointer that readers trust.

A checkpoint holds tensors and plain data only (dicts, lists, tuples, numbers, strings) and is
read with ``torch.load(weights_only=True)``: a file from a shared bucket cannot run code in the
process that evaluates or resumes from it, and one that tries is refused with a clear error.
"""

from __future__ import annotations

import io
import json
import pickle
import random
from typing import Any

import numpy as np
import torch

from mtl.storage import read_bytes, storage_errors, url_to_fs, write_bytes_atomic

FORMAT = "streetmtl-checkpoint-v1"
STATE_FILE = "state.pt"  # inside a checkpoint folder reported to Ray (`mtl.strategy.PlainStrategy.save_dir`)


def _numpy_array_globals() -> list:
    """What a pickled numpy array needs: checkpoints written before the RNG state was stored as
    tensors hold numpy's MT19937 key array. Rebuilding an array runs no user code (torch's own
    recipe for numpy arrays under ``weights_only``)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


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
            raise ValueError(f"checkpoint {name} is unreadable or corrupt ({detail})") from None
        raise ValueError(f"checkpoint {name} holds Python objects besides tensors and plain data; refused, since loading "
                         f"it could run code ({detail})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise ValueError(f"checkpoint {name} is unreadable or corrupt ({e})") from e


def rng_state() -> dict[str, Any]:
    """Every RNG the run uses, as tensors and plain data (numpy's state as its key tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # (older checkpoints: numpy's own tuple)
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointDir:
    """``<run>/checkpoints/``: epoch files, ``latest.json`` and ``best.pt``; keeps the last K."""

    def __init__(self, run_url: str, keep_last: int = 2) -> None:
        self.url = run_url.rstrip("/") + "/checkpoints"
        self.keep_last = keep_last

    def save(self, state: dict[str, Any], tag: str, is_best: bool = False) -> str:
        data = checkpoint_bytes(state)
        url = f"{self.url}/{tag}.pt"
        write_bytes_atomic(url, data)
        if is_best:
            write_bytes_atomic(f"{self.url}/best.pt", data)
        history = self._history() + [tag]
        for old in history[: -self.keep_last] if self.keep_last > 0 else []:
            fs, path = url_to_fs(f"{self.url}/{old}.pt")
            if fs.exists(path):
                fs.rm(path)
        history = history[-self.keep_last:] if self.keep_last > 0 else history
        write_bytes_atomic(f"{self.url}/latest.json", json.dumps({"latest": tag, "history": history}).encode())
        return url

    def _pointer(self) -> dict[str, Any] | None:
        data = read_bytes(f"{self.url}/latest.json")
        return None if data is None else json.loads(data)

    def _history(self) -> list[str]:
        pointer = self._pointer()
        return [] if pointer is None else pointer["history"]

    def latest(self) -> str | None:
        pointer = self._pointer()
        return None if pointer is None else f"{self.url}/{pointer['latest']}.pt"


def load_checkpoint(url: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or the latest one of a run folder (`checkpoint_in_folder`).
    Errors name the file."""
    with storage_errors(url):
        fs, path = url_to_fs(url)
        if fs.isdir(path):
            url = checkpoint_in_folder(url)
            fs, path = url_to_fs(url)
        if not fs.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {url}")
        data = fs.cat_file(path)
    state = load_safely(data, url, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{url} is not a streetmtl checkpoint")
    state["url"] = url
    return state


def checkpoint_in_folder(url: str) -> str:
    """The latest checkpoint with model weights in a run folder: ``checkpoints/latest.json``'s
    (local runs), the newest ``epoch-NNNN/state.pt`` (DDP on Ray), else ``final.pt`` or ``best.pt``
    (DeepSpeed on Ray keeps sharded states in its epoch folders)."""
    url = url.rstrip("/")
    latest = CheckpointDir(url).latest()
    if latest is not None:
        return latest
    fs, path = url_to_fs(url)
    epochs = sorted((p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)), reverse=True)
    for name in [f"{e}/{STATE_FILE}" for e in epochs if e.startswith("epoch-")] + ["final.pt", "best.pt"]:
        if fs.exists(f"{path}/{name}"):
            return f"{url}/{name}"
    raise FileNotFoundError(f"no checkpoint in {url} (looked for checkpoints/latest.json, epoch-NNNN/{STATE_FILE}, final.pt "
                            f"and best.pt)")
