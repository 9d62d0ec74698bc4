"""Benchmarks that print numbers (and write JSON).

Training throughput, per architecture and batch size: images/s, step time split into data wait
and compute, peak GPU memory, model TFLOP/s and MFU, for (1) pure compute: synthetic tensors
already on the device and a plainly written model + loss + optimizer step, and (2) the project's
full path: decoded samples from the loader with augmentation, the project's train step:

    python jobs/benchmark.py train --archs branched distillation --batch-sizes 16 32 64 [--compile]

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
    for f in files[:32]:  # and the decoders
        decode_sample(f["rgb"], f["semseg"], f["depth"], "x")
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


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device) -> float:
    """Measured bf16 matmul throughput: a practical peak for MFU when --peak-tflops is not given."""
    import torch

    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def train_step_flops(model, x, batch, codec, w) -> float:
    """FLOPs of one forward + backward (torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mtl.losses import multitask_loss

    with FlopCounterMode(display=False) as counter:
        loss, _ = multitask_loss(model(x), batch, codec, w)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_train(a: argparse.Namespace) -> list[dict]:
    import torch

    from mtl.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
    from mtl.data import build_loaders
    from mtl.data.batch import to_model_batch
    from mtl.engine import autocast, build_optimizer, resolve_device, train_step
    from mtl.losses import DepthCodec, multitask_loss
    from mtl.models import build_model
    from mtl.strategy import PlainStrategy

    device = resolve_device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    h, w = a.size
    peak = a.peak_tflops or matmul_peak_tflops(device)
    codec, amp = DepthCodec("log"), autocast(device, True)
    rows = []
    for arch in a.archs:
        for bs in a.batch_sizes:
            cfg = ExperimentConfig(
                data=DataConfig(synthetic_size=(h, w), synthetic_counts=(max(a.samples, bs * 4), 8, 8), workers=a.workers, prefetch=4),
                model=ModelConfig(arch=arch, encoder=a.encoder), train=TrainConfig(batch_size=bs, device=a.device, compile=a.compile),
            ).validate()
            torch.manual_seed(0)
            model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # (1) pure compute, written plainly
            x = torch.randn(bs, 3, h, w, device=device).contiguous(memory_format=torch.channels_last)
            batch = {"semseg": torch.randint(0, 19, (bs, h, w), device=device), "depth": torch.rand(bs, h, w, device=device) * 50 + 4,
                     "valid": torch.ones(bs, h, w, dtype=torch.bool, device=device)}
            flops = train_step_flops(model, x, batch, codec, 0.5)
            opt = build_optimizer(model, cfg, device)
            fwd = torch.compile(model) if a.compile else model

            def pure_step() -> None:
                with amp:
                    out = fwd(x)
                loss, _ = multitask_loss(out, batch, codec, 0.5)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            for _ in range(a.warmup):
                pure_step()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                pure_step()
            _sync(device)
            pure_s = (time.perf_counter() - t0) / a.steps
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")

            # (2) the project's full path: loader -> device batch -> train step
            loader = build_loaders(cfg, pin_memory=device.type == "cuda").train
            strategy = PlainStrategy(model, opt)
            if a.compile:
                strategy.model = fwd
            wait = comp = 0.0
            n = 0
            epoch = 0
            it = None
            total = a.warmup + a.steps
            while n < total:
                if it is None:
                    loader.set_epoch(epoch)
                    it = iter(loader)
                _sync(device)
                t0 = time.perf_counter()
                try:
                    raw = next(it)
                except StopIteration:
                    it, epoch = None, epoch + 1
                    continue
                t1 = time.perf_counter()
                b = to_model_batch(raw, device, True)
                train_step(strategy, b, codec, 0.5, amp)
                _sync(device)
                t2 = time.perf_counter()
                if n >= a.warmup:
                    wait += t1 - t0
                    comp += t2 - t1
                n += 1
            full_s = (wait + comp) / a.steps
            rows.append({
                "arch": arch, "batch": bs, "device": str(device), "pure_img_s": bs / pure_s, "full_img_s": bs / full_s,
                "full_over_pure": pure_s / full_s, "data_wait_ms": 1e3 * wait / a.steps, "compute_ms": 1e3 * comp / a.steps,
                "peak_mem_gib": mem, "gflop_per_img": flops / bs / 1e9, "tflops": flops / pure_s / 1e12,
                "mfu": flops / pure_s / 1e12 / peak, "peak_tflops": peak,
            })
            model = opt = strategy = loader = it = fwd = None  # free the device memory before the next config
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    lo = sub.add_parser("loader", help="data loader throughput per CPU core")
    lo.add_argument("--size", default="256x512")
    lo.add_argument("--samples", type=int, default=400)
    lo.add_argument("--workers", type=int, default=2)
    lo.add_argument("--s3", default=None, help="also shard to / stream from this s3:// prefix")
    lo.add_argument("--json", default=None)
    tr = sub.add_parser("train", help="train-step throughput: pure compute vs the full path")
    tr.add_argument("--archs", nargs="+", default=["branched", "distillation"])
    tr.add_argument("--encoder", default="resnet34")
    tr.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    tr.add_argument("--size", default="256x512")
    tr.add_argument("--steps", type=int, default=30)
    tr.add_argument("--warmup", type=int, default=10)
    tr.add_argument("--samples", type=int, default=512, help="synthetic train samples for the full path")
    tr.add_argument("--workers", type=int, default=8, help="loader processes")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--compile", action="store_true")
    tr.add_argument("--peak-tflops", type=float, default=None, help="for MFU; default: a measured bf16 matmul peak")
    tr.add_argument("--json", default=None)
    a = p.parse_args(argv)
    a.size = tuple(int(v) for v in a.size.split("x"))
    from rich.table import Table

    from mtl.progress import wide_console

    if a.mode == "train":
        rows = bench_train(a)
        t = Table(title=f"training throughput at {a.size[0]}x{a.size[1]}, {a.encoder}, bf16 autocast on CUDA"
                        f"{', torch.compile' if a.compile else ''} (peak {rows[0]['peak_tflops']:.0f} TFLOP/s for MFU)")
        cols = [("arch", "{}"), ("batch", "{}"), ("pure_img_s", "{:.1f}"), ("full_img_s", "{:.1f}"), ("full_over_pure", "{:.1%}"),
                ("data_wait_ms", "{:.1f}"), ("compute_ms", "{:.1f}"), ("peak_mem_gib", "{:.1f}"), ("gflop_per_img", "{:.0f}"),
                ("tflops", "{:.1f}"), ("mfu", "{:.1%}")]
        for c, _ in cols:
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(*(f.format(r[c]) for c, f in cols))
        wide_console().print(t)
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({"mode": "train", "size": a.size, "rows": rows}, fh, indent=1)
        return 0

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
