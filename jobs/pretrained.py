"""Copy torchvision's ImageNet encoder weights to a mirror, for clusters whose nodes have no
internet (with internet, ``--pretrained imagenet`` fetches them into torch hub's cache itself):

    python jobs/pretrained.py --to s3://my-bucket/weights resnet34 resnet50

Each file is taken from torch hub's cache (downloaded there first if missing, hash checked),
written to ``<to>/<torchvision's file name>`` and its URL printed: pass it to ``--pretrained``
(``--pretrained s3://my-bucket/weights/resnet34-b627a593.pth``). A file already on the mirror
with the same bytes is left alone.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Annotated

import tyro

from mtl.cli import parse
from mtl.zoo_names import Encoder


@dataclass(frozen=True)
class MirrorCommand:
    to: str  # the mirror: a folder or fsspec URL prefix (s3://bucket/weights) every node can read
    encoders: Annotated[tuple[Encoder, ...], tyro.conf.Positional] = ("resnet34",)  # the encoders whose weights to copy


def run(a: MirrorCommand) -> list[str]:
    """Copy each encoder's file; returns the mirror URLs."""
    from mtl.models.encoders import imagenet_file
    from mtl.storage import read_bytes, write_bytes_atomic

    urls = []
    for name in a.encoders:
        local = imagenet_file(name, mirroring=True)
        url = f"{a.to.rstrip('/')}/{os.path.basename(local)}"
        with open(local, "rb") as fh:
            data = fh.read()
        if read_bytes(url) != data:
            write_bytes_atomic(url, data)
        print(f"{name}: --pretrained {url}")
        urls.append(url)
    return urls


def main(argv: list[str] | None = None) -> int:
    a = parse(MirrorCommand, argv, description=__doc__)
    from mtl.errors import USER_ERRORS, one_line

    try:
        run(a)
    except USER_ERRORS as e:  # no cached file and no network, an unreachable mirror: one line naming it
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
