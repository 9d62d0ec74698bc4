"""Benchmarks that print numbers (and write JSON).

Training throughput, per architecture and batch size: images/s, step time, the host's share of
it (time to queue a step) and the time spent waiting for data, host syncs per step, peak GPU
memory, model TFLOP/s and MFU, for (1) pure compute: synthetic tensors already on the device and
a plainly written model + loss + optimizer step, and (2) the project's full path: decoded,
augmented samples from the loader (folder, or --shards), the project's train step in a 1-rank
DDP wrapper as on Ray. Steps are queued back to back with one sync at the end, as in training:

    python jobs/benchmark.py train --archs branched distillation --batch-sizes 16 32 64 [--compile]

Loader throughput (images/s per CPU core, 256x512 with augmentation), next to a bare loop
that only reads and decodes the same files:

    python jobs/benchmark.py loader [--size 256x512] [--samples 400] [--s3 s3://bucket/prefix]

``--s3`` shards the synthetic set to that prefix (endpoint from AWS_ENDPOINT_URL) and also
measures streaming from there.

What work on another thread of the training process costs the training thread (the GIL): an
emulated step (short torch ops, each of which releases and takes the GIL back, then a wait for
the GPU) timed alone and while a background checkpoint write, a PNG encoding or a curves.png
drawing runs beside it:

    python jobs/benchmark.py background [--ops 70] [--gpu-ms 15] [--state-mb 315]
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Annotated, Callable, Literal, Union

import tyro

from mtl.config import Device, Size
from mtl.zoo_names import Arch, Encoder


def write_json(path: str, obj: dict) -> None:
    from mtl.storage import json_bytes

    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(json_bytes(obj))  # (NaN, e.g. peak memory on the CPU, as null)
    os.replace(tmp, path)  # a reader never sees half a file


def _rate(n: int, seconds: float) -> float:
    return n / max(seconds, 1e-9)


def bench_loader(a: LoaderBench, save=lambda results, cpu: None) -> tuple[dict[str, float], dict[str, dict]]:
    """img/s by path, and the CPU cost per sample of the worker-scaling rows (`_worker_scaling`).
    ``save(results, cpu)`` is called after every measurement: a run cut off by its time limit
    keeps what it measured."""
    import torch

    from mtl.data.build import synthetic_root
    from mtl.data.folder import MiniscapesFolder
    from mtl.data.loader import make_loader
    from mtl.data.shards import ShardLoader, ShardSplit, ShardStream, read_manifest
    from mtl.data.transforms import Augment

    torch.set_num_threads(1)
    h, w = a.size
    root = synthetic_root((h, w), (a.samples, 8, 8), seed=0)
    aug = Augment(1.0, 1.25, None, True)
    ds = MiniscapesFolder(root, "train", aug)
    results, cpu = _bare_decode(ds), {}
    save(results, cpu)

    def run(name: str, loader, n_expected: int) -> None:
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += batch["rgb"].shape[0]
        assert n > 0.9 * n_expected, (n, n_expected)
        results[name] = _rate(n, time.perf_counter() - t0)
        save(results, cpu)

    run("folder loader, no augmentation", make_loader(MiniscapesFolder(root, "train"), 16, True, 0, 0, 2, drop_last=False), len(ds))
    run("folder loader + augmentation", make_loader(ds, 16, True, 0, 0, 2, drop_last=False), len(ds))
    results.update(_batch_to_model(next(iter(make_loader(ds, 16, True, 0, 0, 2)))))
    _worker_scaling(ds, a.scaling, a.scaling_batches, a.per_worker, results, cpu, save)
    for name, url in _shard_sources(a, root).items():
        split = ShardSplit.from_manifest(read_manifest(url), "train")
        run(f"{name} loader, no augmentation", ShardLoader(ShardStream(split, None), 16, 0, 4, False, False), a.samples)
        run(f"{name} loader + augmentation", ShardLoader(ShardStream(split, aug), 16, 0, 4, False, False), a.samples)
        run(f"{name} loader + augmentation, {a.workers} workers (total img/s)",
            ShardLoader(ShardStream(split, aug), 16, a.workers, 4, False, False), a.samples)
    return results, cpu


def _worker_scaling(ds, counts: tuple[int, ...], batches: tuple[int, ...], per_worker: int, results: dict, cpu: dict, save) -> None:
    """Into ``results`` and ``cpu`` (``save``-d after each row): the training loader (folder +
    augmentation, pinned on CUDA) with N worker processes and batch B: total img/s from its first
    batch on (the workers' start is left out), over ``per_worker`` samples per worker (and a
    batch) so that every count runs about as long.
    Batch 16 is the rows' default name; other batches say theirs: a batch of 64 moves 4x the
    shared memory a batch and pins it in one piece, which batch 16 does not show.

    Also, per row, the CPU time per sample of the main process (receiving and pinning the
    batches: one process for all workers, so the first to run out as workers are added) and of
    the workers together (read, decode, collate, share): which of the two limits the scaling."""
    import torch

    from mtl.data.loader import make_loader

    class First(torch.utils.data.Dataset):  # the first k samples (items are (epoch, index), not Subset's ints)
        def __init__(self, k: int) -> None:
            self.k = k

        def __len__(self) -> int:
            return self.k

        def __getitem__(self, item):
            return ds[item]

    for bs in batches:
        for n in counts:
            sub = First(min(len(ds), per_worker * n + bs * 4))
            loader = make_loader(sub, bs, True, 0, n, 4, pin_memory=torch.cuda.is_available())
            it = iter(loader)
            got, seen = next(it)["rgb"].shape[0], 0
            with CpuUse() as use:
                for batch in it:
                    seen += batch["rgb"].shape[0]
            name = f"folder loader + augmentation, {n} workers{'' if bs == 16 else f', batch {bs}'} (total img/s after the first batch)"
            results[name] = _rate(seen, use.wall)
            cpu[name] = {"main_ms_per_img": 1e3 * use.main / max(seen, 1),
                         "workers_ms_per_img": None if math.isnan(use.workers) else 1e3 * use.workers / max(seen, 1)}
            assert got + seen >= len(sub) - bs, (got, seen, len(sub))
            del it, loader
            save(results, cpu)


def _processes_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these (live) processes, from /proc (Linux); NaN elsewhere."""
    total = 0.0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")
    return total


