"""Map-style reader of a Miniscapes folder on a local disk or any fsspec URL (s3://, gs://, ...)."""

from __future__ import annotations

import os

import fsspec
import torch
from torch.utils.data import Dataset

from mtl.data.miniscapes import MODALITIES, SPLITS, decode_sample
from mtl.data.transforms import Augment, prepare, sample_rng


def list_split(root: str, split: str) -> list[str]:
    """Sample indices of one split, after checking that every sample has its three files.

    Raises FileNotFoundError naming the missing folder or files.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    fs, base = fsspec.core.url_to_fs(root)
    stems: dict[str, set[str]] = {}
    for mod, ext in MODALITIES.items():
        folder = f"{base.rstrip('/')}/{split}/{mod}"
        if not fs.isdir(folder):
            raise FileNotFoundError(f"Miniscapes folder missing: {_join(root, split, mod)}")
        names = [os.path.basename(p) for p in fs.ls(folder, detail=False)]
        stems[mod] = {n[: -len(ext) - 1] for n in names if n.endswith("." + ext)}
    everything = set().union(*stems.values())
    problems = [
        _join(root, split, mod, f"{s}.{MODALITIES[mod]}")
        for mod in MODALITIES for s in sorted(everything - stems[mod], key=_index_key)
    ]
    if problems:
        shown = ", ".join(problems[:10]) + (f" ... ({len(problems)} in all)" if len(problems) > 10 else "")
        raise FileNotFoundError(f"Miniscapes {split}: samples with a missing file: {shown}")
    if not everything:
        raise FileNotFoundError(f"Miniscapes {split}: no samples in {_join(root, split)}")
    return sorted(everything, key=_index_key)


def _index_key(stem: str) -> tuple[int, str]:
    return (int(stem), stem) if stem.isdigit() else (1 << 62, stem)


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


class MiniscapesFolder(Dataset):
    """One split of a Miniscapes folder. Items are dicts of tensors (see `transforms.to_tensors`)
    plus ``index`` (the file stem as int when numeric).

    The sampler may pass ``(epoch, i)`` instead of ``i``: augmentation is then seeded by
    (seed, epoch, i), which makes every epoch reproducible regardless of workers or resumes.
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
        rng = sample_rng(self.seed, epoch, i) if self.augment is not None else None
        out = prepare(sample, self.augment, rng)
        out["index"] = torch.tensor(int(stem) if stem.isdigit() else i)
        return out
