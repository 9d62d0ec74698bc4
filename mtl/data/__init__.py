"""Datasets: Miniscapes folders, WebDataset shards, and the cached synthetic set."""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from mtl.config import ExperimentConfig
from mtl.data.folder import MiniscapesFolder
from mtl.data.transforms import Augment


def cache_dir() -> str:
    return os.environ.get("STREETMTL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "streetmtl"))


def synthetic_root(size: tuple[int, int], counts: tuple[int, int, int], seed: int = 0) -> str:
    """The synthetic Miniscapes set for these settings, generated once into the cache folder."""
    from data_prep.synthesize import synthesize

    h, w = size
    root = os.path.join(cache_dir(), f"synthetic-miniscapes-{h}x{w}-{'-'.join(map(str, counts))}-s{seed}")
    if not os.path.isdir(root):
        synthesize(root, dict(zip(("train", "val", "test"), counts)), (h, w), seed, overwrite=True)
    return root


def data_root(cfg: ExperimentConfig) -> str:
    d = cfg.data
    return d.root or synthetic_root(d.synthetic_size, d.synthetic_counts)


def train_augment(cfg: ExperimentConfig) -> Augment | None:
    d = cfg.data
    return Augment(d.scale_min, d.scale_max, d.crop, d.hflip) if d.augment else None


def build_datasets(cfg: ExperimentConfig, is_main: bool = True) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for the configured source."""
    root = data_root(cfg)
    return (MiniscapesFolder(root, "train", train_augment(cfg), cfg.train.seed), MiniscapesFolder(root, "val"))
