"""Checkpoints on any fsspec URL (local folder, s3://...), written so a crash never leaves a
half-written one that looks valid: the data file first (atomically renamed where the filesystem
allows), then the small ``latest.json`` pointer that readers trust."""

from __future__ import annotations

import io
import json
import random
import uuid
from typing import Any

import fsspec
import numpy as np
import torch

FORMAT = "streetmtl-checkpoint-v1"


def _fs(url: str):
    return fsspec.core.url_to_fs(url)


def write_bytes_atomic(url: str, data: bytes) -> None:
    fs, path = _fs(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if getattr(fs, "protocol", None) in ("file", ("file", "local")) or "file" in fs.protocol:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)
    else:  # object stores: a PUT is atomic per object
        with fs.open(path, "wb") as fh:
            fh.write(data)


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    return buf.getvalue()


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
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
            fs, path = _fs(f"{self.url}/{old}.pt")
            if fs.exists(path):
                fs.rm(path)
        history = history[-self.keep_last:] if self.keep_last > 0 else history
        write_bytes_atomic(f"{self.url}/latest.json", json.dumps({"latest": tag, "history": history}).encode())
        return url

    def _history(self) -> list[str]:
        fs, path = _fs(f"{self.url}/latest.json")
        if not fs.exists(path):
            return []
        return json.loads(fs.cat_file(path))["history"]

    def latest(self) -> str | None:
        fs, path = _fs(f"{self.url}/latest.json")
        if not fs.exists(path):
            return None
        return f"{self.url}/{json.loads(fs.cat_file(path))['latest']}.pt"


def load_checkpoint(url: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or the latest one of a run folder. Errors name the file."""
    fs, path = _fs(url)
    if fs.isdir(path):
        latest = CheckpointDir(url).latest()
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {url} (no checkpoints/latest.json)")
        url, (fs, path) = latest, _fs(latest)
    if not fs.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {url}")
    try:
        state = torch.load(io.BytesIO(fs.cat_file(path)), map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise ValueError(f"checkpoint {url} is unreadable or corrupt ({e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{url} is not a streetmtl checkpoint")
    state["url"] = url
    return state
