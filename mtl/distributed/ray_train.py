"""Ray Train: the shared train loop on every worker of a Ray cluster, with DDP or DeepSpeed,
checkpoints in (S3) storage, and restarts after worker or node failures.

Resume is Ray Train V2's: calling `run_ray` again with the same run name and storage continues
from the latest reported checkpoint, and so does the worker group Ray restarts after a failure.
A checkpoint holds epoch and step; the LR is a function of the step and data order a function
of (seed, epoch), so resuming from a checkpoint one report older than the failure is exactly
right, just a little later.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtl.checkpoint import checkpoint_bytes, write_bytes_atomic
from mtl.config import ExperimentConfig
from mtl.engine import Runtime, check_resumable, fit
from mtl.strategy import DDPStrategy, PlainStrategy

# environment forwarded to every worker (object-store credentials and endpoints, our cache)
FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
               "AWS_REGION", "AWS_PROFILE", "STREETMTL_CACHE", "TORCH_EXTENSIONS_DIR")


def run_url(cfg: ExperimentConfig) -> str:
    return f"{storage_path(cfg)}/{cfg.run_name()}"


def storage_path(cfg: ExperimentConfig) -> str:
    out = cfg.train.out.rstrip("/")
    return out if "://" in out else os.path.abspath(out)


class RayCheckpointer:
    """Checkpoints reported to Ray Train (uploaded to the run's storage), plus ``best.pt`` and
    ``final.pt`` beside them in the run folder."""

    def __init__(self, cfg: ExperimentConfig, rank: int) -> None:
        self.rank, self.run_url = rank, run_url(cfg)

    def save(self, meta: dict[str, Any], strategy: PlainStrategy, tag: str, is_best: bool, metrics: dict[str, float]) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            wrote = strategy.save_dir(d, meta, self.rank)
            checkpoint = ray.train.Checkpoint.from_directory(d) if wrote else None
            # headline scalars to Ray (per-class IoUs and LR lists go to metrics/<tag>.json)
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "/" not in k}
            ray.train.report(scalars, checkpoint=checkpoint, checkpoint_dir_name=tag)
        if self.rank == 0:
            write_bytes_atomic(f"{self.run_url}/metrics/{tag}.json", json.dumps(metrics, indent=1).encode())
            if is_best:
                self.save_model(meta, strategy.module, "best.pt")

    def save_model(self, meta: dict[str, Any], module: nn.Module, name: str) -> None:
        state = {k: v for k, v in meta.items() if k != "rng"}
        write_bytes_atomic(f"{self.run_url}/{name}", checkpoint_bytes({**state, "model": module.state_dict()}))

    def restore(self, strategy: PlainStrategy, cfg: ExperimentConfig) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            meta = strategy.load_dir(d, lambda m: check_resumable(m, cfg))
        meta["url"] = checkpoint.path
        return meta


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point: rebuild the typed config, then the shared loop."""
    import ray.train
    import ray.train.torch

    cfg = ExperimentConfig.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def make_strategy(module: nn.Module, optimizer: torch.optim.Optimizer, c: ExperimentConfig) -> PlainStrategy:
        if c.dist.strategy == "deepspeed":
            from mtl.distributed.deepspeed_strategy import DeepSpeedStrategy

            return DeepSpeedStrategy(module, optimizer, c)
        if world > 1:
            return DDPStrategy(module, optimizer, device, c.train.grad_accum, c.optim.grad_clip)
        return PlainStrategy(module, optimizer, c.train.grad_accum, c.optim.grad_clip)

    from mtl.progress import wide_console

    checkpoints = RayCheckpointer(cfg, rank)
    console = wide_console()
    rt = Runtime(rank=rank, world=world, device=device, make_strategy=make_strategy,
                 all_reduce_sum=_all_reduce_sum if world > 1 else (lambda t: t), checkpoints=checkpoints,
                 log=console.print if rank == 0 else (lambda msg: None), cpus=int(cfg.dist.cpus_per_worker))
    result = fit(cfg, rt)
    if rank == 0 and result.metrics:  # (a restart after the last epoch trains nothing and keeps final.pt)
        final = result.metrics[-1] if result.metrics else {}
        checkpoints.save_model({"config": cfg.to_dict(), "epoch": final.get("epoch"), "metrics": final}, result.model, "final.pt")


def make_trainer(cfg: ExperimentConfig, callbacks: list | None = None):
    """The TorchTrainer for this config: workers sized by ``cfg.dist``, checkpoints in
    ``<train.out>/<run name>``, failures survived up to ``dist.max_failures``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    d = cfg.dist
    use_gpu = d.use_gpu if d.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict()},
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=use_gpu, resources_per_worker=worker_resources(cfg, use_gpu)),
        run_config=RunConfig(
            name=cfg.run_name(), storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=d.max_failures, controller_failure_limit=1),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last),
            worker_runtime_env={"env_vars": env},
            callbacks=callbacks,
        ),
    )


def worker_resources(cfg: ExperimentConfig, use_gpu: bool) -> dict[str, float]:
    return {"CPU": cfg.dist.cpus_per_worker, **({"GPU": cfg.dist.gpus_per_worker} if use_gpu else {})}


def connect(cfg: ExperimentConfig) -> None:
    """Join the cluster (``dist.address``, $RAY_ADDRESS, a submitted job's) or start a local one.
    Sets the worker-group start timeout first: an unplaceable group then fails instead of hanging."""
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.dist.start_timeout_s)
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.dist.address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def run_ray(cfg: ExperimentConfig):
    """Train on the Ray cluster; returns Ray's Result. Raises RuntimeError with a clear message
    when the worker group cannot be started (too few CPUs/GPUs) within ``dist.start_timeout_s``."""
    import ray

    connect(cfg)
    trainer = make_trainer(cfg)
    try:
        return trainer.fit()
    except ray.train.ControllerError as e:
        d = cfg.dist
        use_gpu = d.use_gpu if d.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
        need = {k: v * d.num_workers for k, v in worker_resources(cfg, use_gpu).items()}
        have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        raise RuntimeError(
            f"could not start {d.num_workers} training worker(s) needing {need} in total within {d.start_timeout_s:g}s; "
            f"the cluster has {have}. Lower --num-workers/--cpus-per-worker/--gpus-per-worker or add nodes. ({e})"
        ) from e