def _forked_children() -> list[int]:
    """This process's children that run its own command line: the loader's forked workers (not,
    say, torch.compile's worker pool). From /proc (Linux); [] elsewhere."""
    try:
        with open("/proc/self/cmdline", "rb") as fh:
            mine = fh.read()
        kids = []
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as fh:
                kids += [int(p) for p in fh.read().split()]
        same = []
        for pid in kids:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if fh.read() == mine:
                    same.append(pid)
        return sorted(same)
    except (OSError, ValueError):
        return []


class CpuUse:
    """CPU time over a timed window: this process's (every thread: the train loop, the pin-memory
    thread, CUDA's) and its loader workers'. It tells a loader that cannot keep up because its
    workers are busy (``workers_busy`` near 100 %: too few of them, or slowed by what shares their
    cores) from one whose workers wait (on in-order delivery, the prefetch limit or the training
    process). NaN where /proc cannot say, or when the workers changed during the window (shard
    loaders fork theirs per epoch)."""

    def __enter__(self) -> CpuUse:
        self.pids = _forked_children()
        self.t0, self.main0, self.workers0 = time.perf_counter(), time.process_time(), _processes_cpu_s(self.pids)
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.main = time.perf_counter() - self.t0, time.process_time() - self.main0
        same = _forked_children() == self.pids
        self.workers = _processes_cpu_s(self.pids) - self.workers0 if same and self.pids else float("nan")

    def row(self, steps: int, images: int) -> dict[str, float]:
        return {"main_cpu_ms_per_step": 1e3 * self.main / steps, "main_cores": self.main / self.wall,
                "workers": len(self.pids), "workers_cpu_ms_per_img": 1e3 * self.workers / images,
                "workers_busy": self.workers / self.wall / max(len(self.pids), 1)}


def _bare_decode(ds) -> dict[str, float]:
    """The floor under every loader: decoding the files, from memory and from disk."""
    from mtl.data.miniscapes import decode_sample

    results = {}
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
    return results


