"""Name -> constructor registries for the parts of the model zoo.

Each registry accepts only the names `mtl.zoo_names` lists for its kind of part, and
`mtl.models` checks on import that every listed name got a constructor: the list of names and
the registry cannot drift apart."""

from __future__ import annotations

import typing
from typing import Any, Callable

from mtl.zoo_names import Arch, Context, Decoder, Encoder


class Registry(dict):
    """name -> constructor for one kind of part (``what``: "encoder", ...); ``names``: the
    Literal type of `mtl.zoo_names` listing the names it may hold."""

    def __init__(self, what: str, names: Any) -> None:
        super().__init__()
        self.what, self.names = what, typing.get_args(names)

    def __setitem__(self, name: str, fn: Callable) -> None:
        if name not in self.names:
            raise KeyError(f"{self.what} {name!r} is not listed in mtl.zoo_names ({', '.join(self.names)})")
        if name in self:
            raise KeyError(f"{name!r} registered twice")
        super().__setitem__(name, fn)

    def check_complete(self) -> None:
        missing = [n for n in self.names if n not in self]
        if missing:
            raise ImportError(f"mtl.zoo_names lists {self.what} {missing} but nothing registered a constructor for it")


ENCODERS = Registry("encoder", Encoder)
CONTEXTS = Registry("context module", Context)  # ASPP, vortex pooling, ...: bottleneck -> 256-channel context
DECODERS = Registry("decoder", Decoder)  # context (+ encoder skips) -> 256-channel features
ARCHITECTURES = Registry("architecture", Arch)


def register(table: Registry, name: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        table[name] = fn
        return fn

    return deco


def lookup(table: Registry, name: str) -> Callable:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {table.what} {name!r}; choose one of {sorted(table)}") from None
