"""Counting the ATen ops a piece of code dispatches, and the ones that make the host wait.

On a GPU, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``.tolist()``, boolean
indexing, ``nonzero``, ``bincount``) blocks the CPU until every queued kernel has run, so the
next step cannot be queued behind the current one. `OpRecorder` sees those reads on any device,
the CPU included, which lets tests guard the hot path on machines without a GPU.
"""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode

# ops whose result (or output shape) the host needs before it can go on: each one is a device sync
HOST_SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.equal", "aten.bincount",
    "aten._unique2", "aten.unique_consecutive", "aten.unique_dim", "aten.allclose", "aten.repeat_interleave",
})


class OpRecorder(TorchDispatchMode):
    """``with OpRecorder() as rec: ...`` -> ``rec.ops`` (name -> count), ``rec.host_syncs()``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def host_syncs(self) -> dict[str, int]:
        return {k: v for k, v in self.ops.items() if k in HOST_SYNC_OPS}
