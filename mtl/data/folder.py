"""Map-style reader of a Miniscapes folder on a local disk or any fsspec URL (s3://, gs://, ...).

A split has ``rgb/``, ``semseg/`` and ``depth/``, or only ``rgb/`` (a real test split, whose
labels are withheld): items of such a split carry ``rgb`` and ``index`` only.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from mtl.data.miniscapes import (CONVERSION_INDEX, CONVERSION_PLAN, LABEL_MODALITIES, MODALITIES, SHARD_PROGRESS, SPLITS,
                                 decode_sample, sample_index)
from mtl.data.transforms import Augment, prepare, sample_rng
from mtl.storage import missing_bucket, storage_errors, url_to_fs


def split_modalities(root: str, split: str) -> tuple[str, ...]:
    """The modality folders of one split: all three, or ``("rgb",)`` for a split without labels.

    Raises ValueError for an unfinished conversion (`CONVERSION_PLAN` without `CONVERSION_INDEX`)
    and FileNotFoundError naming the missing folder: ``rgb/`` always; ``semseg/`` or
    ``depth/`` when the split has the other one (half a label set is a broken copy, not a
    test split).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    with storage_errors(root):
        fs, base = url_to_fs(root)
        present = {m for m in MODALITIES if fs.isdir(f"{base.rstrip('/')}/{split}/{m}")}
        unfinished = fs.exists(_join(base, CONVERSION_PLAN)) and not fs.exists(_join(base, CONVERSION_INDEX))
    if unfinished:
        raise ValueError(f"{root} is an unfinished conversion ({CONVERSION_PLAN} without {CONVERSION_INDEX}): run the "
                         f"conversion command again to finish it")
    if "rgb" not in present:
        raise FileNotFoundError(missing_bucket(root) or f"Miniscapes folder missing: {_join(root, split, 'rgb')}"
                                                        f"{_layout_hint(root)}")
    labels = present & set(LABEL_MODALITIES)
    if labels and labels != set(LABEL_MODALITIES):
        (missing,) = set(LABEL_MODALITIES) - labels
        raise FileNotFoundError(f"Miniscapes folder missing: {_join(root, split, missing)} "
                                f"({_join(root, split, *labels)} is there; a split without labels has rgb/ only)")
    return tuple(m for m in MODALITIES if m in present)


def scan_split(root: str, split: str) -> tuple[list[tuple[str, dict[str, int]]], list[str]]:
    """List one split: ``([(stem, {modality: file size})] for complete samples, [missing files])``.

    The size dicts hold the split's modalities (`split_modalities`): rgb only for a split
    without labels. Raises FileNotFoundError naming a missing modality folder.
    """
    mods = split_modalities(root, split)
    sizes: dict[str, dict[str, int]] = {}
    with storage_errors(root):
        fs, base = url_to_fs(root)
        for mod in mods:
            ext = MODALITIES[mod]
            sizes[mod] = {}
            for entry in fs.ls(f"{base.rstrip('/')}/{split}/{mod}", detail=True):
                name = os.path.basename(entry["name"].rstrip("/"))
                if name.endswith("." + ext) and not name.startswith("."):  # (a Mac's ._0.jpg beside 0.jpg is no sample)
                    sizes[mod][name[: -len(ext) - 1]] = int(entry.get("size") or 0)
    everything = sorted(set().union(*(set(v) for v in sizes.values())), key=_index_key)
    complete = [(s, {m: sizes[m][s] for m in mods}) for s in everything if all(s in sizes[m] for m in mods)]
    missing = [_join(root, split, m, f"{s}.{MODALITIES[m]}") for s in everything for m in mods if s not in sizes[m]]
    return complete, missing


