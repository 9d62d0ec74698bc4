"""Which data a run means, opened: Miniscapes folders, WebDataset shards, the cached synthetic set.

The one place that decides which data a configuration or a ``--data`` flag means
(`resolve_source`) and opens it: `build_loaders` for training (train + val, sharded across
ranks), `open_split` for evaluation, export and prediction (one split, in order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from mtl.config import DataConfig, ExperimentConfig
from mtl.data.folder import MiniscapesFolder, folder_marks, split_modalities
from mtl.data.loader import StartedIterators, make_loader
from mtl.data.miniscapes import LABEL_MODALITIES
from mtl.data.shards import ShardLoader, ShardSplit, ShardStream, manifest_url, num_samples, read_manifest
from mtl.data.synthetic import GENERATOR_VERSION, synthesize
from mtl.data.transforms import Augment
from mtl.machine import usable_cpus
from mtl.storage import exists, missing_bucket


def cache_dir() -> str:
    return os.environ.get("STREETMTL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "streetmtl"))


def synthetic_root(size: tuple[int, int], counts: tuple[int, int, int], seed: int = 0) -> str:
    """The synthetic Miniscapes set for these settings, generated once into the cache folder.
    Every rank (and trial) on a machine may ask at once: the first to finish generating keeps
    its folder, the others drop theirs (never replacing one that a rank is reading)."""
    h, w = size
    name = f"synthetic-miniscapes-{h}x{w}-{'-'.join(map(str, counts))}-s{seed}-v{GENERATOR_VERSION}"  # (its settings)
    root = os.path.join(cache_dir(), name)
    if not os.path.isdir(root):
        try:
            synthesize(root, dict(zip(("train", "val", "test"), counts)), (h, w), seed)
        except FileExistsError:
            if not os.path.isdir(root):
                raise
    return root


@dataclass(frozen=True)
class DataSource:
    """Where samples come from: a WebDataset shard set (``kind="shards"``, ``url`` its prefix or
    manifest) or a Miniscapes folder (``kind="folder"``, ``url`` its root). Training and
    evaluation both ask `resolve_source`, so a checkpoint is evaluated on the data it was
    trained on unless told otherwise."""

    kind: str
    url: str

    @property
    def is_shards(self) -> bool:
        return self.kind == "shards"


def is_shard_set(url: str) -> bool:
    """A URL naming a manifest (``.../manifest.json``), or a prefix holding one."""
    if url.rstrip("/").endswith(".json"):
        return True
    return exists(manifest_url(url))


def check_not_both(url: str) -> None:
    """A shard set's prefix that is also a Miniscapes folder (shards written into one) holds two
    data sets: which one a --root/--shards flag means cannot be told, so neither is read."""
    if url.rstrip("/").endswith(".json"):
        return
    marks = folder_marks(url)
    if marks:
        raise ValueError(f"{url} holds both a shard set (manifest.json) and a Miniscapes folder ({marks[0]}): which one is "
                         f"meant cannot be told; move the shards to a prefix of their own (python -m data_prep.shard --shards)")


def resolve_source(cfg: ExperimentConfig, override: str | None = None) -> DataSource:
    """The data a config means: ``override`` (a ``--data`` flag: shard set or folder, told apart
    by `is_shard_set`), else ``data.shards``, else ``data.root``, else the cached synthetic set."""
    if override is not None and not override.strip():  # (else the checkpoint's data, without a word)
        raise ValueError(f"--root/--shards {override!r} names no data (an unset variable?): give the data's folder or URL, "
                         f"or leave it out for the data the checkpoint was trained on")
    if override:
        if is_shard_set(override):
            check_not_both(override)
            return DataSource("shards", override)
        if not exists(override):  # (a mistyped path is neither: say so, not "Miniscapes folder missing: <it>/val/rgb")
            raise FileNotFoundError(missing_bucket(override) or f"{override} does not exist: neither a Miniscapes folder nor a "
                                    f"shard set (a prefix holding manifest.json)")
        return DataSource("folder", override)
    d = cfg.data
    if d.shards:
        return DataSource("shards", d.shards)
    if d.root:
        return DataSource("folder", d.root)
    return DataSource("folder", synthetic_root(d.synthetic_size, d.synthetic_counts))


def train_augment(cfg: ExperimentConfig) -> Augment | None:
    d = cfg.data
    return Augment(d.scale_min, d.scale_max, d.crop, d.hflip) if d.augment else None


class FolderLoader:
    """A DataLoader over a map-style dataset with the `set_epoch` / `len` interface of ShardLoader."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.started = StartedIterators()

    def set_epoch(self, epoch: int, skip_batches: int = 0, start: int | None = None) -> None:
        """The next iterator yields ``epoch``'s batches from batch ``skip_batches`` on, or from
        sample ``start`` of the epoch's order over all ranks (`EpochSampler`); the sampler leaves
        the samples out: nothing is read for them."""
        self.loader.sampler.set_epoch(epoch, skip_batches * self.loader.batch_size, start)

    def __len__(self) -> int:
        """Batches in a whole epoch (a skip does not count), as `ShardLoader`'s."""
        n, bs = self.loader.sampler.per_rank, self.loader.batch_size
        return n // bs if self.loader.drop_last else -(-n // bs)

    def __iter__(self):
        return self.started.add(iter(self.loader))

    def close(self) -> None:
        """End the worker processes (`StartedIterators`); the next iterator starts new ones."""
        self.started.end()
        self.loader._iterator = None  # (persistent workers: the ended iterator is not reused)


