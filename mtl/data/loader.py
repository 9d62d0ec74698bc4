"""Samplers and DataLoaders shared by every training mode."""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import weakref
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mtl.data.packed import pack_collate


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for this rank: a per-epoch permutation from (seed, epoch), split
    across ranks, padded (for training) so every rank gets the same count: no DDP hang.

    Rank r takes every world-th item of the order (r, r + world, ...), so after any number of
    whole steps the ranks together have consumed a prefix of the order. That makes a position
    inside an epoch one number (``start``: items of the order consumed over all ranks), which
    ranks of another world size can continue from with no sample seen twice and none skipped
    (elastic training, `mtl.engine.Trainer`)."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1, pad: bool = True) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world, self.pad = n, shuffle, seed, rank, world, pad
        self.epoch, self.start = 0, 0
        # evaluation does not pad: a duplicated sample would be counted twice in the metrics
        self.per_rank = math.ceil(n / world) if pad else len(range(rank, n, world))

    def set_epoch(self, epoch: int, skip: int = 0, start: int | None = None) -> None:
        """The next iterator yields ``epoch``'s order from position ``start`` of it (over all
        ranks), by default without this rank's first ``skip`` items (``start = skip * world``):
        a run resumed inside an epoch goes on exactly where the interrupted one stopped."""
        self.epoch, self.start = epoch, skip * self.world if start is None else start

    def __len__(self) -> int:
        if not self.start:
            return self.per_rank
        left = max(0, self.n - self.start)
        return math.ceil(left / self.world) if self.pad else len(range(self.rank, left, self.world))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad:  # equal shares for every rank (of what is left from ``start``), the order repeated as needed
            need = self.start + len(self) * self.world
            order = (order * -(-need // self.n))[:need] if need > self.n else order
        mine = order[self.start + self.rank :: self.world]
        return iter([(self.epoch, i) for i in mine])


#: what every loader worker needs imported, imported once by the fork server instead of by each
#: worker: torchvision's decoders (imported on a worker's first decode, ~2 s, at every epoch's
#: start for a shard loader's workers); Ray too: a worker runs the main script again (Python
#: 3.11's fork server drops the "__main__" preload), in a Ray worker Ray's default_worker.py: 5 ms
#: with Ray imported, a second without
_FORKSERVER_PRELOAD = ["torch", "torchvision.io", "mtl.data.folder", "mtl.data.shards", "mtl.data.packed", "ray"]


def worker_start_kwargs(workers: int) -> dict:
    """The DataLoader arguments that say how its workers start. Forked from this process (no
    arguments: the default), except where Ray has been loaded in it: a Ray Train worker runs
    Ray's core worker, whose gRPC threads and sockets a fork copies mid-use (Ray's documented
    anti-pattern: a child may crash, e.g. glibc's "double free or corruption", or corrupt a
    message). Workers then fork from a fork server, a fresh process that has imported what they
    need, and `_WorkerStart` gives them what a fork would have. The datasets are picklable for
    this (`mtl.data.folder`, `mtl.data.shards`)."""
    if not workers or not from_fork_server():
        return {}
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return {"multiprocessing_context": ctx, "worker_init_fn": _WorkerStart()}


class _WorkerStart:
    """A fork server's loader worker, made like a forked one. Its environment: the training
    process's as the loader was made (the server's is the one the first loader of the process
    found). Its end: with the training process. torch's watchdog in a worker watches the worker's
    parent, which is the server here, so the workers of a killed training process (Ray kills the
    group's processes on every restart) would live on, and keep the server alive."""

    def __init__(self) -> None:
        self.env = dict(os.environ)

    def __call__(self, worker_id: int) -> None:
        os.environ.clear()
        os.environ.update(self.env)
        trainer = multiprocessing.parent_process()  # (for a fork server's child: the process that asked for it)
        if trainer is not None:
            threading.Thread(target=_exit_with, args=(trainer.sentinel,), name="exit-with-trainer", daemon=True).start()


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # readable once the training process is gone
    os._exit(1)


def from_fork_server() -> bool:
    """Whether loader workers start from a fork server here (`worker_start_kwargs`)."""
    return "ray" in sys.modules


class StartedIterators:
    """The DataLoader iterators a loader started, so that its owner can end their worker
    processes when it is done (`end`), instead of leaving that to the garbage collector: an
    iterator it frees inside a reference cycle (a finished trainer's) may find its queues already
    finalized, its workers then never hear the end, and each costs a 5 s join
    (``MP_STATUS_CHECK_INTERVAL``) at whatever later step the collection ran: 80 s measured, in
    one process that had run four trainings of 2-4 loader workers each. Lightning ends its
    loaders' workers the same way (torch has no public call for it)."""

    def __init__(self) -> None:
        self._live: weakref.WeakSet = weakref.WeakSet()

    def add(self, it: Iterable) -> Iterable:
        self._live.add(it)
        return it

    def end(self) -> None:
        for it in list(self._live):
            shutdown = getattr(it, "_shutdown_workers", None)  # (none for a loader without workers)
            if shutdown is not None:
                shutdown()
        self._live.clear()


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int, prefetch: int,
                rank: int = 0, world: int = 1, drop_last: bool = True, pin_memory: bool = False) -> DataLoader:
    sampler = EpochSampler(len(dataset), shuffle, seed, rank, world, pad=drop_last)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last, collate_fn=pack_collate,
        pin_memory=pin_memory, persistent_workers=workers > 0, prefetch_factor=prefetch if workers > 0 else None,
        **worker_start_kwargs(workers),
    )