def _batch_to_model(batch: dict) -> dict[str, float]:
    """The other half of augmentation: resampling the batch by its crop vectors, where training does it."""
    from mtl.data.batch import to_model_batch
    from mtl.engine import resolve_device

    device = resolve_device("auto")
    for _ in range(3):
        to_model_batch(batch, device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        to_model_batch(batch, device)
    _sync(device)
    n = 10 * batch["rgb"].shape[0]
    return {f"batch to model input on {device.type} (zoom/crop/flip + normalise, 1 thread on CPU)": _rate(n, time.perf_counter() - t0)}


def _shard_sources(a: LoaderBench, root: str) -> dict[str, str]:
    """Shard sets of the synthetic train split: a cached local one, and ``--s3`` when given
    (written there unless a manifest is already there)."""
    from data_prep.shard import shard_dataset
    from mtl.data.build import cache_dir
    from mtl.data.shards import read_manifest
    from mtl.data.synthetic import GENERATOR_VERSION
    from mtl.machine import usable_cpus

    # (the scenes' generator in the name, as the synthetic set's: `mtl.data.build.synthetic_root`)
    local = os.path.join(cache_dir(), f"bench-shards-{a.size[0]}x{a.size[1]}-{a.samples}-v{GENERATOR_VERSION}")
    if not os.path.exists(os.path.join(local, "manifest.json")):
        shard_dataset(root, local, "64", splits=("train",), workers=usable_cpus())
    sources = {"local shards": local}
    if a.s3:
        try:
            read_manifest(a.s3)
        except FileNotFoundError:
            shard_dataset(root, a.s3, "64", splits=("train",), workers=usable_cpus())
        sources["S3 shards"] = a.s3
    return sources


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


def seconds_per_step(step, n: int, device) -> float:
    """Wall time per step over n steps queued back to back (one sync at the end), as in training."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / n


def host_seconds_per_step(step, n: int, device) -> float:
    """CPU time to queue one step from an idle device: when it is close to the step time the
    step is launch-bound (a case for --compile / CUDA graphs), not GPU-bound."""
    total = 0.0
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        step()
        total += time.perf_counter() - t0
    _sync(device)
    return total / n


def sync_check(step, device) -> tuple[int, dict[str, int], str]:
    """(ATen ops in one step, host-sync ops among them, CUDA's own verdict on synchronising calls)."""
    import torch

    from mtl.opcount import OpRecorder

    with OpRecorder() as rec:
        step()
    verdict = "n/a (not CUDA)"
    if device.type == "cuda":
        _sync(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            verdict = "none"
        except RuntimeError as e:
            verdict = f"synchronising call: {str(e).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return rec.total, rec.host_syncs(), verdict


class Feed:
    """Model batches across epoch boundaries through the train loop's own device prefetcher,
    timing how long the host waits for them: in all (``wait``), and in the calls that crossed an
    epoch boundary (``boundary_wait``, ``boundaries``). Back to back, as here, the next epoch's
    workers refill their queues while the step waits; in training that refill overlaps
    validation (`mtl.engine.Trainer.fit` starts the next epoch's loader before it)."""

    def __init__(self, loader, device) -> None:
        self.loader, self.device, self.epoch, self.it = loader, device, 0, None
        self.reset()

    def reset(self) -> None:
        self.wait, self.boundary_wait, self.boundaries = 0.0, 0.0, 0

    def next(self):
        from mtl.engine import start_epoch

        t0, crossed = time.perf_counter(), False
        while True:
            if self.it is None:
                self.it = start_epoch(self.loader, self.epoch, self.device, True)
            try:
                batch = next(self.it)
                break
            except StopIteration:
                self.it, self.epoch, crossed = None, self.epoch + 1, True
        waited = time.perf_counter() - t0
        self.wait += waited
        if crossed:
            self.boundary_wait, self.boundaries = self.boundary_wait + waited, self.boundaries + 1
        return batch


class OneRankDDP:
    """A one-process DDP group (gloo on CPU, NCCL on CUDA): the full path runs the train step
    wrapped exactly as a Ray Train worker runs it."""

    def __init__(self, device) -> None:
        import torch.distributed as dist

        self.tmp = tempfile.mkdtemp(prefix="bench-ddp-")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{self.tmp}/store", rank=0, world_size=1)

    def close(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()
        shutil.rmtree(self.tmp, ignore_errors=True)


def bench_train(a: TrainBench, on_row=None) -> list[dict]:
    """One row per (arch, batch size); ``on_row(rows)`` after each, so a run cut short keeps its rows."""
    import torch

    from mtl.engine import resolve_device

    device = resolve_device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if a.intra_op_threads:
        torch.set_num_threads(a.intra_op_threads)
    peak = a.peak_tflops or matmul_peak_tflops(device)
    group = OneRankDDP(device) if a.strategy == "ddp" else None
    rows = []
    for arch in a.archs:
        for bs in a.batch_sizes:
            row = _bench_one(a, arch, bs, device, peak)
            stop = row.pop("stop", False)
            rows.append(row)
            if on_row:
                on_row(rows)
            if stop:
                raise RuntimeError(f"{arch} batch {bs}: {row['graph_error']}: no more rows can be measured")
            if device.type == "cuda":  # the last config's model and workers are gone: free their memory
                torch.cuda.empty_cache()
    if group:
        group.close()
    return rows


def _bench_one(a: TrainBench, arch: str, bs: int, device, peak: float) -> dict:
    """Both paths for one (arch, batch size): eager, then (CUDA, ``--cuda-graph``) the same two
    paths with the step captured as a CUDA graph; the loader is shared, not the model."""
    import torch

    from mtl.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
    from mtl.data.build import build_loaders
    from mtl.engine import build_optimizer
    from mtl.models import build_model

    h, w = a.size
    cfg = ExperimentConfig(
        data=DataConfig(shards=a.shards, synthetic_size=(h, w), synthetic_counts=(max(a.samples, bs * 4), 8, 8),
                        workers=a.workers, prefetch=4),
        model=ModelConfig(arch=arch, encoder=a.encoder), train=TrainConfig(batch_size=bs, device=a.device, compile=a.compile),
    ).validate()
    feed = Feed(build_loaders(cfg, pin_memory=device.type == "cuda").train, device)
    row = {"arch": arch, "batch": bs, "device": str(device), "strategy": a.strategy, "compile": a.compile,
           "source": "shards" if a.shards else "folder", "peak_tflops": peak, "intra_op_threads": torch.get_num_threads(),
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none"}
    modes = ["eager"] + (["graph"] if a.cuda_graph and device.type == "cuda" else [])
    flops = 0.0
    for mode in modes:  # each mode with its own model, optimizer and wrapper, as a run has them
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last)
        opt = build_optimizer(model, cfg)
        fwd = torch.compile(model) if a.compile else model
        strategy = _strategy(a, model, fwd, opt, device, mode == "graph")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            pure = _pure_path(a, fwd, opt, bs, device, mode == "graph")
            flops = pure["flops"] = pure["flops"] or flops  # counted on the eager step
            full = _full_path(a, cfg, strategy, feed, device, mode == "graph")
        except Exception as e:  # noqa: BLE001 - a capture that fails is this row's finding, not the run's end
            if mode != "graph":
                raise
            _graph_failed(row, e)
        else:
            row.update(_row_part("" if mode == "eager" else "graph_", bs, pure, full, peak, device))
        del model, opt, fwd, strategy
    return row


def _graph_failed(row: dict, e: Exception) -> None:
    """A failed capture, recorded in its row (``graph_error``); the rows after it are measured
    too, unless the capture left the CUDA allocator capturing (torch without pytorch#180395):
    then nothing more can be measured in this process (``stop``: `bench_train` saves the rows,
    then raises)."""
    from mtl.cuda_graph import allocator_left_capturing

    row["graph_error"] = f"{type(e).__name__}: {next((ln for ln in str(e).splitlines() if ln.strip()), '')}"
    stuck = allocator_left_capturing()
    if stuck:
        row["graph_error"] += f"; the allocator was left capturing ({stuck})"
        row["stop"] = True


def _row_part(prefix: str, bs: int, pure: dict, full: dict, peak: float, device) -> dict:
    import torch

    pure_s, full_s, flops = pure["step_s"], full["step_s"], pure["flops"]
    part = {
        "pure_img_s": bs / pure_s, "full_img_s": bs / full_s, "full_over_pure": pure_s / full_s,
        "pure_step_ms": 1e3 * pure_s, "host_ms": 1e3 * pure["host_s"], "full_step_ms": 1e3 * full_s,
        "full_host_ms": 1e3 * full["host_s"], "data_wait_ms": 1e3 * full["wait_s"],
        # the wait per step away from epoch boundaries, and per boundary crossed in the timed steps
        "steady_wait_ms": 1e3 * full["steady_wait_s"], "boundary_wait_ms": 1e3 * full["boundary_wait_s"],
        "epoch_boundaries": full["boundaries"], "ops_per_step": full["ops"],
        # over the timed steps: CPU of the training process and of the loader's workers (`CpuUse`)
        **full["cpu"],
        "host_syncs": sum(full["syncs"].values()), "host_sync_ops": full["syncs"], "cuda_sync_check": full["cuda_verdict"],
        # either path; a graph's memory pool holds a step's activations for good
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
        "gflop_per_img": flops / bs / 1e9, "tflops": flops / pure_s / 1e12, "mfu": flops / pure_s / 1e12 / peak,
    }
    return {prefix + k: v for k, v in part.items()}


def _strategy(a: TrainBench, model, fwd, opt, device, for_capture: bool):
    """The full path's strategy: a 1-rank DDP wrapper, as on Ray, or none."""
    import torch

    from mtl.strategy import DDPStrategy, PlainStrategy

    strategy = DDPStrategy(model, opt, device, for_capture=for_capture) if a.strategy == "ddp" else PlainStrategy(model, opt)
    if a.compile:  # (no DDP: the pure path's compiled model, compiled once)
        strategy.model = torch.compile(strategy.model) if a.strategy == "ddp" else fwd
    return strategy


def _pure_path(a: TrainBench, fwd, opt, bs: int, device, graph: bool) -> dict:
    """Pure compute, written plainly: tensors already on the device, no wrappers (``graph``: the
    same step captured, the batch copied into the graph's buffers each step, as training does)."""
    import torch

    from mtl.cuda_graph import CapturedStep
    from mtl.engine import autocast
    from mtl.losses import DepthCodec, multitask_loss

    h, w = a.size
    codec, amp = DepthCodec("log"), autocast(device, True)
    batch = {"rgb": torch.randn(bs, 3, h, w, device=device).contiguous(memory_format=torch.channels_last),
             "semseg": torch.randint(0, 19, (bs, h, w), device=device), "depth": torch.rand(bs, h, w, device=device) * 50 + 4,
             "valid": torch.ones(bs, h, w, dtype=torch.bool, device=device)}

    def step(b, last=True):
        with amp:
            out = fwd(b["rgb"])
        loss, parts = multitask_loss(out, b, codec, 0.5)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), **parts}

    flops = train_step_flops(fwd, batch["rgb"], batch, codec, 0.5) if not graph else 0.0
    run = CapturedStep(step, opt, device, strict=True, log=lambda m: None) if graph else step  # (errors raised)
    for _ in range(a.warmup):
        run(batch)
    pure_step = lambda: run(batch)  # noqa: E731
    return {"step_s": seconds_per_step(pure_step, a.steps, device), "flops": flops,
            "host_s": host_seconds_per_step(pure_step, min(a.steps, 10), device)}


def _full_path(a: TrainBench, cfg, strategy, feed: Feed, device, graph: bool) -> dict:
    """The project's full path: loader workers (decode, crop vectors) -> pinned uint8 batch ->
    the train loop's prefetcher (copy, zoom/crop/flip, normalise on a side stream) -> the train
    step with its wrapper (1-rank DDP, as on Ray, or none), eager or captured, made as training
    makes it (`mtl.engine.make_step`)."""
    import torch

    from mtl.cuda_graph import CapturedStep
    from mtl.engine import autocast, make_step
    from mtl.losses import DepthCodec
    from mtl.schedule import PolyLR

    codec, amp = DepthCodec("log"), autocast(device, True)
    running, plan, steps = torch.zeros(3, device=device), PolyLR(1e-4, 10**6), 0
    step = make_step(cfg.with_values({"train.cuda_graph": "on" if graph else "off"}), strategy, codec, amp, device,
                     log=lambda m: None)
    warmup = step.warmup if isinstance(step, CapturedStep) else 0

    def full_step() -> None:  # as `Trainer.train_epoch`: the LR, the step, the running losses
        nonlocal running, steps
        plan.apply(strategy.optimizer, steps)
        steps += 1
        parts = step(feed.next())
        running += torch.stack([parts["loss"], parts["loss_semseg"], parts["loss_depth"]])  # as `fit` logs

    for _ in range(max(a.warmup, warmup + 2)):
        full_step()
    feed.reset()
    with CpuUse() as cpu:
        step_s = seconds_per_step(full_step, a.steps, device)
    wait_s, boundary_s, boundaries = feed.wait / a.steps, feed.boundary_wait, feed.boundaries
    steady_s = (feed.wait - feed.boundary_wait) / max(a.steps - boundaries, 1)
    host_s = host_seconds_per_step(full_step, min(a.steps, 10), device)
    # last: a step stopped midway by CUDA's sync check would leave DDP mid-reduction
    ops, syncs, verdict = sync_check(full_step, device)
    return {"step_s": step_s, "wait_s": wait_s, "steady_wait_s": steady_s, "boundary_wait_s": boundary_s / max(boundaries, 1),
            "boundaries": boundaries, "host_s": host_s, "ops": ops, "syncs": syncs, "cuda_verdict": verdict,
            "cpu": cpu.row(a.steps, a.steps * cfg.train.batch_size)}


@dataclass(frozen=True)
class LoaderBench:
    """data loader throughput per CPU core"""

    size: Size = (256, 512)  # image size HxW
    samples: int = 400  # synthetic train samples
    workers: int = 2  # loader processes of the multi-process shard row
    scaling: tuple[int, ...] = ()  # also the training loader with each of these numbers of worker processes (e.g. 1 4 8 12)
    scaling_batches: tuple[int, ...] = (16,)  # the batch sizes of those rows (each with every count)
    per_worker: int = 128  # samples per worker process in those rows (more: closer to a long epoch's steady rate)
    s3: str | None = None  # also shard to this s3:// prefix and stream from it
    json: str | None = None  # also write the results to this JSON file


@dataclass(frozen=True)
class TrainBench:
    """train-step throughput: pure compute vs the full path"""

    archs: tuple[Arch, ...] = ("branched", "distillation")  # architectures to measure
    encoder: Encoder = "resnet34"  # the encoder of every architecture measured
    batch_sizes: tuple[int, ...] = (16, 32, 64)  # batch sizes to measure, each with every architecture
    size: Size = (256, 512)  # image size HxW
    steps: int = 30  # timed steps per measurement
    warmup: int = 10  # untimed steps before them
    samples: int = 512  # synthetic train samples for the full path
    workers: int = 8  # loader processes of the full path
    device: Device = "auto"  # auto: the GPU if there is one
    compile: bool = False  # torch.compile the model
    strategy: Literal["ddp", "plain"] = "ddp"  # full path: a 1-rank DDP wrapper (as on Ray) or none
    cuda_graph: bool = True  # also measure both paths with the step captured as a CUDA graph (CUDA only)
    shards: str | None = None  # the full path reads these WebDataset shards (prefix or manifest URL) instead of a folder
    # torch's CPU threads (intra-op pool) in this (the training) process, beside the loader's workers
    # (the pin-memory thread copies on its own thread either way; default: torch's choice, as training has it)
    intra_op_threads: int | None = None
    peak_tflops: float | None = None  # for MFU; default: a measured bf16 matmul peak
    json: str | None = None  # also write the rows to this JSON file


@dataclass(frozen=True)
class BackgroundBench:
    """the training thread's host time per step while other threads work"""

    ops: int = 70  # short torch ops the emulated step queues (the captured step queues ~70, an eager one ~1000)
    gpu_ms: float = 15.0  # then the emulated step waits this long for the GPU, the GIL released
    state_mb: int = 315  # size of the state the background checkpoint serialises (ResNet34 with Adam: ~315)
    repeats: int = 3  # each background job runs this many times in a row while the steps are timed
    json: str | None = None  # also write the rows to this JSON file


def _emulated_steps(a: BackgroundBench, until: Callable[[], bool]) -> list[float]:
    """Host ms of each emulated step (its GPU wait excluded) until ``until()`` (at least one)."""
    import torch

    x, host = torch.zeros(1), []
    while not host or not until():
        t0 = time.perf_counter()
        for _ in range(a.ops):
            x.add_(1)  # (each op's dispatch releases the GIL and takes it back)
        host.append(1e3 * (time.perf_counter() - t0))
        time.sleep(a.gpu_ms / 1e3)
    return host


def _beside(a: BackgroundBench, job: Callable[[], None] | None) -> dict[str, float]:
    """The emulated steps' host time alone (``job`` None: for 3 s) or while a thread runs ``job``
    ``a.repeats`` times; and how long the job took there."""
    import threading

    import numpy as np

    done, took, failed = threading.Event(), [math.nan], []

    def run() -> None:
        t0 = time.perf_counter()
        try:
            for _ in range(a.repeats):
                job()
            took[0] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - the row says what failed; the others are still measured
            failed.append(f"{type(e).__name__}: {e}")
        finally:
            done.set()

    start = time.perf_counter()
    thread = threading.Thread(target=run) if job else None
    if thread:
        thread.start()
    host = _emulated_steps(a, done.is_set if job else lambda: time.perf_counter() - start >= 3.0)
    if thread:
        thread.join()
    return {"host_ms_median": float(np.median(host)), "host_ms_p95": float(np.percentile(host, 95)), "steps": len(host),
            "job_s": took[0], **({"error": failed[0]} if failed else {})}


def _background_jobs(a: BackgroundBench, folder: str) -> dict[str, Callable[[], None] | None]:
    """What a training process runs beside its steps, by name (None: nothing)."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from mtl.curves import draw_curves, render

    state = {"model": {f"w{i}": torch.randn(a.state_mb * 2**20 // 4 // 300) for i in range(300)}}
    picture = np.tile(np.arange(1536, dtype=np.uint8)[None, :, None] % 251, (512, 1, 3))
    epochs = {e: {"train_loss": 1 / e, "miou": float(e), "si_log_rmse": 30.0 - e, "lr": 1e-3, "epoch_lrs": [1e-3] * 200,
                  "step": 200 * e, "score": float(e)} for e in range(1, 41)}
    jobs = {"nothing": None,
            f"torch.save of {a.state_mb} MB (a background checkpoint)": lambda: torch.save(state, os.path.join(folder, "s.pt")),
            "PNG encoding of 10 validation pictures (tracker)":
                lambda: [Image.fromarray(picture).save(io.BytesIO(), format="PNG") for _ in range(10)]}
    if render(epochs, "warm") is None:  # (matplotlib imported beforehand, as in a run's later drawings)
        print("no curves.png rows: matplotlib is not installed", flush=True)
        return jobs
    return {**jobs, "curves.png drawn by matplotlib in a thread": lambda: render(epochs, "run"),
            "curves.png drawn by a child process (mtl.curves)": lambda: draw_curves(epochs, "run")}


def bench_background(a: BackgroundBench) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="streetmtl-bench-") as d:
        return {name: _beside(a, job) for name, job in _background_jobs(a, d).items()}


Command = Union[Annotated[LoaderBench, tyro.conf.subcommand("loader")], Annotated[TrainBench, tyro.conf.subcommand("train")],
                Annotated[BackgroundBench, tyro.conf.subcommand("background")]]


def main(argv: list[str] | None = None) -> int:
    from mtl.cli import parse
    from mtl.errors import USER_ERRORS, one_line

    argv = sys.argv[1:] if argv is None else argv
    a = parse(Command, argv, description=__doc__, check=check_bench)
    try:
        if isinstance(a, BackgroundBench):
            return background_main(a, argv)
        return train_main(a, argv) if isinstance(a, TrainBench) else loader_main(a, argv)
    except USER_ERRORS as e:  # (data, storage, a file: one line naming it, as the other tools)
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def check_bench(a: LoaderBench | TrainBench | BackgroundBench) -> None:
    """Numbers a measurement needs, as usage errors before anything is built."""
    if getattr(a, "workers", 0) < 0:
        raise ValueError(f"--workers must be >= 0, got {a.workers}")
    json_out = getattr(a, "json", None)
    if json_out and "://" not in json_out and not os.path.isdir(os.path.dirname(os.path.abspath(json_out))):
        raise ValueError(f"--json {json_out}: its folder does not exist")  # (found after minutes of measuring, else)
    if isinstance(a, LoaderBench) and a.samples < 16:  # (the loader rows read batches of 16)
        raise ValueError(f"--samples must be at least 16 (one batch of the loader rows), got {a.samples}")
    if isinstance(a, LoaderBench) and (min(a.scaling_batches, default=1) < 1 or min(a.scaling, default=0) < 0 or a.per_worker < 1):
        raise ValueError(f"--scaling-batches and --per-worker must be >= 1 and --scaling >= 0, got {list(a.scaling_batches)}, "
                         f"{a.per_worker} and {list(a.scaling)}")
    if isinstance(a, LoaderBench) and a.s3 is not None and not a.s3.startswith("s3://"):  # (a local path: shards written there)
        raise ValueError(f"--s3 {a.s3!r} must be an s3:// prefix (the local shards' row is measured anyway)")
    if isinstance(a, TrainBench) and ((a.intra_op_threads is not None and a.intra_op_threads < 1)
                                      or (a.peak_tflops is not None and not a.peak_tflops > 0)):
        raise ValueError(f"--intra-op-threads must be >= 1 and --peak-tflops > 0 (or not given), got {a.intra_op_threads} "
                         f"and {a.peak_tflops}")
    if isinstance(a, BackgroundBench) and (a.ops < 1 or a.gpu_ms < 0 or a.state_mb < 1 or a.repeats < 1):
        raise ValueError("--ops, --state-mb and --repeats must be >= 1 and --gpu-ms >= 0")
    if isinstance(a, TrainBench):
        if a.steps < 1 or a.warmup < 0 or not a.archs or not a.batch_sizes:
            raise ValueError("--steps >= 1, --warmup >= 0 and at least one of --archs and of --batch-sizes are needed")
        if min(a.batch_sizes) < 2:  # (the zoo's context modules normalise over the batch: `mtl.runs.check_batch_for_model`)
            raise ValueError(f"--batch-sizes must be 2 or more, got {min(a.batch_sizes)}")


def train_main(a: TrainBench, argv: list[str]) -> int:
    from rich.table import Table

    from mtl.progress import wide_console

    def save(rows: list[dict]) -> None:
        r = rows[-1]
        for p in ("", "graph_") if "graph_pure_img_s" in r else ("",):
            print(f"{r['arch']} batch {r['batch']} {'captured' if p else 'eager'}: pure {r[p + 'pure_img_s']:.1f} img/s, "
                  f"full {r[p + 'full_img_s']:.1f} img/s ({r[p + 'full_over_pure']:.1%}), host {r[p + 'full_host_ms']:.1f} ms/step "
                  f"(step {r[p + 'full_step_ms']:.1f}), MFU {r[p + 'mfu']:.1%}, {r[p + 'peak_mem_gib']:.1f} GiB", flush=True)
        if "graph_error" in r:
            print(f"{r['arch']} batch {r['batch']} captured: FAILED ({r['graph_error']})", flush=True)
        if a.json:
            write_json(a.json, {"mode": "train", "size": a.size, "argv": argv, "rows": rows})

    rows = bench_train(a, save)
    on_cuda = rows[0]["device"].startswith("cuda")
    t = Table(title=f"training throughput at {a.size[0]}x{a.size[1]}, {a.encoder}, "
                    f"{'bf16 autocast' if on_cuda else 'fp32'} on {rows[0]['device']}"
                    f"{', torch.compile' if a.compile else ''} (peak {rows[0]['peak_tflops']:.3g} TFLOP/s for MFU)")
    cols = [("step", "{}"), ("arch", "{}"), ("batch", "{}"), ("pure_img_s", "{:.1f}"), ("full_img_s", "{:.1f}"),
            ("full_over_pure", "{:.1%}"), ("full_step_ms", "{:.1f}"), ("host_ms", "{:.1f}"), ("full_host_ms", "{:.1f}"),
            ("data_wait_ms", "{:.1f}"), ("steady_wait_ms", "{:.1f}"), ("boundary_wait_ms", "{:.0f}"), ("workers_busy", "{:.0%}"), ("main_cores", "{:.2f}"), ("ops_per_step", "{}"), ("host_syncs", "{}"), ("peak_mem_gib", "{:.1f}"),
            ("gflop_per_img", "{:.0f}"), ("mfu", "{:.1%}")]
    for c, _ in cols:
        t.add_column(c, justify="right")
    for r in rows:
        for p in ("", "graph_") if "graph_pure_img_s" in r else ("",):
            v = {**r, **{k[len(p):]: x for k, x in r.items() if p and k.startswith(p)}, "step": "captured" if p else "eager"}
            t.add_row(*(f.format(v[c]) for c, f in cols))
    wide_console().print(t)
    return 0


def loader_main(a: LoaderBench, argv: list[str]) -> int:
    from rich.table import Table

    from mtl.progress import wide_console

    def save(results: dict, cpu: dict) -> None:
        if a.json:
            write_json(a.json, {"mode": "loader", "size": a.size, "argv": argv, "results": results, "cpu": cpu})

    results, cpu = bench_loader(a, save)
    bare = results["bare read + decode"]
    t = Table(title=f"loader throughput, {a.size[0]}x{a.size[1]}, 1 process = 1 core unless stated")
    for c in ("path", "img/s", "vs bare read+decode", "main process CPU ms/img", "workers' CPU ms/img"):
        t.add_column(c, justify="left" if c == "path" else "right")
    for k, v in results.items():
        c = cpu.get(k, {})
        t.add_row(k, f"{v:.0f}", f"{v / bare:.2f}", *(f"{c[x]:.2f}" if c.get(x) is not None else "" for x in ("main_ms_per_img", "workers_ms_per_img")))
    wide_console().print(t)
    return 0


def background_main(a: BackgroundBench, argv: list[str]) -> int:
    from rich.markup import escape
    from rich.table import Table

    from mtl.progress import wide_console

    rows = bench_background(a)
    if a.json:
        write_json(a.json, {"mode": "background", "argv": argv, "rows": rows})
    t = Table(title=f"the training thread's host time per step ({a.ops} short torch ops, then {a.gpu_ms:g} ms waiting for "
                    f"the GPU) while another thread works ({a.repeats} times in a row)")
    for c in ("beside it", "host ms/step, median", "p95", "steps", "the job took s"):
        t.add_column(c, justify="left" if c == "beside it" else "right")
    for name, r in rows.items():
        t.add_row(name, f"{r['host_ms_median']:.2f}", f"{r['host_ms_p95']:.2f}", str(r["steps"]),
                  escape(r["error"]) if "error" in r else "" if math.isnan(r["job_s"]) else f"{r['job_s']:.2f}")
    wide_console().print(t)
    return 1 if any("error" in r for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
