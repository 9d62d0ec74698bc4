"""Samplers and DataLoaders shared by every training mode."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for this rank: a per-epoch permutation from (seed, epoch), split
    across ranks, padded (for training) so every rank gets the same count: no DDP hang."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1, pad: bool = True) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world, self.pad = n, shuffle, seed, rank, world, pad
        self.epoch, self.skip = 0, 0
        # evaluation does not pad: a duplicated sample would be counted twice in the metrics
        self.per_rank = math.ceil(n / world) if pad else len(range(rank, n, world))

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next iterator yields ``epoch``'s order without its first ``skip`` items: a run
        resumed inside an epoch goes on exactly where the interrupted one stopped."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad:
            order += order[: self.per_rank * self.world - self.n]  # equal shares for every rank
        mine = order[self.rank :: self.world][self.skip:]
        return iter([(self.epoch, i) for i in mine])


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int, prefetch: int,
                rank: int = 0, world: int = 1, drop_last: bool = True, pin_memory: bool = False) -> DataLoader:
    sampler = EpochSampler(len(dataset), shuffle, seed, rank, world, pad=drop_last)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=pin_memory, persistent_workers=workers > 0, prefetch_factor=prefetch if workers > 0 else None,
    )
