"""Map-style reader of a Miniscapes folder on a local disk or any fsspec URL (s3://, gs://, ...)."""

from __future__ import annotations

import os

import fsspec
import torch
from torch.utils.data import Dataset

from mtl.data.miniscapes import MODALITIES, SPLITS, decode_sample
from mtl.data.transforms import Augment, prepare, sample_rng


def scan_split(root: str, split: str) -> tuple[list[tuple[str, dict[str, int]]], list[str]]:
    """List one split: ``([(stem, {modality: file size})] for complete samples, [missing files])``.

    Raises FileNotFoundError naming a missing modality folder.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    fs, base = fsspec.core.url_to_fs(root)
    sizes: dict[str, dict[str, int]] = {}
    for mod, ext in MODALITIES.items():
        folder = f"{base.rstrip('/')}/{split}/{mod}"
        if not fs.isdir(folder):
            raise FileNotFoundError(f"Miniscapes folder missing: {_join(root, split, mod)}")
        sizes[mod] = {}
        for entry in fs.ls(folder, detail=True):
            name = os.path.basename(entry["name"].rstrip("/"))
            if name.endswith("." + ext):
                sizes[mod][name[: -len(ext) - 1]] = int(entry.get("size") or 0)
    everything = sorted(set().union(*(set(v) for v in sizes.values())), key=_index_key)
    complete = [(s, {m: sizes[m][s] for m in MODALITIES}) for s in everything if all(s in sizes[m] for m in MODALITIES)]
    missing = [_join(root, split, m, f"{s}.{MODALITIES[m]}") for s in everything for m in MODALITIES if s not in sizes[m]]
    return complete, missing


def list_split(root: str, split: str) -> list[str]:
    """Sample indices of one split, after checking that every sample has its three files.

    Raises FileNotFoundError naming the missing folder or files.
    """
    complete, missing = scan_split(root, split)
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise FileNotFoundError(f"Miniscapes {split}: samples with a missing file: {shown}")
    if not complete:
        raise FileNotFoundError(f"Miniscapes {split}: no samples in {_join(root, split)}")
    return [stem for stem, _ in complete]


def _index_key(stem: str) -> tuple[int, str]:
    return (int(stem), stem) if stem.isdigit() else (1 << 62, stem)


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


class MiniscapesFolder(Dataset):
    """One split of a Miniscapes folder. Items are compact uint8 tensors (rgb HxWx3, semseg,
    disparity codes; see `mtl.data.batch` for the conversion on the device) plus ``index``
    (the file stem as int when numeric).

    The sampler may pass ``(epoch, i)`` instead of ``i``: augmentation is then seeded by
    (seed, epoch, sample index), which makes every epoch reproducible regardless of workers,
    resumes or whether the sample comes from this folder or from a shard.
    """

    def __init__(self, root: str, split: str, augment: Augment | None = None, seed: int = 0) -> None:
        self.root, self.split, self.augment, self.seed = root, split, augment, seed
        self.indices = list_split(root, split)
        self.fs, self._base = fsspec.core.url_to_fs(root)

    def __len__(self) -> int:
        return len(self.indices)

    def read_bytes(self, i: int) -> dict[str, bytes]:
        stem = self.indices[i]
        out = {}
        for mod, ext in MODALITIES.items():
            path = f"{self._base.rstrip('/')}/{self.split}/{mod}/{stem}.{ext}"
            try:
                out[mod] = self.fs.cat_file(path)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"Miniscapes file missing: {_join(self.root, self.split, mod, stem + '.' + ext)}") from e
        return out

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, i = item if isinstance(item, tuple) else (0, item)
        raw = self.read_bytes(i)
        stem = self.indices[i]
        sample = decode_sample(raw["rgb"], raw["semseg"], raw["depth"], key=_join(self.root, self.split, stem))
        index = int(stem) if stem.isdigit() else i
        rng = sample_rng(self.seed, epoch, index) if self.augment is not None else None
        out = prepare(sample, self.augment, rng)
        out["index"] = torch.tensor(index)
        return out
