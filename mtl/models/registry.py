"""Plain name -> constructor registries for the parts of the model zoo."""

from __future__ import annotations

from typing import Callable

ENCODERS: dict[str, Callable] = {}
CONTEXTS: dict[str, Callable] = {}  # ASPP, vortex pooling, ...: bottleneck -> 256-channel context
DECODERS: dict[str, Callable] = {}  # context (+ encoder skips) -> 256-channel features
ARCHITECTURES: dict[str, Callable] = {}


def register(table: dict[str, Callable], name: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        if name in table:
            raise KeyError(f"{name!r} registered twice")
        table[name] = fn
        return fn

    return deco


def lookup(table: dict[str, Callable], name: str, what: str) -> Callable:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}") from None
