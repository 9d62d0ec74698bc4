"""Benchmarks that print numbers (and write JSON).

Loader throughput (images/s per CPU core, 256x512 with augmentation), next to a bare loop
that only reads and decodes the same files:

    python jobs/benchmark.py loader [--size 256x512] [--samples 400] [--s3 s3://bucket/prefix]

``--s3`` shards the synthetic set to that prefix (endpoint from AWS_ENDPOINT_URL) and also
measures streaming from there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rate(n: int, seconds: float) -> float:
    return n / max(seconds, 1e-9)


def bench_loader(a: argparse.Namespace) -> dict:
    import torch

    from data_prep.shard import shard_dataset
    from mtl.data import cache_dir, synthetic_root
    from mtl.data.folder import MiniscapesFolder
    from mtl.data.loader import make_loader
    from mtl.data.miniscapes import decode_sample
    from mtl.data.shards import ShardLoader, ShardSplit, ShardStream, read_manifest
    from mtl.data.transforms import Augment

    torch.set_num_threads(1)
    h, w = a.size
    root = synthetic_root((h, w), (a.samples, 8, 8), seed=0)
    aug = Augment(1.0, 1.25, None, True)
    results: dict[str, float] = {}

    ds = MiniscapesFolder(root, "train", aug)
    files = [ds.read_bytes(i) for i in range(len(ds))]  # warm the page cache
    t0 = time.perf_counter()
    for f in files:
        decode_sample(f["rgb"], f["semseg"], f["depth"], "x")
    results["bare decode (bytes in memory)"] = _rate(len(files), time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(len(ds)):
        f = ds.read_bytes(i)
        decode_sample(f["rgb"], f["semseg"], f["depth"], "x")
    results["bare read + decode"] = _rate(len(ds), time.perf_counter() - t0)

    def run(loader, n_expected: int) -> float:
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += batch["rgb"].shape[0]
        assert n > 0.9 * n_expected, (n, n_expected)
        return _rate(n, time.perf_counter() - t0)

    results["folder loader, no augmentation"] = run(make_loader(MiniscapesFolder(root, "train"), 16, True, 0, 0, 2, drop_last=False), len(ds))
    results["folder loader + augmentation"] = run(make_loader(ds, 16, True, 0, 0, 2, drop_last=False), len(ds))

    local = os.path.join(cache_dir(), f"bench-shards-{h}x{w}-{a.samples}")
    if not os.path.exists(os.path.join(local, "manifest.json")):
        shard_dataset(root, local, "64", splits=("train",), workers=os.cpu_count())
    sources = {"local shards": local}
    if a.s3:
        try:
            read_manifest(a.s3)
        except FileNotFoundError:
            shard_dataset(root, a.s3, "64", splits=("train",), workers=os.cpu_count())
        sources["S3 shards"] = a.s3
    for name, url in sources.items():
        split = ShardSplit.from_manifest(read_manifest(url), "train")
        results[f"{name} loader, no augmentation"] = run(ShardLoader(ShardStream(split, None), 16, 0, 4, False, False), a.samples)
        results[f"{name} loader + augmentation"] = run(ShardLoader(ShardStream(split, aug), 16, 0, 4, False, False), a.samples)
        results[f"{name} loader + augmentation, {a.workers} workers (total img/s)"] = run(
            ShardLoader(ShardStream(split, aug), 16, a.workers, 4, False, False), a.samples)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    lo = sub.add_parser("loader", help="data loader throughput per CPU core")
    lo.add_argument("--size", default="256x512")
    lo.add_argument("--samples", type=int, default=400)
    lo.add_argument("--workers", type=int, default=2)
    lo.add_argument("--s3", default=None, help="also shard to / stream from this s3:// prefix")
    lo.add_argument("--json", default=None)
    a = p.parse_args(argv)
    a.size = tuple(int(v) for v in a.size.split("x"))
    from mtl.progress import wide_console
    from rich.table import Table

    results = bench_loader(a)
    bare = results["bare read + decode"]
    t = Table(title=f"loader throughput, {a.size[0]}x{a.size[1]}, 1 process = 1 core unless stated")
    t.add_column("path")
    t.add_column("img/s", justify="right")
    t.add_column("vs bare read+decode", justify="right")
    for k, v in results.items():
        t.add_row(k, f"{v:.0f}", f"{v / bare:.2f}")
    wide_console().print(t)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"mode": a.mode, "size": a.size, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
