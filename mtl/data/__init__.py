"""Datasets: Miniscapes folders, WebDataset shards, and the cached synthetic set."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from mtl.config import ExperimentConfig
from mtl.data.folder import MiniscapesFolder
from mtl.data.loader import make_loader
from mtl.data.shards import ShardLoader, ShardSplit, ShardStream, num_samples, read_manifest
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


class FolderLoader:
    """A DataLoader over a map-style dataset with the `set_epoch` / `len` interface of ShardLoader."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


@dataclass
class Loaders:
    train: FolderLoader | ShardLoader
    val: FolderLoader | ShardLoader
    num_train: int
    num_val: int
    source: str
    workers: int  # loader processes (per loader)


def auto_workers(on_gpu: bool, cpus: int | None = None) -> int:
    """Loader processes when ``--workers`` is not given, from the CPUs this training process may
    use (``cpus``: Ray's ``--cpus-per-worker``; locally, the CPUs this process may run on).

    On a GPU: all of them but one (the train loop's), at most 8 — at ~300 img/s per worker
    (256x512 with augmentation, docs/performance.md) that feeds well over 1000 img/s. On the
    CPU: at most 2, since the model's own compute wants the cores.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus - 1)) if on_gpu else max(0, min(2, cpus - 1))


def build_loaders(cfg: ExperimentConfig, rank: int = 0, world: int = 1, pin_memory: bool = False,
                  cpus: int | None = None) -> Loaders:
    """Train/val loaders for this rank: WebDataset shards when ``data.shards`` is set, else a
    Miniscapes folder (``data.root``, or the cached synthetic set). ``pin_memory`` means the
    batches go to a GPU; ``cpus`` sizes the automatic worker count (`auto_workers`)."""
    d, t = cfg.data, cfg.train
    if d.workers is None:
        d = replace(d, workers=auto_workers(pin_memory, cpus))
    if d.shards:
        manifest = read_manifest(d.shards)
        tr = ShardStream(ShardSplit.from_manifest(manifest, "train"), train_augment(cfg), t.seed, True, rank, world, d.shuffle_buffer)
        va = ShardStream(ShardSplit.from_manifest(manifest, "val"), None, t.seed, False, rank, world)
        return Loaders(ShardLoader(tr, t.batch_size, d.workers, d.prefetch, True, pin_memory),
                       ShardLoader(va, t.batch_size, d.workers, d.prefetch, False, pin_memory),
                       num_samples(manifest, "train"), num_samples(manifest, "val"), manifest["base_url"], d.workers)
    root = data_root(cfg)
    train_set = MiniscapesFolder(root, "train", train_augment(cfg), t.seed)
    val_set = MiniscapesFolder(root, "val")
    return Loaders(
        FolderLoader(make_loader(train_set, t.batch_size, True, t.seed, d.workers, d.prefetch, rank, world, True, pin_memory)),
        FolderLoader(make_loader(val_set, t.batch_size, False, t.seed, d.workers, d.prefetch, rank, world, False, pin_memory)),
        len(train_set), len(val_set), root, d.workers,
    )
