"""The train step, the evaluation loop and the epoch loop, shared by every mode.

Local mode, Ray/DDP and DeepSpeed differ only in the `Runtime` they pass to `fit`: the
gradient strategy (`mtl.strategy`: plain, DDP, DeepSpeed; it also sums metric states across
ranks) and the storage the one checkpointer writes through (`mtl.checkpoint`: an fsspec folder,
or Ray Train's report). The checkpoint layout is the same in every mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from time import monotonic
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.markup import escape
from torch import nn

from mtl.checkpoint import Checkpointer, CheckpointStorage, FolderStorage, RNGState, TrainState, epoch_tag
from mtl.config import ExperimentConfig, ModelConfig
from mtl.cuda_graph import WARMUP_DDP, WARMUP_PLAIN, CapturedStep, StepFn
from mtl.data.build import FolderLoader, Loaders, build_loaders, coverage_notes, crop_note
from mtl.data.batch import DeviceBatches
from mtl.data.miniscapes import as_submitted
from mtl.errors import one_line
from mtl.data import loader as data_loader
from mtl.losses import DepthCodec, task_losses
from mtl.metrics import MultiTaskMetrics
from mtl.models import build_model, resolve
from mtl.models.encoders import describe_pretrained
from mtl.multitask import TASKS, load_baselines, task_metrics, trained_only
from mtl.progress import RunLog, TrainProgress, class_iou_table
from mtl.runs import (RunConflict, RunFolder, check_length, check_same_training, data_location, resolve_config, run_name, run_url,
                      same_kind, stored_config)
from mtl.schedule import PolyLR
from mtl.storage import same_location
from mtl.strategy import DDPStrategy, PlainStrategy, Strategy
from mtl.viz import denormalize_rgb, side_by_side
from mtl.weighting import TaskWeighting, build_weighting


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is visible")
    return torch.device(name)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaler needed); full fp32 on the CPU."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(model: nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    # Fused kernels (CUDA and CPU): a few launches for all parameters, and the step counters stay
    # tensors — the foreach path reads each one with .item(), a host sync per parameter on a GPU.
    # On the CPU fused Adam(W) is also ~5x faster than foreach (ResNet34 branched: 21 vs 106 ms).
    if o.optimizer == "adam":  # (the report's Adam: the decay as an L2 term in the gradient, unless decoupled)
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay,
                                decoupled_weight_decay=o.weight_decay_style == "decoupled", fused=True)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=True)


def train_step(strategy: Strategy, batch: dict[str, torch.Tensor], codec: DepthCodec, weighting: TaskWeighting,
               amp: contextlib.AbstractContextManager, last_micro_batch: bool = True,
               deep_supervision: str = "mean") -> dict[str, torch.Tensor]:
    """Forward + backward of one micro-batch (+ the update after the last one, and the task
    weighting's own update). Returns detached loss tensors: no host sync."""
    with strategy.sync_context(last_micro_batch):
        with amp:
            out = strategy.model(batch["rgb"])
        losses = task_losses(out, batch, codec, deep_supervision)
        loss = weighting(losses)
        strategy.backward(loss)
    strategy.step(last_micro_batch)
    losses = losses.detach()
    if weighting.learned:
        weighting.observe(losses, last_micro_batch)
    return {"loss": loss.detach(), "loss_semseg": losses[0], "loss_depth": losses[1]}


def build_encoder_weighted(cfg: ModelConfig) -> tuple[nn.Module, Exception | None]:
    """The model, its encoder loaded with the ``--pretrained`` weights when they can be read;
    else, and with the reason, the model without them. A resume restores every weight from its
    checkpoint, so it must not need the weights file any more (gone from a mirror, a node
    without torch hub's cache or internet after a restart); a run starting from scratch raises
    the reason (`Trainer`)."""
    try:
        return build_model(cfg), None
    except (OSError, ValueError) as e:
        if not cfg.pretrained:
            raise
        return build_model(dataclasses.replace(cfg, pretrained=None)), e  # (any other error: raised here)


def may_capture(cfg: ExperimentConfig) -> bool:
    """Whether the config lets the train step be captured as a CUDA graph (`make_step` still
    checks the device and the strategy): what a strategy needs to know before it is built."""
    return cfg.train.cuda_graph != "off" and cfg.graph_obstacle() is None


def graph_obstacle(cfg: ExperimentConfig, strategy: Strategy, device: torch.device) -> str | None:
    """Why this run's train step cannot be captured as a CUDA graph (None: it can)."""
    if device.type != "cuda":
        return f"a CUDA graph needs a GPU (the device is {device})"
    if not strategy.graph_capturable:
        return f"the {type(strategy).__name__} step cannot be captured (a DDP wrapper: unless built for it)"
    return cfg.graph_obstacle()


def make_step(cfg: ExperimentConfig, strategy: Strategy, codec: DepthCodec, amp: contextlib.AbstractContextManager,
              device: torch.device, world: int = 1, log: Callable[[str], None] = print,
              weighting: TaskWeighting | None = None) -> StepFn:
    """The train step function per ``--cuda-graph``: `train_step` itself, or the same captured
    as one CUDA graph after a few eager steps (`mtl.cuda_graph.CapturedStep`). ``weighting``:
    default the config's, on ``device`` (a learned one then sees only this rank's losses)."""
    if weighting is None:
        weighting = build_weighting(cfg.optim).to(device)

    def eager(batch: dict[str, torch.Tensor], last_micro_batch: bool = True) -> dict[str, torch.Tensor]:
        return train_step(strategy, batch, codec, weighting, amp, last_micro_batch, cfg.optim.deep_supervision)

    mode = cfg.train.cuda_graph
    why_not = graph_obstacle(cfg, strategy, device) if mode != "off" else "--cuda-graph off"
    if why_not:
        if mode == "on":
            raise ValueError(f"--cuda-graph on: {why_not}")
        if mode == "auto" and device.type == "cuda":
            log(f"eager train step: {why_not}")
        return eager
    warmup = WARMUP_DDP if isinstance(strategy, DDPStrategy) else WARMUP_PLAIN

    def agree(ok: bool) -> bool:  # several ranks: whether every rank's capture succeeded (once, one sync)
        return int(strategy.all_reduce_sum(torch.tensor([0 if ok else 1], device=device))[0]) == 0

    return CapturedStep(eager, strategy.optimizer, device, warmup, log=log, strict=mode == "on",
                        agree=agree if world > 1 else None)


@torch.no_grad()
def predict(model: nn.Module, rgb: torch.Tensor, codec: DepthCodec, amp: contextlib.AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor]:
    """Final predictions: class ids (B x H x W) and depth in metres (B x H x W)."""
    with amp:
        out = model(rgb)
    return out["semseg"][-1].argmax(1), codec.decode(out["depth"][-1][:, 0])


@torch.no_grad()
def evaluate(model: nn.Module, loader, codec: DepthCodec, device: torch.device, amp: contextlib.AbstractContextManager,
             channels_last: bool = True, progress: Callable[[], None] | None = None,
             pictures: list[np.ndarray] | None = None, num_pictures: int = 2, submitted: bool = False,
             tasks: Sequence[str] = TASKS) -> MultiTaskMetrics:
    """Metric state of this rank's share of a split (sum states across ranks before `compute`);
    ``loader``: the split's loader, or an iterator of its batches started ahead of time.
    ``pictures`` (a list): the first batch's first ``num_pictures`` predictions (of the trained
    ``tasks``) are appended to it as `mtl.viz.side_by_side` images (rgb | ground truth |
    prediction). ``submitted``: the depth
    scored as a submission PNG holds it (`mtl.data.miniscapes.as_submitted`), not as predicted."""
    was_training = model.training
    model.eval()
    metrics = MultiTaskMetrics(device=device)
    for i, batch in enumerate(DeviceBatches(iter(loader), device, channels_last)):
        labels, depth_m = predict(model, batch["rgb"], codec, amp)
        metrics.update(labels, as_submitted(depth_m) if submitted else depth_m, batch)
        if i == 0 and pictures is not None:
            pictures.extend(draw_predictions(batch, labels, depth_m, num_pictures, tasks))
        if progress:
            progress()
    model.train(was_training)
    return metrics


def draw_predictions(batch: dict[str, torch.Tensor], labels: torch.Tensor, depth_m: torch.Tensor, n: int,
                     tasks: Sequence[str] = TASKS) -> list[np.ndarray]:
    """The first ``n`` images of a batch with their ground truth and predictions of the trained
    ``tasks`` (HxWx3 uint8; an untrained head's row is left out)."""
    rgb, gt = batch["rgb"][:n].float().cpu().numpy(), [batch[k][:n].cpu().numpy() for k in ("semseg", "depth", "valid")]
    labels, depth_m = labels[:n].cpu().numpy(), depth_m[:n].cpu().numpy()
    return [side_by_side(denormalize_rgb(rgb[i]), *trained_only(labels[i], depth_m[i], tasks), gt[0][i], gt[1][i], gt[2][i])
            for i in range(len(rgb))]


# ------------------------------------------------------------------------------ the epoch loop

@dataclass
class Runtime:
    """What differs between local, DDP and DeepSpeed runs: the rank, the device, how the
    strategy is made and where checkpoints are stored."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    make_strategy: Callable[[nn.Module, torch.optim.Optimizer, ExperimentConfig], Strategy] = (
        lambda m, o, cfg: PlainStrategy(m, o, cfg.train.grad_accum, cfg.optim.grad_clip))
    storage: CheckpointStorage | None = None  # None: no checkpoints (benchmarks, tests)
    # continue from a checkpoint found even without --resume: Ray's restart of a failed worker
    # group (its driver checked the run folder before the first start, `mtl.runs.prepare_run`)
    always_resume: bool = False
    # on Ray: ray.train.get_preemption_info (a collective: every rank polls at the same steps);
    # returns None, or the notice of a node about to be reclaimed
    preemption: Callable[[], Any] | None = None
    console: Any = None  # rich Console of rank 0 (None: the default console)
    cpus: int | None = None  # CPUs reserved for this process (sizes the loader); None = what it may run on
    # rank 0 logs to MLflow when MLFLOW_TRACKING_URI is set (`mtl.tracking`); False where the caller
    # logs the run itself (a sweep's trials: Ray Tune's MLflow callback)
    track_mlflow: bool = True
    # local mode: whether the process was asked to end (SIGTERM: jobs/train.py `sigterm_ends_the_run`);
    # the run then checkpoints the step it is at and ends with `Stopped` (one process: no collective)
    stop_requested: Callable[[], bool] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Stopped(KeyboardInterrupt):
    """The run ended on a termination signal (SIGTERM: a container's stop, a scheduler's
    preemption) after a checkpoint of the step it was at: ``--resume`` continues from ``tag``
    (None: the signal came before the first step, or while the run was ending)."""

    def __init__(self, tag: str | None) -> None:
        super().__init__(tag)
        self.tag = tag


class TrainingDiverged(ValueError):
    """The loss or the weights are no longer numbers: an outcome of the settings (a too high LR),
    which a restart from the last checkpoint would only repeat. ``epoch``, ``step``: where (the
    epoch's step; both counted from 1)."""

    def __init__(self, message: str, epoch: int = 0, step: int = 0) -> None:
        super().__init__(message)
        self.epoch, self.step = epoch, step


def check_resumable(state: dict[str, Any], cfg: ExperimentConfig, always_resume: bool = False) -> None:
    """A checkpoint may only continue the training it belongs to (fields listed otherwise), and
    only when asked to (``--resume``, or a `Runtime` that always resumes): never silently. Its
    data is where the run started (`TrainState.data_location`): the same relative --root given
    in another folder names other data. With ``--data-moved`` any place holding data of the same
    kind (folder or shards) is accepted; the split's size is still checked (`check_same_split`)."""
    if not (cfg.train.resume or always_resume):
        raise RunConflict(f"{state.get('url', 'a checkpoint')} exists: pass --resume to continue that run, or choose another "
                          f"--name/--out for a new run")
    train, url, stored = state["train_state"], state.get("url", "the checkpoint"), stored_config(state["config"])
    trained_on, here = train.get("data_location"), data_location(cfg.data)
    # (the place decides, not its spelling; --data-moved: any place, of the same kind of data)
    located = (trained_on is not None or cfg.train.data_moved) and here is not None and same_kind(stored.data, cfg.data)
    if located and not cfg.train.data_moved and not same_location(trained_on, here):
        flag, given = ("--shards", cfg.data.shards) if cfg.data.shards else ("--root", cfg.data.root)
        relative = " (a relative path given in another folder?)" if "://" not in given and not os.path.isabs(given) else ""
        raise RunConflict(f"resume refused: {url} was trained on {trained_on}, and {flag} {given} names {here} here{relative}: "
                          f"give the run's data, or add --data-moved if it was moved there")
    check_same_training(stored, cfg, f"checkpoint {url}", frozenset({"data.root", "data.shards"}) if located else frozenset())
    check_length(cfg.train.epochs, train.get("epoch", 0), train.get("epoch_step", 0) > 0, state.get("url", "the checkpoint"))


def check_same_split(state: dict[str, Any], num_train: int, source: str) -> None:
    """A checkpoint continues on the training split it was trained on: its LR plan's length is
    a number of steps per epoch of that split, and a step checkpoint's data position a place in
    that split's order. Grown, the plan would end early and the last steps train at LR 0."""
    stored = state["train_state"].get("train_samples")
    if stored is not None and stored != num_train:
        raise RunConflict(f"resume refused: the training split of {source} has {num_train} samples, but "
                          f"{state.get('url', 'the checkpoint')} was trained on {stored}: its LR plan and data order "
                          f"were made for those (put the split back as it was, or train a new run: another --name)")


def local_runtime(cfg: ExperimentConfig) -> Runtime:
    """One process, one device; the run folder ``<out>/<run name>/`` (local or s3://)."""
    return Runtime(device=resolve_device(cfg.train.device), storage=FolderStorage(run_url(cfg), cfg.train.keep_last))


@dataclass
class FitResult:
    metrics: list[dict[str, float]]  # one entry per validation (epoch)
    lrs: list[float]  # the LR used at every optimizer step of this call
    model: nn.Module
    best_score: float  # the best validation score (`mtl.multitask.selection_score`)
    input_size: list[int] | None = None  # (H, W) the model was trained for (see `Loaders.image_size`)


class Trainer:
    """One training run on one rank: data, model, strategy and LR plan built from the config,
    restored from the latest checkpoint when there is one, then epochs of train steps, each
    followed by validation (reduced across ranks) and a checkpoint.

    Its stateful parts — the strategy (model, optimizer), the `TrainState` (epoch, step, LR plan
    length, best score) and the RNGs — are handed to one `Checkpointer`; the LR plan is a
    function of the train state, the data order one of (seed, epoch)."""

    def __init__(self, cfg: ExperimentConfig, rt: Runtime) -> None:
        self.cfg = cfg = resolve_config(cfg)
        self.rt, t, self.device = rt, cfg.train, rt.device
        torch.manual_seed(t.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.data: Loaders = build_loaders(cfg, rt.rank, rt.world, pin_memory=self.device.type == "cuda", cpus=rt.cpus)
        self.crop_note, crop_error = self._crop_note()
        self.baselines, baselines_error = self._read_baselines()  # (task -> metrics: the run is judged by Δm)
        self.steps_per_epoch = self._steps_per_epoch()
        # the global batch now, and as planned (--num-workers ranks): an elastic run may have fewer
        self.global_batch = t.batch_size * t.grad_accum * rt.world
        self.planned_world = max(cfg.dist.num_workers, rt.world)
        self.planned_batch = t.batch_size * t.grad_accum * self.planned_world
        self.start: int | None = None  # the first epoch's data position (samples over all ranks): a folder source resumed inside it
        model, pretrained_error = build_encoder_weighted(cfg.model)
        model = model.to(self.device)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.strategy = rt.make_strategy(model, build_optimizer(model, cfg), cfg)
        self.codec, self.amp = DepthCodec(resolve(cfg.model).depth_space), autocast(self.device, t.bf16)
        self.weighting = self._weighting()
        self.log = RunLog(f"{run_url(cfg)}/train.log", rt.console, echo=True) if rt.is_main else RunLog(None, echo=False)
        self.state = TrainState(epochs=t.epochs, total_steps=t.epochs * self._planned_steps_per_epoch(), world=rt.world,
                                train_samples=self.data.num_train, data_location=data_location(cfg.data),
                                # (samples, epoch_samples, loader_workers: set by _restore)
                                input_size=list(self.data.image_size) if self.data.image_size else None)
        states = {"train_state": self.state, "rng": RNGState()}
        if self.weighting.stateful:  # (fixed weights have no state: checkpoints of earlier versions stay readable)
            states["task_weighting"] = self.weighting
        self.checkpointer = Checkpointer(rt.storage, run_url(cfg), self.strategy, states, rt.rank,
                                         on_written=self._written) if rt.storage else None
        self.schedule = self._restore()
        if pretrained_error is not None and not self.resumed:
            raise pretrained_error
        if crop_error is not None:  # (a run that started with it goes on, saying so)
            if not self.resumed:
                raise crop_error
            self.crop_note = f"{crop_error}; this run started with it and goes on so"
        self._keep_baselines(baselines_error)
        if rt.is_main:  # data found, checkpoint accepted: the run folder gets (or updates) its configuration
            RunFolder(run_url(cfg)).write_config(cfg)
        if t.compile:
            self.strategy.model = torch.compile(self.strategy.model)
        self.step = make_step(cfg, self.strategy, self.codec, self.amp, self.device, rt.world, self.log, self.weighting)
        # rank 0 of a run with a run folder: TensorBoard, curves.png, MLflow (`mtl.tracking`)
        self.tracker = self._tracker() if rt.is_main and rt.storage else None
        self.preempted = False  # a preemption notice was seen (and answered with a checkpoint)
        # validation's loader starts this many steps before the epoch ends: when the train loader
        # has handed out its last samples (it keeps prefetch x workers batches in flight) and its
        # workers fall idle, so validation's first batches are decoded by the time it begins
        self.val_lead = max(1, -(-cfg.data.prefetch * self.data.workers // t.grad_accum))
        self.val_ahead = None  # that started iterator
        self.last_checkpoint = monotonic()  # (or the start: --checkpoint-every-min counts from there)

    def _written(self, tag: str, seconds: float) -> None:
        """(The checkpointer's writer thread.) A background checkpoint is the latest now."""
        self.log(f"checkpoint {tag} written in the background ({seconds:.2f} s after it was taken)")

    def _weighting(self) -> TaskWeighting:
        """The task weighting on this device; a learned one learns from the losses averaged over
        ranks (`mtl.weighting`), so every rank holds the same weights."""
        weighting = build_weighting(self.cfg.optim).to(self.device)
        world, strategy = self.rt.world, self.strategy
        if world > 1:
            weighting.average = lambda t: strategy.all_reduce_sum(t) / world
        return weighting

    def _tracker(self) -> Any:
        from mtl.tracking import Tracker  # (its writer libraries load only for runs that keep a run folder)

        # (resumed where only the epoch's validation is left: an earlier attempt may have logged it
        # at this step already, `mtl.tracking`; the step's own values are logged again, `train_epoch`)
        purge_from = self.state.step if self._validation_left() else None
        return Tracker(run_url(self.cfg), run_name(self.cfg), self.cfg.to_dict(), start_step=self.state.step,
                       purge_from=purge_from, mlflow=self.rt.track_mlflow, log=self.log)

    @property
    def resumed(self) -> bool:
        """A checkpoint was restored (`_restore` counts it in ``restarts``)."""
        return self.state.restarts > 0

    def _validation_left(self) -> bool:
        """Resumed from a step checkpoint with no step of its epoch left to train."""
        return 0 < self.steps_per_epoch <= self.state.epoch_step

    def _planned_steps_per_epoch(self) -> int:
        """Optimizer steps per epoch with the planned --num-workers ranks (the LR plan's unit)."""
        if self.planned_world == self.rt.world:
            return self.steps_per_epoch
        t, train = self.cfg.train, self.data.train
        if isinstance(train, FolderLoader):
            steps = -(-self.data.num_train // self.planned_world) // t.batch_size // t.grad_accum
        else:  # (shards: each rank's loader workers drop what fills no batch of theirs, and ranks stop at the fewest)
            steps = train.len_at(self.planned_world) // t.grad_accum
        return max(1, min(steps, t.max_steps_per_epoch or steps))

    def steps_left(self) -> int:
        """The run's optimizer steps still to take at this world size (the ETA's): an elastic run
        with fewer ranks than planned takes more than the plan's (``total_steps``) steps."""
        return (self.cfg.train.epochs - self.state.epoch) * self.steps_per_epoch - self.state.epoch_step

    def lr_step(self) -> float:
        """Where the LR plan stands: samples trained on, in planned global batches. With the
        planned number of ranks that is the optimizer step; an elastic run with fewer ranks takes
        smaller steps (the per-rank batch stays) and moves along the plan by the samples seen."""
        return self.state.samples / self.planned_batch

    def _steps_per_epoch(self) -> int:
        t = self.cfg.train
        steps = len(self.data.train) // t.grad_accum
        if t.max_steps_per_epoch:
            steps = min(steps, t.max_steps_per_epoch)
        if steps < 1:
            raise ValueError(f"the train split ({self.data.num_train} samples over {self.rt.world} ranks) is smaller than one "
                             f"batch ({t.batch_size} x {t.grad_accum} accumulation) per rank")
        return steps

    def _restore(self) -> PolyLR:
        """Continue from the latest checkpoint, if any; the LR plan is a function of the step."""
        o, s = self.cfg.optim, self.state
        planned = s.total_steps

        def check(state: dict[str, Any]) -> None:
            check_resumable(state, self.cfg, self.rt.always_resume)
            check_same_split(state, self.data.num_train, self.data.source)

        loaded = self.checkpointer.restore(check) if self.checkpointer else None
        if loaded is None:
            s.samples, s.epoch_samples, s.loader_workers = 0, 0, self._order_workers()
            return PolyLR(o.lr, s.total_steps, o.poly_power, o.warmup_steps)
        s.restarts += 1
        self._record_data(s)
        if s.epochs != self.cfg.train.epochs:  # --resume --epochs N: the plan is recomputed for the new length
            s.epochs, s.total_steps = self.cfg.train.epochs, planned
        # else the same plan, perhaps with other steps per epoch now (shards dealt to another
        # number of loader workers): the stored length keeps the LR curve continuous
        schedule = PolyLR(o.lr, s.total_steps, o.poly_power, o.warmup_steps)
        if s.samples is None:  # a checkpoint of an earlier version: always the planned ranks
            per_rank_step = self.cfg.train.batch_size * self.cfg.train.grad_accum
            s.samples, s.epoch_samples = s.step * self.planned_batch, s.epoch_step * per_rank_step * s.world
        if loaded["skipped"]:
            gone = loaded["skipped"]
            self.log(f"checkpoint {', '.join(gone)} of {run_url(self.cfg)}/checkpoints/latest.json {'is' if len(gone) == 1 else 'are'}"
                     f" gone: the resume goes on from the newest whole one it lists")
        inside = f" ({s.epoch_step} steps into epoch {s.epoch + 1})" if s.epoch_step else ""
        self.log(f"resumed from {loaded['url']}: epoch {s.epoch}, step {s.step}/{s.total_steps}{inside}, "
                 f"next LR {schedule(self.lr_step()):.3g}")
        self._continue_inside_epoch()
        return schedule

    def _record_data(self, s: TrainState) -> None:
        """The data this attempt trains on becomes the checkpoints' record (`check_resumable`
        accepted it: the same place, or --data-moved; checkpoints of earlier versions had none)."""
        here = data_location(self.cfg.data)
        if self.cfg.train.data_moved and s.data_location != here:
            self.log(f"--data-moved: the run goes on with its data at {here}" + (f" (it trained on {s.data_location})"
                                                                                 if s.data_location else ""))
        s.data_location, s.train_samples = here, self.data.num_train

    def _crop_note(self) -> tuple[str | None, ValueError | None]:
        """`crop_note`'s line, or its refusal of a crop no zoom fills (for new runs only)."""
        try:
            return crop_note(self.cfg.data, self.data.image_size), None
        except ValueError as e:
            return None, e

    def _read_baselines(self) -> tuple[dict[str, dict[str, float]] | None, Exception | None]:
        """--baselines' best metrics, read from their run folders (checked to be validated on this
        run's data) before anything is written; what failed, when a resume may not need them."""
        t = self.cfg.train
        if not t.baselines:
            return None, None
        try:
            return load_baselines(t.baselines, self.cfg.data), None
        except (ValueError, OSError) as e:
            if not (t.resume or self.rt.always_resume):
                raise
            return None, e

    def _keep_baselines(self, error: Exception | None) -> None:
        """A resumed run is judged by the Δm baselines' values it started with (its checkpoint
        holds them): its best score so far was computed against them. Their folders were read
        again only to say that they changed since: one that cannot be read any more (moved, its
        bucket's access gone) does not stop the resume; without a checkpoint, it does (``error``)."""
        s, now = self.state, self.baselines
        if s.baselines is None:  # a new run (or a checkpoint of an earlier version)
            if error is not None:
                raise error
            s.baselines = now
            return
        self.baselines = s.baselines
        if error is not None:
            self.log(f"the Δm baselines cannot be used again ({one_line(error)}): the run goes on judged by the values its "
                     f"checkpoint holds")
        elif now is not None and now != s.baselines:
            changed = sorted(task for task in now if now[task] != s.baselines.get(task))
            self.log(f"the Δm baselines' best epochs changed since this run started ({', '.join(changed)}): it goes on judged "
                     f"by the values it started with, against which its best score so far was computed")

    def _order_workers(self) -> int:
        """The loader workers a shard stream's order depends on: those its training loader runs
        (fewer than asked with few samples per rank: `mtl.data.shards.ShardSplit.training_workers`)."""
        return self.data.workers if isinstance(self.data.train, FolderLoader) else self.data.train.workers

    def _continue_inside_epoch(self) -> None:
        """A checkpoint from inside an epoch continues it at the same data position: a folder
        source from the samples of the epoch's order consumed over all ranks (`epoch_samples`,
        `mtl.data.loader.EpochSampler`), which stays exact when ranks of several sizes trained the
        epoch so far (an elastic run: its ``epoch_step`` then counts steps of the last size, not
        the position). Written by another number of ranks, whose shares of the epoch differ, the
        steps left are counted anew (none, when more ranks share what was left: the epoch only
        validates); a shard stream, whose order depends on the ranks and on their loader workers,
        goes on after the same number of samples when either changed, which some ranks may have
        seen and some not (logged)."""
        s, world, workers = self.state, self.rt.world, self._order_workers()
        folder = isinstance(self.data.train, FolderLoader)
        if s.epoch_step and folder:  # (after an elastic stretch, epoch_step counts steps of another size than the position's)
            self.start = s.epoch_samples
        # a shard stream's order is also a function of the loader workers (automatic: the CPUs there)
        # (0 workers read a shard stream as 1 does: the training process is that one worker)
        other_stream = not folder and s.loader_workers is not None and max(s.loader_workers, 1) != max(workers, 1)
        if s.epoch_step and (s.world != world or other_stream):
            t = self.cfg.train
            if folder:
                remaining = max(0, self.data.num_train - s.epoch_samples)
                left = -(-remaining // world) // t.batch_size // t.grad_accum
                if t.max_steps_per_epoch:  # (a capped epoch: done at its cap, else its cap's samples at the new size)
                    cap = t.max_steps_per_epoch
                    left = 0 if s.epoch_step >= cap else min(left, max(0, cap * self.global_batch - s.epoch_samples)
                                                              // self.global_batch)
                left = min(left, self.steps_per_epoch)
                steps = self.steps_per_epoch - left
                note = (f"goes on from sample {s.epoch_samples} of the epoch's order with {left} steps per rank left"
                        + _left_out(remaining - left * self.global_batch, world))
            else:
                steps = min(s.epoch_samples // self.global_batch, self.steps_per_epoch)
                note = (f"goes on after {steps} steps per rank (about the same number of samples in all); a shard stream's "
                        f"order depends on the ranks and their loader workers, so samples of this epoch may be seen twice "
                        f"or skipped")
            by = f"{s.world} ranks" + (f" with {s.loader_workers} loader workers each" if other_stream else "")
            has = f"{world}" + (f" with {workers} (--workers fixes the number)" if other_stream else "")
            self.log(f"the checkpoint was written {s.epoch_step} steps into epoch {s.epoch + 1} by {by} and this run has "
                     f"{has}: the epoch {note}")
            if s.epoch_loss:  # the loss sums of the steps counted as done
                s.epoch_loss = [v * steps / s.epoch_step for v in s.epoch_loss] if steps else None
            s.epoch_step = steps
        s.epoch_step = min(s.epoch_step, self.steps_per_epoch)
        s.world, s.loader_workers = world, workers

    def announce(self) -> None:
        cfg, rt, d, t = self.cfg, self.rt, self.data, self.cfg.train
        n_params = sum(p.numel() for p in self.strategy.module.parameters())
        self.log(f"[bold]{run_name(cfg)}[/] on {self.device} x{rt.world}: {n_params:,} params, {d.num_train} train / "
                 f"{d.num_val} val samples from {d.source} ({d.workers} loader worker{'s' if d.workers != 1 else ''}"
                 f"{', from a fork server' if d.workers and data_loader.from_fork_server() else ''}), "
                 f"global batch {t.batch_size * t.grad_accum * rt.world}, {self.steps_per_epoch} steps/epoch, "
                 f"LR {cfg.optim.lr:g} (poly {cfg.optim.poly_power}); run folder {run_url(cfg)}")
        for note in [*coverage_notes(d, self.steps_per_epoch, self.global_batch, capped=bool(t.max_steps_per_epoch)), self.crop_note]:
            if note:
                self.log(note)
        pretrained = describe_pretrained(self.strategy.module)
        if pretrained and not self.resumed:  # (a resume's weights are its checkpoint's: "resumed from")
            self.log(pretrained)
        if self.baselines:
            self.log(f"judged by Δm against {' and '.join(t.baselines)}: best.pt is the epoch with the lowest Δm")

    def fit(self, on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> FitResult:
        t = self.cfg.train
        history, lrs, s_ = [], [], self.state
        failed = False
        try:  # (from the start: a loader that cannot start still ends the tracker's run as failed, and the log)
            if self.rt.is_main:
                self.announce()
            if self.rt.stop_requested and self.rt.stop_requested():  # (asked during the setup: nothing trained, nothing to keep)
                raise Stopped(None)
            it = self._batches(s_.epoch, s_.epoch_step, self.start) if s_.epoch < t.epochs else None
            with TrainProgress(self.log, enabled=self.rt.is_main, interval_s=t.log_interval_s, tasks=self.cfg.optim.tasks) as bar:
                while s_.epoch < t.epochs:
                    epoch_lrs = list(s_.epoch_lrs or []) if s_.epoch_step else []  # (resumed inside it: the steps before)
                    before = len(epoch_lrs)
                    loss, ips = self.train_epoch(it, bar, epoch_lrs)
                    lrs.extend(epoch_lrs[before:])  # (this attempt's)
                    s_.epoch, s_.epoch_step, s_.epoch_loss, s_.epoch_samples, s_.epoch_lrs = s_.epoch + 1, 0, None, 0, None
                    # the next epoch's loader workers start (and fill their prefetch queues) during
                    # validation and checkpointing instead of stalling its first step
                    it = self._batches(s_.epoch) if s_.epoch < t.epochs else None
                    metrics = self.end_epoch(loss, ips, epoch_lrs, bar)
                    history.append(metrics)
                    if on_epoch_end:
                        on_epoch_end(s_.epoch, metrics)
                    if s_.epoch < t.epochs and self._stop_due():  # (during validation: its epoch checkpoint is the last,
                        self.checkpointer.wait()  # committed before the run says so: its write's failure is raised instead)
                        raise Stopped(epoch_tag(s_.epoch))
            classes = class_iou_table(history[-1], f"IoU per class after epoch {s_.epoch}") if history else None
            if classes and self.rt.is_main:
                self.log(classes)
        except BaseException as e:
            failed = True
            with contextlib.suppress(Exception):  # (train.log only: the caller shows the error; a log that cannot
                self.log.record(_why_it_ended(e))  # be written, the run folder gone or the disk full, must not replace it)
            raise
        finally:
            self._end(failed)
        return FitResult(history, lrs, self.strategy.module, self.state.best, self.state.input_size)

    def _end(self, failed: bool) -> None:
        """The run's end, whether it failed or not: the checkpoint in flight, the loaders' workers,
        the tracker, then train.log, each told whether the run or a part before it failed (then a
        part shows its own error instead of raising it: the first error is the one raised)."""
        first: BaseException | None = None
        for part in (self._finish_checkpoint, self._close_loaders, self._close_tracker, self._flush_log):
            shown = failed or first is not None
            try:
                part(shown)
            except BaseException as e:  # noqa: BLE001 - raised below, after the other parts
                if shown:  # (a part told so shows its errors; this one is not of those)
                    self.log(f"and at the run's end {part.__name__.strip('_')} failed: {type(e).__name__}: {escape(str(e))}")
                first = first or e
        if first is not None and not failed:
            raise first

    def _close_loaders(self, failed: bool) -> None:
        """End the loaders' worker processes now (`mtl.data.loader.StartedIterators`): a process
        that runs more trainings (a sweep's, a notebook's) keeps none idle, and no later garbage
        collection waits on them."""
        self.val_ahead = None
        self.data.close()

    def _close_tracker(self, failed: bool) -> None:
        if self.tracker:  # (a crashed attempt's MLflow run ends FAILED; so does one whose last write failed)
            self.tracker.close(failed=failed)

    def _flush_log(self, failed: bool) -> None:
        """train.log's last write (an object store's). Its error is raised, or, when the run
        already fails, shown: the run's own error is the one its caller must see."""
        try:
            self.log.flush()
        except Exception as e:  # noqa: BLE001 - any write error
            if not failed:
                raise
            self.log(f"train.log could not be written to {escape(str(self.log.url))} either: {type(e).__name__}: "
                     f"{escape(str(e))}")

    def _finish_checkpoint(self, failed: bool) -> None:
        """The run ends: a background checkpoint still being written is waited for (after a
        failure too: it is the newest state a resume can continue from). Its own error is
        raised, or, when the run already fails with another, logged. Interrupted (a second
        Ctrl-C or SIGTERM), the write is given up: it commits nothing, and the driver's lease is
        released only once it has stopped writing."""
        if not self.checkpointer:
            return
        try:
            self.checkpointer.wait()
        except Exception as e:  # noqa: BLE001 - any write error
            if not failed:
                raise
            self.log(f"the background checkpoint being written failed too: {type(e).__name__}: {escape(str(e))}")
        except KeyboardInterrupt:
            self._abandon_checkpoint()
            if not failed:
                raise

    def _abandon_checkpoint(self) -> None:
        """Interrupted while waiting for the background checkpoint: it is given up, and said; one
        still uploading (one file, uncommitted) is waited for, since the lease is released next;
        interrupted again (here too), the process ends at once, its lease left to expire."""
        try:
            outcome = self.checkpointer.abandon()
            if outcome is None:
                return
            tag, became = outcome
            if became == "committed":
                self.log(f"checkpoint {tag} was committed before it could be abandoned: --resume goes on from it")
                return
            self.log(f"checkpoint {tag}, being written, was abandoned: --resume goes on from the one before it")
            if became == "uploading":
                self.log("its upload ends first, uncommitted (interrupt again to end this process now, leaving its lease to expire)")
                with contextlib.suppress(Exception):
                    self.checkpointer.wait()
        except KeyboardInterrupt:
            os._exit(130)

    def _batches(self, epoch: int, skip_steps: int = 0, start: int | None = None) -> DeviceBatches:
        """Epoch ``epoch``'s model batches, from optimizer step ``skip_steps`` of it on (or from
        sample ``start`` of its order over all ranks)."""
        return start_epoch(self.data.train, epoch, self.device, self.cfg.train.channels_last, skip_steps * self.cfg.train.grad_accum,
                           start)

    def train_epoch(self, it: DeviceBatches, bar: TrainProgress, lrs: list[float]) -> tuple[list[float], float]:
        """The epoch's optimizer steps (those after ``epoch_step``, when resumed inside it), each
        step's LR appended to ``lrs`` (the epoch's, its steps before a resume included);
        returns the mean losses [total, semseg, depth] over the whole epoch and all ranks, and img/s. Losses
        stay on the device: the host reads them every ``log_every`` steps, or sooner when
        ``log_interval_s`` has passed (the time check itself reads nothing), and at step
        checkpoints (``--checkpoint-every``)."""
        t, s_, strategy = self.cfg.train, self.state, self.strategy
        strategy.model.train()
        bar.start_epoch(s_.epoch, t.epochs, self.steps_per_epoch, self.steps_left(), s_.epoch_step)
        running = torch.tensor(s_.epoch_loss or [0.0] * 3, device=self.device)
        t0 = last_read = time.perf_counter()
        n_img, loss, done = 0, [float("nan")] * 3, s_.epoch_step
        for s in range(s_.epoch_step, self.steps_per_epoch):
            if self.val_ahead is None and s >= self.steps_per_epoch - self.val_lead:
                self.val_ahead = iter(self.data.val)
            lrs.append(self.schedule.apply(strategy.optimizer, self.lr_step()))
            for k in range(t.grad_accum):
                batch = next(it)
                parts = self.step(batch, k == t.grad_accum - 1)
                running += torch.stack([parts["loss"], parts["loss_semseg"], parts["loss_depth"]]) / t.grad_accum
                n_img += batch["rgb"].shape[0]
            s_.step, s_.epoch_step = s_.step + 1, s + 1
            s_.samples, s_.epoch_samples = s_.samples + self.global_batch, s_.epoch_samples + self.global_batch
            now = time.perf_counter()
            every_rank = (s + 1) % t.log_every == 0 or s + 1 == self.steps_per_epoch  # (the others: this rank's clock)
            if every_rank or now - last_read >= t.log_interval_s > 0:
                # a host sync (besides: step checkpoints, preemption polls); at the steps every rank
                # reads, the ranks' mean (one small all-reduce): the epoch's loss is the run's
                sums = self.strategy.all_reduce_sum(running) / self.rt.world if every_rank else running
                read = torch.cat([sums / (s + 1), self.weighting.weights().to(running)]).tolist()
                loss, weights, last_read, ips = read[:3], read[3:], now, n_img * self.rt.world / (now - t0)
                # every later step would train on NaN weights and report success; the ranks stop
                # together (at the steps all of them read, on the mean any rank's NaN makes NaN)
                if not math.isfinite(loss[0]) and (every_rank or self.rt.world == 1):
                    raise self._diverged(f"the loss is {loss[0]}", lrs[-1], s + 1, s_.epoch + 1)
                bar.update(s + 1, loss, ips, lrs[-1])
                if every_rank or self.rt.world == 1:  # (the curves hold one quantity: the ranks' mean, not rank 0's own)
                    self._track_step(loss, weights, ips, lrs[-1])
            if self._stop_due():  # (SIGTERM: this step's checkpoint, in the foreground, then the run ends)
                self._save_inside_epoch(running, lrs)
                raise Stopped(epoch_tag(s_.epoch, s_.step))
            if self._checkpoint_due(s):  # (after the readout: the checkpoint stores this step's points too)
                self._save_inside_epoch(running, lrs)
        if s_.input_size is None and n_img:  # validation images of varying size: the training crops'
            s_.input_size = list(batch["rgb"].shape[-2:])
        if not n_img and done:  # resumed at the epoch's end (more ranks share what was left): the stored sums
            loss = (running / done).tolist()
            self._track_step(loss, self.weighting.weights().tolist(), float("nan"), nan_if_none(s_.lr))
        return loss, n_img * self.rt.world / (time.perf_counter() - t0) if n_img else float("nan")  # (none: not measured)

    @staticmethod
    def _diverged(what: str, lr: float, step: int, epoch: int) -> "TrainingDiverged":
        """``step`` of ``epoch`` (both counted from 1)."""
        return TrainingDiverged(f"training diverged: {what} by step {step} of epoch {epoch} (LR {lr:.3g}): lower --lr, or clip "
                                f"with --grad-clip", epoch, step)

    def _check_finite_weights(self, lr: float, step: int, epoch: int) -> None:
        """Before a checkpoint: weights that are no longer numbers (an update from an infinite
        gradient, whose step's loss was still finite) must not become the run's latest
        checkpoint, which every restart would resume. The same weights on every rank: all stop."""
        norm = torch.nn.utils.get_total_norm([p.detach() for p in self.strategy.module.parameters()])
        if not torch.isfinite(norm):  # (a host sync: at checkpoints only)
            raise self._diverged("the weights are no longer numbers", lr, step, epoch)

    def _track_step(self, loss: list[float], weights: list[float], ips: float, lr: float) -> None:
        if self.tracker:
            values = {"train/loss": loss[0], **{f"train/loss_{k}": v for k, v in zip(TASKS, loss[1:]) if k in self.cfg.optim.tasks},
                      "train/lr": lr, "train/images_per_s": ips, **self._weight_values(weights)}
            self.tracker.step(self.state.step, values)

    def _weight_values(self, weights: list[float]) -> dict[str, float]:
        """``weights/<task>`` of a two-task run; none for one task (its weight is 1, the other
        task's 0: a column and a curve of nothing)."""
        return {f"weights/{k}": w for k, w in zip(TASKS, weights)} if len(self.cfg.optim.tasks) > 1 else {}

    def _checkpoint_due(self, s: int) -> bool:
        """A step checkpoint after step ``s`` of the epoch: every ``--checkpoint-every`` steps,
        and, once a poll (every ``--preemption-poll-every`` steps, on Ray) has brought a
        preemption notice, after every step until the node goes: the teardown then costs at most
        the step it interrupts. At an epoch's last step too, though the epoch's checkpoint
        follows: it follows the validation, which a failure or a notice may interrupt (a resume
        from the step checkpoint then validates the epoch, training none of it again). Every rank
        decides alike (same steps; rank 0's notice)."""
        t, s_ = self.cfg.train, self.state
        if not self.checkpointer:
            return False
        preempted = self._poll_preemption()  # (at an epoch's last step too: else a poll interval that the steps per epoch divide never polls)
        return bool(t.checkpoint_every) and s_.step % t.checkpoint_every == 0 or self._checkpoint_time_due(s) or preempted

    def _stop_due(self) -> bool:
        """Whether the process was asked to end (`Runtime.stop_requested`); said once, and from
        then on checkpoints are written in the foreground and commit without the tracker, as
        after a preemption notice (`_checkpoint`)."""
        if not (self.checkpointer and self.rt.stop_requested and self.rt.stop_requested()):
            return False
        if not self.preempted:
            self.preempted = True
            self.log(f"termination signal (SIGTERM) at step {self.state.step}: a checkpoint of this step, then the run ends")
        return True

    def _poll_preemption(self) -> bool:
        """Whether a notice says this run's nodes are being reclaimed: asked at every
        ``--preemption-poll-every``-th step (on Ray) until the first notice, which holds from
        then on."""
        t, s_ = self.cfg.train, self.state
        if self.preempted or not (self.rt.preemption and t.preemption_poll_every and s_.step % t.preemption_poll_every == 0):
            return self.preempted
        notice = self.rt.preemption()
        self.preempted = notice is not None
        if notice is not None:
            left = f", {notice.deadline_ms / 1e3 - time.time():.0f} s left" if getattr(notice, "deadline_ms", None) else ""
            self.log(f"preemption notice at step {s_.step} (nodes {getattr(notice, 'preempted_node_ids', '?')}{left}): "
                     f"a checkpoint now and after every step until the node goes")
        return self.preempted

    def _checkpoint_time_due(self, s: int) -> bool:
        """``--checkpoint-every-min`` has passed since the last checkpoint. Ranks' clocks differ,
        so several ranks decide together (rank 0's clock, one all-reduce) and only at the steps
        where the loss is read anyway (every ``--log-every``): a step checkpoint is collective."""
        t = self.cfg.train
        if not t.checkpoint_every_min:
            return False
        if self.rt.world > 1 and (s + 1) % t.log_every:
            return False
        due = monotonic() - self.last_checkpoint >= 60.0 * t.checkpoint_every_min
        if self.rt.world > 1:
            flag = torch.tensor([float(due and self.rt.is_main)], device=self.device)
            due = float(self.strategy.all_reduce_sum(flag)[0]) > 0  # (a host sync, every --log-every steps)
        return due

    def _save_inside_epoch(self, running: torch.Tensor, epoch_lrs: list[float]) -> None:
        """A step checkpoint (``--checkpoint-every``): the train state holds the data position,
        the epoch's loss sums and LRs; no validation, no metrics file. Its tag sorts between the
        epoch checkpoints around it."""
        s_, lr = self.state, epoch_lrs[-1]
        s_.epoch_lrs = list(epoch_lrs)
        # the ranks' mean: only rank 0's state.pt is kept and every rank restores it, so each adds
        # its own later steps to the same share of the earlier ones (DWA's epoch means stay exact)
        s_.epoch_loss = (self.strategy.all_reduce_sum(running) / self.rt.world).tolist()  # (a host sync: only here)
        s_.lr = lr
        mean = [v / s_.epoch_step for v in s_.epoch_loss]
        if not math.isfinite(mean[0]):  # (the ranks' sum: every rank sees it)
            raise self._diverged(f"the loss is {mean[0]}", lr, s_.epoch_step, s_.epoch + 1)
        self._check_finite_weights(lr, s_.epoch_step, s_.epoch + 1)
        tag = epoch_tag(s_.epoch, s_.step)
        metrics = {"epoch": s_.epoch, "step": s_.step, "epoch_step": s_.epoch_step, "lr": lr, "train_loss": mean[0],
                   "train_loss_semseg": mean[1], "train_loss_depth": mean[2], "restarts": s_.restarts}
        stored = None  # the tracker's points up to this step: a resume from here logs only later ones
        try:
            stored = self.tracker.sync() if self.tracker else None
        finally:  # (a tracking failure still leaves the checkpoint)
            self._checkpoint("step", tag, metrics, is_best=False, metrics_file=False, after=stored)

    def _checkpoint(self, kind: str, tag: str, metrics: dict[str, Any], is_best: bool, metrics_file: bool = True,
                    after: Future | None = None) -> None:
        """Every rank: checkpoint ``tag`` (a ``kind`` one: step or epoch), committed once
        ``after`` (the tracker's points up to it stored) is done, and log what it cost
        training. In the background (``--checkpoint-background``; `Checkpointer.save`) unless a
        preemption notice came (the node goes soon, and this checkpoint must be whole before the
        next one's begins: a teardown costs one step) or the run ends with it (no training left
        to overlap it with); a sharded strategy's (DeepSpeed) always in the foreground."""
        t = self.cfg.train
        last = self.state.epoch >= t.epochs  # (an epoch checkpoint of the run's last epoch)
        background = t.checkpoint_background and not self.preempted and not last
        t0 = time.perf_counter()
        # (after a preemption notice the commit waits for no tracking server: the node may be gone
        # first; a point it had not stored then is missing from the curves, no step is lost)
        try:
            background = self.checkpointer.save(tag, self.cfg.to_dict(), metrics, is_best, metrics_file=metrics_file,
                                                background=background, after=None if self.preempted else after)
        finally:  # (said also when this save fails in its turn: the run stops with both in train.log)
            if self.checkpointer.replaced:  # (a failed background write: this one is taken in its place)
                self.log(self.checkpointer.replaced + (f": {kind} checkpoint {tag} is written in its place (another failure "
                                                       f"in a row stops the run)" if self.checkpointer.replacing else ""))
        self.last_checkpoint = monotonic()
        how = "; written in the background" if background else "; the run's last" if last else ""
        waited = self.checkpointer.waited_s
        if waited >= 0.1:  # (the write before was not done: checkpoints are due faster than they are written)
            how += (f"; {waited:.2f} s of it waiting for the previous one's write" +
                    (": a larger --checkpoint-every (or --checkpoint-every-min) lets training run on" if kind == "step" else ""))
        self.log(f"{kind} checkpoint {tag} ({time.perf_counter() - t0:.2f} s of training stalled{how})")

    def end_epoch(self, loss: list[float], ips: float, epoch_lrs: list[float], bar: TrainProgress) -> dict[str, Any]:
        """Validation (the bare module: a DDP wrapper would sync buffers per forward, and ranks
        may hold unequal shares of the validation split), the task weighting's epoch update, the
        metrics table, the checkpoint, the tracker."""
        s_, t = self.state, self.cfg.train
        pictures: list[np.ndarray] | None = [] if self.tracker else None
        val, self.val_ahead = self.data.val if self.val_ahead is None else self.val_ahead, None
        self.strategy.sync_buffers()  # (one model on every rank: validation's and the checkpoint's)
        t0 = time.perf_counter()
        metrics = rt_evaluate(self.strategy, val, self.codec, self.device, self.amp, t.channels_last, pictures,
                              self.cfg.optim.tasks)
        val_s = time.perf_counter() - t0  # (to the metrics' host read: the GPU's work included)
        # (``loss``: the epoch's mean over all ranks, read at its last step, `train_epoch`)
        if self.weighting.epochwise and all(math.isfinite(v) for v in loss[1:]):  # DWA (none read: no update)
            self.weighting.end_epoch(loss[1:])
        # (no step left after a resume: the last step's, as its checkpoint stored it)
        lr = epoch_lrs[-1] if epoch_lrs else nan_if_none(s_.lr)
        metrics.update({"epoch": s_.epoch, "step": s_.step, "lr": lr, "train_loss": loss[0],
                        "train_loss_semseg": loss[1], "train_loss_depth": loss[2], "train_images_per_s": ips, "val_s": val_s,
                        "restarts": s_.restarts, "epoch_lrs": epoch_lrs, "world": self.rt.world, "samples": s_.samples,
                        **self._weight_values(self.weighting.weights().tolist())})
        metrics = task_metrics(metrics, self.cfg.optim.tasks, self.baselines)
        is_best = metrics["score"] > s_.best
        s_.best = max(s_.best, metrics["score"])
        bar.metrics_table(metrics)
        # the tracker first (its thread stores the epoch while training goes on, and the checkpoint's
        # commit waits for that): a run that dies before the commit resumes from an earlier one and logs the epoch again
        stored = None
        try:
            if self.tracker:
                stored = self.tracker.epoch(s_.epoch, s_.step, metrics, {f"val/{i}": p for i, p in enumerate(pictures or [])},
                                            last=s_.epoch == t.epochs)
        finally:  # (a tracking failure still leaves the checkpoint)
            if self.checkpointer:
                self._check_finite_weights(lr, self.steps_per_epoch, s_.epoch)  # (the epoch that ended: s_.epoch counts it)
                self._checkpoint("epoch", epoch_tag(s_.epoch), metrics, is_best, after=stored)
        self.log.flush(wait=False)  # (the run's end waits for it)
        return metrics


def nan_if_none(v: float | None) -> float:
    return float("nan") if v is None else v


def _left_out(out: int, world: int) -> str:
    """What a resume on ``world`` ranks does with the ``out`` samples of the epoch's order that
    its steps left do not take (fewer than a step of the ranks, or past the cap; below 0: the
    ranks' shares were padded from the order's start)."""
    if out > 0:
        return (f": no sample twice; its last {out} samples, fewer than a step of {world} ranks or past "
                f"--max-steps-per-epoch, are left out")
    if out < 0:
        return (f"; its last step takes {-out} samples from the start of the order again, as an epoch whose samples the "
                f"ranks do not share evenly does")
    return ": no sample twice, none left out"


def _why_it_ended(e: BaseException) -> str:
    """train.log's last line of a run that did not finish (escaped: it is printed as markup)."""
    if isinstance(e, Stopped):
        return (f"stopped by a termination signal (SIGTERM) after checkpoint {e.tag}" if e.tag else
                "stopped by a termination signal (SIGTERM)") + "; the same command with --resume continues from the latest checkpoint"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C or SIGINT); the same command with --resume continues from the latest checkpoint"
    return escape(f"the run failed: {type(e).__name__}: {one_line(e)}")


def fit(cfg: ExperimentConfig, rt: Runtime, on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> FitResult:
    """Train ``cfg`` on this rank (see `Trainer`)."""
    return Trainer(cfg, rt).fit(on_epoch_end)


def start_epoch(loader, epoch: int, device: torch.device, channels_last: bool, skip_batches: int = 0,
                start: int | None = None) -> DeviceBatches:
    """The epoch's model batches (from batch ``skip_batches`` on, or from sample ``start`` of the
    epoch's order over all ranks: a folder source only); the loader's workers start now, the
    first batch is fetched on the first ``next()``."""
    if start is not None:
        loader.set_epoch(epoch, start=start)
    else:
        loader.set_epoch(epoch, skip_batches)
    return DeviceBatches(iter(loader), device, channels_last)


def rt_evaluate(strategy: Strategy, loader, codec: DepthCodec, device: torch.device, amp, channels_last: bool,
                pictures: list[np.ndarray] | None = None, tasks: Sequence[str] = TASKS) -> dict[str, float]:
    """The metrics of a split whose shares the ranks hold, summed over ranks (`Strategy.all_reduce_sum`);
    ``pictures`` (a list): this rank's first predictions of ``tasks`` drawn into it (`evaluate`)."""
    m = evaluate(strategy.module, loader, codec, device, amp, channels_last, pictures=pictures, tasks=tasks)
    m.state = strategy.all_reduce_sum(m.state)
    return m.compute()
