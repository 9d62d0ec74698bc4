"""Streaming WebDataset shards (local or s3://...) listed in a manifest written by data_prep.shard.

The split's shards are dealt out to ranks, then to each rank's loader workers (balanced by
sample count), so that no sample is read twice in an epoch across the whole job; each consumer
reads its shards in an order drawn from (seed, epoch). For training, each loader worker batches
its own samples and the ranks stop together at the smallest one's batch count, so up to a batch
less one per worker, and a rank's surplus, sit out the epoch (others the next: the order
changes); the trainer's start says how many. Samples are shuffled through a buffer, decoded raw
(labels and disparities keep their exact values) and augmented by the same code as the folder
dataset, seeded by (seed, epoch, sample index). Sample counts per consumer are known from the
manifest, so every rank can agree on the number of training steps without talking to the others.

A split's manifest entry lists its ``modalities``: ``["rgb"]`` for a split without labels (a
real test split; its samples carry ``rgb`` and ``index`` only), all three otherwise (also when
the key is absent: manifests written before it existed always had all three).
"""

from __future__ import annotations

import json
import posixpath
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtl.data.miniscapes import LABEL_MODALITIES, MODALITIES, decode_sample, sample_index
from mtl.data.loader import StartedIterators, worker_start_kwargs
from mtl.data.packed import pack_collate
from mtl.data.transforms import Augment, prepare, sample_rng
from mtl.storage import (StorageError, credentials_message, exists, is_connection_error, is_credentials_error,
                         missing_bucket, storage_errors, url_to_fs)

FORMAT = "streetmtl-shards-v1"
RETRIES = 4


def manifest_url(url: str) -> str:
    return url if url.endswith(".json") else url.rstrip("/") + "/manifest.json"


