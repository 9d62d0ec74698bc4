"""A loader batch as one buffer: what the loaders' workers hand the training process.

torch's default collate gives a dict of tensors, and each tensor crosses from a worker to the
training process as its own shared-memory file: a descriptor the main process fetches from the
worker over a socket, maps and later pins. A training batch has eight (rgb, semseg, disparity
codes, four crop vectors, index), so the main process paid about 5 ms per batch whatever its
size, and it is one process for all workers: the first thing to run out as workers are added.
Packed, a batch is one shared file, one pinned block and one host-to-device copy: the main
process's CPU per image went from 0.355 to 0.173 ms at batch 16 and from 0.189 to 0.143 ms at
batch 64 (development CPU, 2 workers, 256x512; docs/performance.md).

The price: torch's pinned-memory cache rounds each block up to a power of two, so a packed
batch pins a little more than its eight pieces did (a 256x512 batch of 64, 42 MB: 64 MiB instead
of 32 + 8 + 8 MiB; a batch of 16: 16 MiB instead of 12), times the batches in flight
(``prefetch x workers``).

`PackedBatch` reads like the dict (``batch["rgb"]``, ``"semseg" in batch``, ``items()``), so
code that looks at loader batches on the host needs no change; `to` moves the whole buffer in
one copy and hands back the dict of device tensors.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import get_worker_info

ALIGN = 64  # bytes: every part starts aligned for any dtype (and a cache line)
HOST_KEYS = ("index",)  # read on the host (logs, exports, checks), never needed on the device

Layout = tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]  # (key, dtype, shape, byte offset)


class PackedBatch:
    """A batch of uint8/int/float tensors laid out in one 1-D uint8 buffer.

    Deliberately not a ``collections.abc.Mapping``: torch's pin-memory thread (in some
    versions) unpacks any Mapping into a dict of separately pinned tensors before it looks
    for a ``pin_memory`` method, which would undo the packing.
    """

    __slots__ = ("buf", "layout")

    def __init__(self, buf: torch.Tensor, layout: Layout) -> None:
        self.buf, self.layout = buf, layout

    def __getitem__(self, key: str) -> torch.Tensor:
        for k, dtype, shape, offset in self.layout:
            if k == key:
                return _view(self.buf, dtype, shape, offset)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return any(k == key for k, *_ in self.layout)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.layout)

    def keys(self) -> list[str]:
        return [k for k, *_ in self.layout]

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(k, _view(self.buf, dtype, shape, offset)) for k, dtype, shape, offset in self.layout]

    def pin_memory(self, device: object = None) -> PackedBatch:
        """Called by the DataLoader's pin-memory thread: one pinned block for the whole batch."""
        return PackedBatch(self.buf.pin_memory(), self.layout)

    def to(self, device: torch.device, non_blocking: bool = False) -> dict[str, torch.Tensor]:
        """The batch as a dict on ``device`` after one copy of the buffer; `HOST_KEYS` stay views
        of the host buffer (reading them must not wait for the device)."""
        moved = self.buf.to(device, non_blocking=non_blocking)
        return {k: _view(self.buf if k in HOST_KEYS else moved, dtype, shape, offset) for k, dtype, shape, offset in self.layout}


def pack_collate(samples: list[dict[str, torch.Tensor]]) -> PackedBatch:
    """The DataLoader's ``collate_fn``: stack each key of the samples into its part of one
    buffer, allocated in shared memory inside a worker (as torch's own collate does per tensor),
    so the stacking is the only copy on the way to the training process.

    Raises TypeError naming a key whose value is not a tensor, KeyError for a sample without a
    key of the first, and ValueError naming the samples (by ``index``) whose shapes differ."""
    first = samples[0]
    layout, size = [], 0
    for key, value in first.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"a loader sample's {key!r} is a {type(value).__name__}, not a tensor: a batch packs tensors only")
        _check_shapes(samples, key)
        shape = (len(samples), *value.shape)
        layout.append((key, value.dtype, shape, size))
        size += _aligned(math.prod(shape) * value.element_size())
    buf = _shared_bytes(size)
    for key, dtype, shape, offset in layout:
        torch.stack([s[key] for s in samples], out=_view(buf, dtype, shape, offset))
    return PackedBatch(buf, tuple(layout))


def _check_shapes(samples: list[dict[str, torch.Tensor]], key: str) -> None:
    """One shape per key in a batch: images of other sizes (evaluated uncropped) cannot be stacked."""
    shapes = [tuple(s[key].shape) for s in samples]
    if len(set(shapes)) > 1:
        odd = next(i for i, sh in enumerate(shapes) if sh != shapes[0])
        who = [f"sample {int(s['index'])}" if "index" in s else f"item {i}" for i, s in zip((0, odd), (samples[0], samples[odd]))]
        raise ValueError(f"a batch's samples differ in {key!r}: {who[0]} is {list(shapes[0])}, {who[1]} is {list(shapes[odd])} "
                         f"(a split with images of several sizes: training and its validation need one size, which "
                         f"data_prep/cityscapes.py --size gives a Cityscapes conversion; jobs/evaluate.py --batch-size 1 "
                         f"and jobs/predict.py take them one by one)")


def _view(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    return buf[offset : offset + nbytes].view(dtype).view(shape)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _shared_bytes(n: int) -> torch.Tensor:
    """``n`` bytes; in shared memory when called in a loader worker (no copy when it is sent)."""
    if get_worker_info() is None:
        return torch.empty(n, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n))
