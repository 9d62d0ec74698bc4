"""Outputs that appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def atomic_dir(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling folder of ``out`` to fill; it replaces ``out`` only when the
    block finishes without error, so an interrupted writer never leaves a folder that looks
    complete. A non-empty ``out`` is refused unless ``overwrite``."""
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