def read_manifest(url: str) -> dict[str, Any]:
    """The manifest at ``url`` (a manifest file or the shard prefix). Clear errors when absent."""
    murl = manifest_url(url)
    try:
        with storage_errors(murl):
            fs, path = url_to_fs(murl)
            m = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise FileNotFoundError(missing_bucket(murl) or f"no shard manifest at {murl} (sharding not run, or interrupted "
                                f"before it finished){_folder_hint(url)}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"shard manifest {murl} is corrupt ({e})") from e
    if m.get("format") != FORMAT:
        raise ValueError(f"{murl} is not a {FORMAT} manifest")
    m["base_url"] = posixpath.dirname(murl) or "."  # (a bare "manifest.json": the shards are here)
    return m


def _folder_hint(url: str) -> str:
    """When ``url`` is a Miniscapes folder (its train/rgb or val/rgb is there): say to read it so."""
    base = url.rstrip("/")
    if not base.endswith(".json") and any(exists(f"{base}/{split}/rgb") for split in ("train", "val")):
        return f"; {url} is a Miniscapes folder: read it with --root"
    return ""


def _open_with_retries(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    """webdataset opener for fsspec URLs (s3://, gs://, ...) with retries on transient errors.
    An endpoint that cannot be reached is a `StorageError` naming the shard, at once: the client
    (botocore) has retried it already, as ``AWS_MAX_ATTEMPTS`` says."""
    for attempt in range(RETRIES):
        try:
            with storage_errors(url):
                return fsspec.open(url, mode).open()
        except StorageError:
            raise
        except FileNotFoundError:
            raise FileNotFoundError(f"shard missing: {url}") from None
        except (OSError, TimeoutError) as e:
            if attempt == RETRIES - 1:
                raise OSError(f"cannot read shard {url} after {RETRIES} attempts: {e}") from e
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def register_fsspec_schemes() -> None:
    """webdataset has no s3:// handler: route remote schemes through fsspec. Call in every
    process that reads shards (done by ShardStream itself, so spawned workers get it too)."""
    for scheme in ("s3", "gs", "gcs", "az", "abfs", "http", "https", "memory"):
        wds.gopen_schemes[scheme] = _open_with_retries


def _reraise_with_context(exn: Exception) -> bool:
    if isinstance(exn, StorageError):  # (the endpoint, not the shard; its message names the shard already, and
        raise StorageError(exn.args[0]) from None  # webdataset's appending the URL to an OSError's args garbles it)
    if is_credentials_error(exn):  # (credentials that expired in the middle of a run: not a corrupt shard)
        raise StorageError(credentials_message("a shard", exn)) from exn
    if is_connection_error(exn):  # lost in the middle of a shard: webdataset appended the shard's URL
        raise StorageError(f"lost the connection while reading a shard: {exn}") from exn
    if isinstance(exn, FileNotFoundError):  # (ours names the shard already: webdataset appended its URL to the args)
        said = exn.args[0] if exn.args and str(exn.args[0]).startswith("shard missing: ") else f"shard missing: {exn}"
        raise FileNotFoundError(said) from exn
    raise ValueError(_corrupt(exn)) from exn


_CORRUPT = "corrupt or unreadable shard"


def _corrupt(exn: Exception) -> str:
    """One line naming the shard once: webdataset hands an error up with (stream, URL) appended
    to its args, through this handler twice (the tar reader's, then the shard list's), and the
    tar reader's message names the stream (``unexpected end of data @ <_io.BufferedReader ...>``).
    An OS error (permissions, I/O) keeps its errno and text, and is not the shard set's fault."""
    args, errno = exn.args or (type(exn).__name__,), isinstance(exn, OSError) and exn.errno is not None
    appended = args[2:] if errno else args[1:]  # (an OS error's own args: errno, text)
    url = next((a for a in reversed(appended) if isinstance(a, str)), None)  # (webdataset's, last)
    what = f"[Errno {exn.errno}] {exn.strerror}" if errno else str(args[0])
    url = url or (exn.filename if isinstance(getattr(exn, "filename", None), str) else None)
    url = url or next(iter(re.findall(r" @ <\S+ name='([^']*)'>", what)), None)
    what = re.sub(r" @ <[^>]*>", "", what)
    if what.startswith(f"{_CORRUPT} "):  # (ours, on its second way through, naming the shard already)
        return what
    if what.startswith(f"{_CORRUPT}: "):  # (ours without the shard's URL: it may be known now)
        what = what[len(_CORRUPT) + 2:]
    hint = ("" if isinstance(exn, OSError) or what.startswith("[Errno")  # (not the data's fault: no advice to rebuild it)
            else " (re-create the shard set: python -m data_prep.shard --root ... --shards ... --overwrite)")
    return f"{_CORRUPT} {url}: {what}{hint}" if url else f"{_CORRUPT}: {what}{hint}"


# the share of a rank's whole batches a training epoch keeps when it picks its loader workers
KEPT_BATCHES = 0.9


@dataclass(frozen=True)
class ShardSplit:
    """One split of a shard set: shard URLs and per-shard sample counts."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    modalities: tuple[str, ...] = tuple(MODALITIES)  # ("rgb",) for a split without labels

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], split: str) -> "ShardSplit":
        if split not in manifest["splits"]:
            raise ValueError(f"split {split!r} not in shard manifest {manifest['base_url']} (has {sorted(manifest['splits'])})")
        entry = manifest["splits"][split]
        mods = tuple(entry.get("modalities", MODALITIES))
        if mods not in (("rgb",), tuple(MODALITIES)):
            raise ValueError(f"shard manifest {manifest['base_url']}: split {split!r} has modalities {list(mods)}; "
                             f"expected {['rgb']} or {list(MODALITIES)}")
        shards = entry["shards"]
        return cls(tuple(f"{manifest['base_url']}/{s['name']}" for s in shards), tuple(s["num_samples"] for s in shards), mods)

    @property
    def has_labels(self) -> bool:
        return set(LABEL_MODALITIES) <= set(self.modalities)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def assignment(self, world: int, workers: int) -> list[list[list[int]]]:
        """Shard ids for [rank][worker]: a fixed, count-balanced deal (largest shard first to the
        rank with the fewest samples, and within it to the worker with the fewest). Fixed, so that
        the number of batches per epoch, and with it the LR plan, is the same every epoch; the
        order within a consumer is shuffled per epoch instead."""
        workers = max(workers, 1)
        plan: list[list[list[int]]] = []
        for shards in self._ranks(world):
            load, deal = [0] * workers, [[] for _ in range(workers)]
            for i in shards:
                w = min(range(workers), key=lambda w: (load[w], w))
                deal[w].append(i)
                load[w] += self.counts[i]
            plan.append(deal)
        return plan

    def _ranks(self, world: int) -> list[list[int]]:
        """Shard ids per rank, largest first, each to the rank with the fewest samples so far."""
        load, ranks = [0] * world, [[] for _ in range(world)]
        for i in sorted(range(len(self.counts)), key=lambda i: (-self.counts[i], i)):
            r = min(range(world), key=lambda r: (load[r], r))
            ranks[r].append(i)
            load[r] += self.counts[i]
        return ranks

    def batches_per_rank(self, world: int, workers: int, batch: int, drop_last: bool = True) -> list[int]:
        """Batches each rank yields per epoch (each loader worker batches its own samples)."""
        per = [[sum(self.counts[i] for i in ws) for ws in rank] for rank in self.assignment(world, workers)]
        return [sum(n // batch if drop_last else -(-n // batch) for n in rank) for rank in per]

    def training_workers(self, world: int, workers: int, batch: int) -> int:
        """How many of ``workers`` loader workers per rank a training epoch uses: the most that
        keep `KEPT_BATCHES` of the batches the ranks' samples would make whole. Each worker
        batches its own shards and drops what does not fill a batch, so with few samples per rank
        every worker added costs batches: Cityscapes' 2975 training images in 93 shards of 32 over 8
        ranks of 12 workers at batch 64 give each worker one shard of 32, and no batch at all."""
        if workers <= 1:
            return workers
        whole = min(sum(self.counts[i] for i in shards) // batch for shards in self._ranks(world))
        for w in range(workers, 1, -1):
            if min(self.batches_per_rank(world, w, batch)) >= KEPT_BATCHES * whole:
                return w
        return 1


class ShardStream(IterableDataset):
    """This rank's stream of one split. Call `set_epoch` before each epoch's iterator.
    ``every_rank``: each rank must get a shard (training: the ranks step together); evaluation
    sums what each rank has, so there a rank may have none (a validation split of fewer shards
    than ranks)."""

    def __init__(self, split: ShardSplit, augment: Augment | None, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1, shuffle_buffer: int = 256, every_rank: bool = True) -> None:
        if not split.urls:
            raise ValueError("the split has no samples (its manifest entry lists no shards)")
        if every_rank and len(split.urls) < world:
            raise ValueError(f"{len(split.urls)} shard(s) cannot feed {world} ranks: reshard into more shards (data_prep.shard "
                             f"--shard-size {max(1, split.num_samples // world)} or fewer samples per shard; several per rank "
                             f"and loader worker keep them all busy; auto makes shards of at least 32 samples)")
        if augment is not None and not split.has_labels:
            where = split.urls[0].rsplit("/", 1)[0] if split.urls else "this shard set"
            raise ValueError(f"the split's shards in {where} have no labels (rgb only): they cannot be augmented for training")
        self.split, self.augment, self.seed, self.shuffle = split, augment, seed, shuffle
        self.rank, self.world, self.shuffle_buffer = rank, world, shuffle_buffer
        self.epoch = 0
        # index -> key of the samples this process decoded unaugmented: an export names its files
        # by them (`mtl.export.stem_of`), as a folder split's by file stem ("0007", "zurich_a")
        self.stems: dict[int, str] = {}

    @property
    def has_labels(self) -> bool:
        return self.split.has_labels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        register_fsspec_schemes()
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        mine = list(self.split.assignment(self.world, workers)[self.rank][wid])
        rng = random.Random(((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank) * 1009 + wid)
        if self.shuffle:
            rng.shuffle(mine)
        samples = wds.tarfile_to_samples(handler=_reraise_with_context)([{"url": self.split.urls[i]} for i in mine])
        samples = _as_listed(samples, [(self.split.urls[i], self.split.counts[i]) for i in mine])
        if self.shuffle and self.shuffle_buffer > 1:
            samples = _buffer_shuffle(samples, self.shuffle_buffer, rng)
        for s in samples:
            yield self._decode(s)

    def _decode(self, s: dict[str, Any]) -> dict[str, torch.Tensor]:
        key = s["__key__"]
        url = s.get("__url__", "?")
        members = {m: f"{m}.{MODALITIES[m]}" for m in self.split.modalities}
        missing = [f"{key}.{x}" for x in members.values() if x not in s]
        if missing:
            raise ValueError(f"shard sample {url}:{key} lacks {missing}")
        names = {m: f"{url}:{key}.{x}" for m, x in members.items()}  # the real tar member, as a user can find it
        labels = (s["semseg.png"], s["depth.png"]) if self.split.has_labels else (None, None)
        sample = decode_sample(s["rgb.jpg"], *labels, key=f"{url}:{key}", names=names)
        index = sample_index(key)
        if self.augment is None and self.stems.setdefault(index, key) != key:
            raise ValueError(f"shard samples {self.stems[index]} and {url}:{key} have the same index {index}: "
                             f"their predictions would be written to one file")
        rng = sample_rng(self.seed, self.epoch, index) if self.augment is not None else None
        out = prepare(sample, self.augment, rng)
        out["index"] = torch.tensor(index)
        return out


def _as_listed(samples, shards: list[tuple[str, int]]):
    """``samples`` (read from ``shards`` in order), checking each shard holds as many as the
    manifest says: a shard replaced, truncated at a member boundary or out of date would
    otherwise go unnoticed, and a rank that runs out early leaves the others waiting in a
    collective. ValueError naming the shard."""
    pending = iter(shards)
    url, expected, n = None, 0, 0
    for s in samples:
        while s.get("__url__") != url:
            if url is not None:
                _check_count(url, n, expected)
            url, expected = next(pending, (s.get("__url__"), -1))
            n = 0
        n += 1
        yield s
    if url is not None:
        _check_count(url, n, expected)
    for url, expected in pending:
        _check_count(url, 0, expected)


def _check_count(url: str, n: int, expected: int) -> None:
    if expected < 0:
        raise ValueError(f"shard {url} is not one this reader was given")
    if n != expected:
        raise ValueError(f"shard {url} holds {n} samples, its manifest says {expected}: the shard set changed after its "
                         f"manifest was written (re-run data_prep.shard)")


def _buffer_shuffle(it, size: int, rng: random.Random):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ShardLoader:
    """DataLoader over a ShardStream with a known number of batches per epoch.

    For training (``drop_last``), every rank yields exactly ``steps`` batches: the minimum over
    ranks, computed from the manifest, so no rank waits on a collective the others never reach.
    """

    def __init__(self, stream: ShardStream, batch_size: int, workers: int, prefetch: int, drop_last: bool, pin_memory: bool) -> None:
        self.stream, self.batch_size, self.drop_last = stream, batch_size, drop_last
        self.asked_workers = workers
        if drop_last:  # (training; an evaluation keeps every sample whatever the workers)
            workers = stream.split.training_workers(stream.world, workers, batch_size)
        self.workers = workers
        self.per_rank = stream.split.batches_per_rank(stream.world, max(workers, 1), batch_size, drop_last)
        self.loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=drop_last, pin_memory=pin_memory,
                                 collate_fn=pack_collate, **worker_start_kwargs(workers),
                                 prefetch_factor=prefetch if workers > 0 else None, persistent_workers=False)
        self.epoch, self.skip = 0, 0
        self.started = StartedIterators()

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The next iterator yields ``epoch``'s batches from batch ``skip_batches`` on. The stream
        is a function of (seed, epoch, rank, loader workers), so the batches before are read and
        dropped: exact, at the cost of decoding them once more."""
        self.epoch, self.skip = epoch, skip_batches
        self.stream.set_epoch(epoch)  # non-persistent workers are forked per epoch and see it

    def __len__(self) -> int:
        return min(self.per_rank) if self.drop_last else self.per_rank[self.stream.rank]

    def len_at(self, world: int) -> int:
        """`len` of a training loader over ``world`` ranks with the loader workers asked for (the
        LR plan's unit is an epoch of the planned ranks: an elastic run may start with fewer)."""
        split = self.stream.split
        workers = split.training_workers(world, self.asked_workers, self.batch_size)
        return min(split.batches_per_rank(world, max(workers, 1), self.batch_size))

    def idle_workers(self) -> int:
        """This rank's loader workers that get no shard (fewer shards than ranks × workers)."""
        s = self.stream
        return sum(not shards for shards in s.split.assignment(s.world, self.workers)[s.rank]) if self.workers else 0

    def __iter__(self):
        """The epoch's batches. The loader's workers start here, not on the first ``next()``: an
        iterator made ahead of time (the next epoch's before validation, validation's before the
        last train steps) has its first batches ready when it is read."""
        return self._batches(self.started.add(iter(self.loader)), len(self) if self.drop_last else None, self.skip)

    def close(self) -> None:
        """End the worker processes of the iterators still running (`StartedIterators`)."""
        self.started.end()

    @staticmethod
    def _batches(it, n: int | None, skip: int):
        for i, batch in enumerate(it):
            if n is not None and i >= n:
                break
            if i >= skip:
                yield batch


def num_samples(manifest: dict[str, Any], split: str) -> int:
    return int(manifest["splits"][split]["num_samples"])
