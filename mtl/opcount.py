"""Counting the ATen ops a piece of code dispatches, and the ones that make the host wait.

On a GPU, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``.tolist()``,
``.cpu()``, ``.numpy()``, boolean indexing, ``nonzero``, ``bincount``) blocks the CPU until every
queued kernel has run, so the next step cannot be queued behind the current one. `OpRecorder`
sees those reads on any device, the CPU included, which lets tests guard the hot path on
machines without a GPU. Two views are needed for that: on the CPU, ``.tolist()``, ``.cpu()``
and ``.numpy()`` dispatch no ATen op that reads (they are seen as the Python calls they are),
and a boolean index runs its ``nonzero`` inside the ``index`` kernel (seen by its index's dtype).
What neither view can tell apart on the CPU is ``.to(device)`` from ``.to("cpu")``: a test's
device is the CPU.
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose result (or output shape) the host needs before it can go on: each one is a device sync
HOST_SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.equal", "aten.bincount",
    "aten._unique2", "aten.unique_consecutive", "aten.unique_dim", "aten.allclose", "aten.repeat_interleave",
})
# Tensor methods that copy a value to the host (their ATen ops, if any, look like any other copy)
HOST_READ_METHODS = frozenset({"tolist", "cpu", "numpy"})
# ops that read a boolean index's positions on the host (``x[mask]``, ``x[mask] = v``)
_INDEX_OPS = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl", "aten._index_put_impl_"})
BOOL_INDEX = "boolean-mask index"


def _has_bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class _HostReads(TorchFunctionMode):
    """Counts the Python-level host reads (`HOST_READ_METHODS`) into ``ops``."""

    def __init__(self, ops: collections.Counter[str]) -> None:
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READ_METHODS:
            self.ops[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))


class OpRecorder(TorchDispatchMode):
    """``with OpRecorder() as rec: ...`` -> ``rec.ops`` (name -> count), ``rec.host_syncs()``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self._reads = _HostReads(self.ops)

    def __enter__(self) -> OpRecorder:
        self._reads.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._reads.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._reads.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if name in _INDEX_OPS and _has_bool_index(args):
            self.ops[BOOL_INDEX] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """ATen ops dispatched (the Python-level reads are counted apart)."""
        return sum(v for k, v in self.ops.items() if k.startswith("aten.") and k != BOOL_INDEX)

    def host_syncs(self) -> dict[str, int]:
        return {k: v for k, v in self.ops.items()
                if k in HOST_SYNC_OPS or k == BOOL_INDEX or k.removeprefix("Tensor.") in HOST_READ_METHODS}