@dataclass
class Loaders:
    train: FolderLoader | ShardLoader
    val: FolderLoader | ShardLoader
    num_train: int
    num_val: int
    source: str
    workers: int  # loader processes (per loader)
    # (H, W) of the validation images: what the model sees outside training, and what prediction
    # resizes photos to (recorded in checkpoints): a shard set's manifest's, None when they vary; a
    # folder's first image's (its sizes are not read ahead: one request per image on S3)
    image_size: tuple[int, int] | None = None

    def close(self) -> None:
        """End both loaders' worker processes (a run's end, `mtl.engine.Trainer`)."""
        self.train.close()
        self.val.close()


def coverage_notes(loaders: Loaders, steps: int, global_batch: int, capped: bool = False) -> list[str]:
    """For a shard set: what an epoch of ``steps`` optimizer steps of ``global_batch`` samples
    leaves out of the training split (unless the epochs are ``capped`` on purpose), and the
    loader workers that get no shard: lines for the trainer's start. (A folder leaves out less
    than a global batch, or, its order padded to equal shares per rank, trains fewer samples than
    there are ranks twice: nothing is said.)"""
    if not isinstance(loaders.train, ShardLoader):
        return []
    notes, used, n = [], steps * global_batch, loaders.num_train
    if used < n and not capped:
        notes.append(f"an epoch trains on {used} of the {n} train samples ({100 * used / n:.0f} %): each loader worker "
                     f"batches the samples of its own shards and the ranks stop together at the smallest one's batch count; "
                     f"the order changes every epoch, and with it the samples left out")
    train = loaders.train
    if train.workers < train.asked_workers:
        notes.append(f"training reads the shards with {train.workers} of this rank's {train.asked_workers} loader workers: each "
                     f"worker batches only its own shards and drops what does not fill a batch, and with about "
                     f"{loaders.num_train // train.stream.world} samples per rank more workers would leave out more of them")
    idle = train.idle_workers()
    if idle:
        each = max(train.batch_size, loaders.num_train // (train.stream.world * loaders.workers))  # (a worker batches its own)
        notes.append(f"{idle} of this rank's {loaders.workers} loader workers get no shard and stay idle: --workers "
                     f"{loaders.workers - idle} leaves none idle, or reshard into more shards (data_prep.shard --shard-size "
                     f"{each}: a shard for each loader worker of {train.stream.world} rank(s); auto makes shards of at least "
                     f"32 samples)")
    return notes


def crop_note(d: DataConfig, image_size: tuple[int, int] | None) -> str | None:
    """What ``--crop`` does to images of ``image_size`` (H, W): ValueError when it exceeds them
    at the largest zoom (every crop padded with ignored pixels: the size was meant for other
    images, or given as WxH), a line for the trainer's start when only the smaller zooms pad.
    The report chose its zoom and crop so that no crop is padded (§5.4)."""
    if not d.augment or d.crop is None or image_size is None:
        return None
    (ch, cw), (h, w) = d.crop, image_size
    biggest = (round(h * d.scale_max), round(w * d.scale_max))
    if ch > biggest[0] or cw > biggest[1]:
        raise ValueError(f"--crop {ch}x{cw} is larger than the {h}x{w} images zoomed by at most --scale-max {d.scale_max:g} "
                         f"({biggest[0]}x{biggest[1]}): every crop would be padded with ignored pixels (sizes are HxW)")
    least = max(ch / h, cw / w)
    if least > d.scale_min:
        return (f"--crop {ch}x{cw} of {h}x{w} images: an image zoomed by less than {least:.3g} (the zoom is drawn from "
                f"{d.scale_min:g}-{d.scale_max:g}) leaves part of its crop padded with ignored pixels")
    return None


def auto_workers(on_gpu: bool, cpus: int | None = None) -> int:
    """Loader processes when ``--workers`` is not given, from the CPUs this training process may
    use (``cpus``: Ray's ``--cpus-per-worker``; locally, the CPUs this process may run on).

    On a GPU: all of them but one (the train loop's), at most 12. Measured on a 16-core GPU host
    (256x512 with augmentation, docs/performance.md): 1 worker 197 img/s, 8 -> 1319, 12 -> 1516,
    15 -> 1387; the captured train step consumes ~960 img/s at batch 16 and ~1160 at 64 on an
    H200, which 8 workers could not feed. On the CPU: at most 2, since the model's own compute
    wants the cores.
    """
    if cpus is None:
        cpus = usable_cpus()
    return max(1, min(12, cpus - 1)) if on_gpu else max(0, min(2, cpus - 1))


@dataclass
class SplitData:
    """One split of a source, read in order, once, by one process: what evaluation, export and
    prediction need. ``dataset`` is map-style (a folder) or a stream (shards)."""

    dataset: MiniscapesFolder | ShardStream
    source: DataSource
    split: str
    num_samples: int
    where: str  # the split's location, for messages

    @property
    def has_labels(self) -> bool:
        return self.dataset.has_labels

    def image_size(self) -> tuple[int, int] | None:
        """(H, W) of the split's images: its manifest's for shards (None when they vary), else
        the first image's (the folder's size, as training records its validation size)."""
        if isinstance(self.dataset, ShardStream):
            return _size(read_manifest(self.source.url)["splits"][self.split].get("image_size"))
        return _size(self.dataset[0]["rgb"].shape[:2]) if self.num_samples else None

    def loader(self, batch_size: int, workers: int = 0, prefetch: int = 2, pin_memory: bool = False) -> FolderLoader | ShardLoader:
        """Every sample once, in order; the last batch is kept even if short (every sample counts)."""
        if isinstance(self.dataset, ShardStream):
            return ShardLoader(self.dataset, batch_size, workers, prefetch, False, pin_memory)
        return FolderLoader(make_loader(self.dataset, batch_size, False, 0, workers, prefetch, drop_last=False, pin_memory=pin_memory))


def open_split(source: DataSource, split: str) -> SplitData:
    """One split of ``source`` for evaluation or export: no augmentation, no shuffling, all of
    it on this process. A split without labels opens too (``has_labels`` False)."""
    if not source.is_shards:
        folder = MiniscapesFolder(source.url, split)
        return SplitData(folder, source, split, len(folder), f"{source.url.rstrip('/')}/{split}")
    manifest = read_manifest(source.url)
    shards = ShardSplit.from_manifest(manifest, split)
    where = f"{manifest['base_url']} ({split} split)"
    if shards.num_samples == 0:
        raise FileNotFoundError(f"shard set {where} has no samples")
    stream = ShardStream(shards, None, seed=0, shuffle=False, rank=0, world=1)
    return SplitData(stream, source, split, shards.num_samples, where)


def _require_labels(has_labels: bool, where: str) -> None:
    if not has_labels:
        raise ValueError(f"cannot train on {where}: it has no labels (rgb only, like a test split); "
                         f"training and validation need semseg and depth")


def build_loaders(cfg: ExperimentConfig, rank: int = 0, world: int = 1, pin_memory: bool = False,
                  cpus: int | None = None) -> Loaders:
    """Train/val loaders for this rank from `resolve_source`: WebDataset shards when
    ``data.shards`` is set, else a Miniscapes folder (``data.root``, or the cached synthetic
    set). ``pin_memory`` means the batches go to a GPU; ``cpus`` sizes the automatic worker
    count (`auto_workers`). Both splits must have labels."""
    d = cfg.data
    if d.workers is None:
        d = replace(d, workers=auto_workers(pin_memory, cpus))
    source = resolve_source(cfg)
    if source.is_shards:
        return _shard_loaders(cfg, d, source, rank, world, pin_memory)
    return _folder_loaders(cfg, d, source, rank, world, pin_memory)


def _shard_loaders(cfg: ExperimentConfig, d: DataConfig, source: DataSource, rank: int, world: int, pin_memory: bool) -> Loaders:
    t = cfg.train
    manifest = read_manifest(source.url)
    train, val = (ShardSplit.from_manifest(manifest, s) for s in ("train", "val"))
    for split, name in ((train, "train"), (val, "val")):
        if not split.urls:
            raise ValueError(f"{manifest['base_url']}: the {name} split has no samples (its manifest entry lists no shards)")
        _require_labels(split.has_labels, f"{manifest['base_url']} ({name} split)")
    tr = ShardStream(train, train_augment(cfg), t.seed, True, rank, world, d.shuffle_buffer)
    va = ShardStream(val, None, t.seed, False, rank, world, every_rank=False)
    return Loaders(ShardLoader(tr, t.batch_size, d.workers, d.prefetch, True, pin_memory),
                   ShardLoader(va, t.batch_size, d.workers, d.prefetch, False, pin_memory),
                   num_samples(manifest, "train"), num_samples(manifest, "val"), manifest["base_url"], d.workers,
                   _size(manifest["splits"]["val"].get("image_size")))


def _folder_loaders(cfg: ExperimentConfig, d: DataConfig, source: DataSource, rank: int, world: int, pin_memory: bool) -> Loaders:
    t, root = cfg.train, source.url
    for split in ("train", "val"):
        _require_labels(set(LABEL_MODALITIES) <= set(split_modalities(root, split)), f"{root.rstrip('/')}/{split}")
    train_set = MiniscapesFolder(root, "train", train_augment(cfg), t.seed)
    val_set = MiniscapesFolder(root, "val")
    return Loaders(
        FolderLoader(make_loader(train_set, t.batch_size, True, t.seed, d.workers, d.prefetch, rank, world, True, pin_memory)),
        FolderLoader(make_loader(val_set, t.batch_size, False, t.seed, d.workers, d.prefetch, rank, world, False, pin_memory)),
        len(train_set), len(val_set), root, d.workers, _size(val_set[0]["rgb"].shape[:2]) if len(val_set) else None,
    )


def _size(hw) -> tuple[int, int] | None:
    return None if hw is None else (int(hw[0]), int(hw[1]))