def list_split(root: str, split: str) -> list[str]:
    """Sample indices of one split, after checking that every sample has all of the split's files.

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


def _layout_hint(root: str) -> str:
    """What a folder without Miniscapes' layout is instead, when it is a shard set (given as a
    folder), one whose sharding did not finish (its shards and progress records, no manifest
    yet), or a Cityscapes download (its ``leftImg8bit/``, or the zip of it), which is converted first."""
    from mtl.data.shards import manifest_url

    with storage_errors(root):
        fs, base = url_to_fs(root)
        if fs.exists(url_to_fs(manifest_url(root))[1]):
            return " (it is a shard set: give it with --shards)"
        convert = "`python -m data_prep.cityscapes --root {} --out <folder> --size 256x512`, and give that folder"
        if fs.isdir(_join(base, "leftImg8bit")):
            return f" (it is a Cityscapes download: convert it first, {convert.format(root)})"
        if fs.exists(_join(base, "leftImg8bit_trainvaltest.zip")):
            return (" (it holds a Cityscapes download's zips: unzip gtFine, leftImg8bit, disparity and camera "
                    f"*_trainvaltest.zip into one folder, then convert it, {convert.format('<that folder>')})")
        if base.rstrip("/").rsplit("/", 1)[-1] in ("leftImg8bit", "gtFine", "disparity", "camera"):
            parent = os.path.dirname(os.path.abspath(root.rstrip("/"))) if "://" not in root else root.rstrip("/").rsplit("/", 1)[0]
            return f" (it is a part of a Cityscapes download: convert the folder holding it, {convert.format(parent)})"
        unfinished = fs.exists(_join(base, SHARD_PROGRESS))
    return " (it holds a shard set without manifest.json: sharding was interrupted; run data_prep.shard again)" if unfinished else ""


def folder_marks(root: str) -> list[str]:
    """What makes ``root`` a Miniscapes folder, as messages name it: its ``<split>/rgb/`` folders
    and a conversion's plan (empty: none). Shards must not be written into one, and a prefix
    holding both is two data sets under one name."""
    with storage_errors(root):
        fs, base = url_to_fs(root)
        marks = [f"{s}/rgb/" for s in SPLITS if fs.isdir(_join(base, s, "rgb"))]
        return marks + ([CONVERSION_PLAN] if fs.exists(_join(base, CONVERSION_PLAN)) else [])


def stems_by_index(stems: list[str], where: str) -> dict[int, str]:
    """Each sample's number (`sample_index`) to its stem; ValueError naming two files that would
    share one (``01.jpg`` and ``1.jpg``): their predictions would overwrite each other."""
    out: dict[int, str] = {}
    for stem in stems:
        other = out.setdefault(sample_index(stem), stem)
        if other != stem:
            raise ValueError(f"{where}/{other}.jpg and {where}/{stem}.jpg are both sample {sample_index(stem)}: rename one")
    return out


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


class MiniscapesFolder(Dataset):
    """One split of a Miniscapes folder. Items are compact uint8 tensors (rgb HxWx3, semseg,
    disparity codes; see `mtl.data.batch` for the conversion on the device) plus ``index``
    (the file stem as int when numeric). A split without labels (``has_labels`` False) gives
    ``rgb`` and ``index`` only.

    The sampler may pass ``(epoch, i)`` instead of ``i``: augmentation is then seeded by
    (seed, epoch, sample index), which makes every epoch reproducible regardless of workers,
    resumes or whether the sample comes from this folder or from a shard.
    """

    def __init__(self, root: str, split: str, augment: Augment | None = None, seed: int = 0) -> None:
        self.root, self.split, self.augment, self.seed = root, split, augment, seed
        self.modalities = split_modalities(root, split)
        if augment is not None and not self.has_labels:
            raise ValueError(f"{_join(root, split)} has no labels (rgb/ only): it cannot be augmented for training")
        self.indices = list_split(root, split)
        self.stems = stems_by_index(self.indices, _join(root, split, "rgb"))
        self.fs, self._base = url_to_fs(root)

    @property
    def has_labels(self) -> bool:
        return set(LABEL_MODALITIES) <= set(self.modalities)

    def __len__(self) -> int:
        return len(self.indices)

    def file_url(self, mod: str, stem: str) -> str:
        """The real location of one file, as errors should show it."""
        return _join(self.root, self.split, mod, f"{stem}.{MODALITIES[mod]}")

    def read_bytes(self, i: int) -> dict[str, bytes]:
        stem = self.indices[i]
        out = {}
        for mod in self.modalities:
            path = f"{self._base.rstrip('/')}/{self.split}/{mod}/{stem}.{MODALITIES[mod]}"
            try:
                with storage_errors(self.root):
                    out[mod] = self.fs.cat_file(path)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"Miniscapes file missing: {self.file_url(mod, stem)}") from e
        return out

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, i = item if isinstance(item, tuple) else (0, item)
        raw = self.read_bytes(i)
        stem = self.indices[i]
        names = {m: self.file_url(m, stem) for m in self.modalities}
        sample = decode_sample(raw["rgb"], raw.get("semseg"), raw.get("depth"), key=f"{_join(self.root, self.split)} sample {stem}",
                               names=names)
        index = sample_index(stem)
        rng = sample_rng(self.seed, epoch, index) if self.augment is not None else None
        out = prepare(sample, self.augment, rng)
        out["index"] = torch.tensor(index)
        return out
