"""One typed configuration tree, from the CLI through Ray to the train loop.

`ExperimentConfig` is a frozen dataclass tree. Resolved (`mtl.runs.resolve_config`), it is
printed at start, saved as ``config.json`` in the run folder and inside every checkpoint, and
rebuilt from JSON (`from_dict`) on resume or in a Ray worker.

Fields made with `operational` say where and how a run executes (loader processes, output
folder, logging, Ray resources) rather than what it trains: they are left out of the run's
identity (`mtl.runs.identity`), so they may differ between a run and its resume.

The command lines are made from these classes (`mtl.cli`): every leaf field is a flag of the
same name (``batch_size`` -> ``--batch-size``), its comment is the flag's help (write it for
the user), a Literal type lists the choices, and `validate` is the one place that checks values
(its messages name the flags).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from mtl.zoo_names import Arch, Context, Decoder, Encoder

# (height, width) of images. On every command line an HxW value (``--crop 224x448``): `mtl.cli`
# reads every ``tuple[int, int]`` field with `parse_size`.
Size = tuple[int, int]
Device = Literal["auto", "cpu", "cuda"]  # auto: CUDA when there is a GPU, else the CPU
Optimizer = Literal["adam", "sgd"]
WeightDecayStyle = Literal["l2", "decoupled"]
Task = Literal["semseg", "depth"]
TaskWeighting = Literal["fixed", "uncertainty", "dwa", "famo"]  # `mtl.weighting`
DeepSupervision = Literal["mean", "sum"]  # `mtl.losses.task_losses`


def operational(default: Any = None, **kw: Any) -> Any:
    """A field that does not change what is trained (see the module docstring)."""
    return field(default=default, metadata={"operational": True}, **kw)


class _Part:
    """A part of the config. `validate` checks that every Literal-typed field holds one of its
    values (`check_choices`: a config read from a file is not type-checked otherwise), then the
    part's own rules (`_rules`); messages name the flags."""

    def validate(self) -> None:
        check_choices(self)
        self._rules()

    def _rules(self) -> None:
        pass

    def _at_least(self, low: float, *names: str, note: str = "") -> None:
        """ValueError naming the first of the fields ``names`` that is below ``low``, and its value."""
        for name in names:
            value = getattr(self, name)
            if not value >= low:  # (NaN too)
                raise ValueError(f"{flag(name)} must be >= {low:g}{note}, got {value:g}")


def check_folder_name(name: str | None, flag: str, why: str) -> None:
    """A name that becomes one folder of a run's paths (None: not given)."""
    if name is None:
        return
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{flag} {name!r} must be a folder name (no '/', not '.' or '..'): {why}")
    from mtl.storage import check_literal  # (here: the core's modules import no fsspec, `tests/test_structure.py`)

    check_literal(name, flag)


@dataclass(frozen=True)
class DataConfig(_Part):
    root: str | None = None  # Miniscapes folder (path or fsspec URL); default: the cached synthetic set
    shards: str | None = None  # WebDataset shard set (prefix holding manifest.json, or its URL; e.g. s3://b/p), instead of --root
    synthetic_size: Size = (128, 256)  # HxW of the synthetic set used when neither --root nor --shards is given
    synthetic_counts: tuple[int, int, int] = (400, 80, 80)  # train, val and test samples of that synthetic set
    scale_min: float = 1.0  # random zoom: smallest factor
    scale_max: float = 1.25  # random zoom: largest factor
    crop: Size | None = None  # HxW random crop after zooming (parts no zoomed image reaches: ignored); default: the input size
    hflip: bool = True  # random horizontal flips
    augment: bool = True  # any augmentation at all (zoom, crop, flip)
    workers: int | None = operational(None)  # loader processes per training process; default: from the CPUs (mtl.data.build.auto_workers)
    prefetch: int = operational(4)  # batches each loader process keeps ready
    shuffle_buffer: int = 256  # samples in the shuffle buffer when streaming shards (0: none; the shards' order still changes each epoch)

    def _rules(self) -> None:
        if self.root and self.shards:
            raise ValueError(f"--root {self.root} and --shards {self.shards} both name the training data: give one")
        for name, value in (("--root", self.root), ("--shards", self.shards)):
            if value is not None and not value.strip():  # (else the synthetic set, without a word)
                raise ValueError(f"{name} {value!r} names no data (an unset variable?): give the data's folder or URL, or "
                                 f"leave {name} out for the synthetic set")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"--scale-min/--scale-max: need 0 < min <= max, got {self.scale_min}, {self.scale_max}")
        if self.crop is not None and min(self.crop) <= 0:
            raise ValueError(f"--crop must be positive, got {self.crop}")
        from mtl.data.synthetic import MIN_SIDE  # (here: a config read from a file, and a sweep's plan, are checked too)

        if min(self.synthetic_size) < MIN_SIDE:
            h, w = self.synthetic_size
            raise ValueError(f"--synthetic-size must be at least {MIN_SIDE}x{MIN_SIDE}, got {h}x{w}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.prefetch < 1 or self.shuffle_buffer < 0 or min(self.synthetic_counts[:2]) < 1 or self.synthetic_counts[2] < 0:
            raise ValueError(f"--prefetch must be >= 1, --shuffle-buffer >= 0 (0: no buffer) and --synthetic-counts at "
                             f"least 1 1 0, got {self.prefetch}, {self.shuffle_buffer} and "
                             f"{' '.join(map(str, self.synthetic_counts))}")

    def check_new(self) -> None:
        """What a new run may not ask for, though runs of earlier versions hold it and resume with
        it: --crop with --no-augment (the crop is the augmentation's; it was ignored, and whole
        images trained without a word)."""
        if self.crop is not None and not self.augment:
            raise ValueError(f"--crop {self.crop[0]}x{self.crop[1]} is the augmentation's random crop, which --no-augment "
                             f"turns off: give one of them")


@dataclass(frozen=True)
class ModelConfig(_Part):
    arch: Arch = "deeplabv3p"  # the architecture (README "Model zoo")
    encoder: Encoder = "resnet34"  # the backbone
    #: ImageNet weights for the encoder: "imagenet" (torchvision's, from torch hub's cache; fetched once), or a
    #: torchvision-format file at a local path or URL (a mirror: jobs/pretrained.py)
    pretrained: str | None = None
    output_stride: Literal[8, 16, 32] | None = None  # encoder output stride (dilation below 32); default: the architecture's
    #: which 3x3 convs of a dilated encoder stage (--output-stride 16, 8) are dilated: second = each residual
    #: block's second (the course skeleton's encoder, so the report's models); all = every one (runs before 2026-11-30)
    dilated_convs: Literal["second", "all"] = "second"
    aspp_rates: tuple[int, ...] | None = None  # ASPP dilation rates; default: 6 12 18 at output stride 16, 12 24 36 at 8, 3 6 9 at 32
    vortex_rates: tuple[int, ...] = (1, 3, 9, 27)  # vortex pooling rates
    semseg_context: Context | None = None  # segmentation branch's context module; default: the architecture's
    depth_context: Context | None = None  # depth branch's context module; default: the architecture's
    semseg_decoder: Decoder | None = None  # segmentation branch's decoder; default: the architecture's
    depth_decoder: Decoder | None = None  # depth branch's decoder; default: the architecture's
    depth_space: Literal["log", "linear"] = "log"  # what the depth head predicts (normalised)

    def _rules(self) -> None:
        for name in ("aspp_rates", "vortex_rates"):
            rates = getattr(self, name)
            if rates is not None and (not rates or min(rates) < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be positive integers, got {rates}")


@dataclass(frozen=True)
class OptimConfig(_Part):
    optimizer: Optimizer = "adam"  # Adam, or SGD with momentum
    lr: float = 1e-4 * 4  # peak learning rate; the default is the report's best Adam LR (1e-4 at batch 4) scaled to batch 16
    weight_decay: float = 1e-4  # weight decay (see --weight-decay-style)
    #: how Adam applies --weight-decay: l2 = added to the gradient, as the report's Adam (torch's Adam);
    #: decoupled = AdamW's (Loshchilov & Hutter 2019): weights shrink by LR x decay each step, which at
    #: the defaults (4e-4 x 1e-4) is almost nothing. SGD's is always l2
    weight_decay_style: WeightDecayStyle = "l2"
    momentum: float = 0.9  # SGD momentum
    poly_power: float = 0.9  # the LR decays as (1 - step/steps) ** poly_power
    warmup_steps: int = 0  # linear LR warmup
    #: the tasks trained: both (multi-task), or one for a single-task baseline (the same network, the
    #: other task's loss weighted 0; its metrics are not reported; the best epoch is the task's own)
    tasks: tuple[Task, ...] = ("semseg", "depth")
    #: how the two task losses are weighed: fixed = --semseg-weight; uncertainty = learned log-variances
    #: (Kendall et al. 2018); dwa = Dynamic Weight Average over epoch losses (Liu et al. 2019); famo =
    #: Fast Adaptive Multitask Optimization (Liu et al. 2023): every task's loss decreases at the same rate
    task_weighting: TaskWeighting = "fixed"
    semseg_weight: float = 0.5  # loss = w * cross-entropy + (1 - w) * depth loss (--task-weighting fixed; the other methods start there)
    weighting_lr: float = 0.025  # Adam step size of learned task weights (uncertainty, famo); constant over the run
    dwa_temperature: float = 2.0  # DWA's softmax temperature (higher: weights closer to equal)
    grad_clip: float | None = None  # clip the gradient norm to this; 0 or not given: no clipping
    #: how a task's losses over an architecture's several outputs combine (distillation: its branch
    #: decoders' and its final ones'): mean = the course skeleton's, so the report's runs; sum = runs
    #: started before 2026-11-30, which continue with --deep-supervision sum, as the resume refusal says
    deep_supervision: DeepSupervision = "mean"

    def _rules(self) -> None:
        if not 0 < self.lr < math.inf:
            raise ValueError(f"--lr must be positive and finite, got {self.lr}")
        if not 0.0 <= self.semseg_weight <= 1.0:
            raise ValueError(f"--semseg-weight must lie in [0, 1], got {self.semseg_weight}")
        if self.grad_clip is not None and not 0 <= self.grad_clip < math.inf:  # (a negative norm would flip the gradient)
            raise ValueError(f"--grad-clip must be >= 0 and finite (0 or not given: no clipping), got {self.grad_clip}")
        if not 0 <= self.poly_power < math.inf:
            raise ValueError(f"--poly-power must be >= 0 and finite, got {self.poly_power}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must lie in [0, 1), got {self.momentum}")
        self._at_least(0, "weight_decay", "warmup_steps")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"--tasks must name semseg and/or depth once each, got {' '.join(self.tasks) or 'nothing'}")
        if len(self.tasks) == 1 and self.task_weighting != "fixed":
            raise ValueError(f"--task-weighting {self.task_weighting} weighs two tasks; --tasks {self.tasks[0]} trains one")
        if self.task_weighting != "fixed" and not 0 < self.semseg_weight < 1:  # (learned weights start from both tasks)
            raise ValueError(f"--task-weighting {self.task_weighting} starts from --semseg-weight, which must lie strictly "
                             f"between 0 and 1 (got {self.semseg_weight})")
        if not self.weighting_lr > 0 or not self.dwa_temperature > 0:
            raise ValueError("--weighting-lr and --dwa-temperature must be positive")


@dataclass(frozen=True)
class TrainConfig(_Part):
    epochs: int = 16  # passes over the training set (part of the run's name: another length is another recipe)
    batch_size: int = 16  # per training process
    grad_accum: int = 1  # batches per optimizer step
    seed: int = 0  # initialisation, data order and augmentation
    device: Device = operational("auto")  # local mode; on Ray, --use-gpu decides
    bf16: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    channels_last: bool = operational(True)  # channels_last memory format on CUDA
    compile: bool = operational(False)  # torch.compile the model
    #: capture the whole train step (forward, loss, backward, update) as one CUDA graph and replay
    #: it: auto = on a GPU with --grad-accum 1 and DDP or one process (not DeepSpeed); if the
    #: capture fails, one process goes on eagerly (logged; unless torch left its allocator capturing,
    #: pytorch#180395: then it stops, saying so), several ranks stop with the error;
    #: on = captured or an error; off = eager
    cuda_graph: Literal["auto", "on", "off"] = operational("auto")
    out: str = operational("runs")  # where runs (and sweeps: <out>/<sweep-name>) live: a local folder or s3:// prefix
    #: run name; default: descriptive + a hash of the training config (a sweep names its trials'
    #: runs after them: there --name is refused, --sweep-name names the sweep)
    name: str | None = operational(None)
    #: continue the run in <out>/<name> (required to reuse an existing run folder); a sweep's:
    #: continue the sweep in <out>/<sweep-name>
    resume: bool = operational(False)
    #: with --resume: the run's data was moved (or copied) to --root/--shards since its
    #: checkpoint, which recorded where it was: the run goes on from the new place (data of the
    #: same kind, and a training split of the same size); without it such a resume is refused
    data_moved: bool = operational(False)
    keep_last: int = operational(2)  # checkpoints kept, epoch and step ones alike (best.pt is kept apart); 0: all
    #: also checkpoint every N optimizer steps inside an epoch (0: at epoch ends only): a failure
    #: then loses at most the N − 1 steps trained since the last checkpoint (and the one it
    #: interrupts; plus, when it comes while that checkpoint is written in the background, the N
    #: steps before it), and the resumed run goes on with the very batch that came next
    checkpoint_every: int = operational(0)
    #: also checkpoint inside an epoch once this many minutes have passed since the last checkpoint
    #: (0: never): the loss of a failure stays bounded in time whatever a step costs. Several ranks
    #: agree on it at the steps where the loss is read (every --log-every steps)
    checkpoint_every_min: float = operational(0.0)
    #: write checkpoints (step and epoch ones) in the background: training stalls only while the
    #: state is copied into host memory (where it then needs a second copy of model and optimizer),
    #: not while it is written; it becomes the latest once written, and a failure during the write
    #: costs the steps back to the one before. In the foreground: the run's last epoch's, those
    #: after a preemption notice, and DeepSpeed's
    checkpoint_background: bool = operational(True)
    #: on Ray: steps between polls for a node's preemption notice (a spot reclaim; one collective
    #: call, a few ms); from a notice on, a checkpoint after every step until the node goes, so its
    #: loss costs at most the step it interrupts, if a poll sees the notice in time (this many steps
    #: must take well under the notice: 2 minutes on EC2); 0: never poll
    preemption_poll_every: int = operational(20)
    log_every: int = operational(10)  # steps between loss readouts (the loop's only host sync)
    log_interval_s: float = operational(30.0)  # seconds between plain progress lines when output is not a terminal
    max_steps_per_epoch: int | None = None  # debug: cut epochs short
    #: single-task runs (the folders of a --tasks semseg and a --tasks depth run) that judge this
    #: multi-task run: every epoch also reports Δm against their best validation metrics, and the
    #: run's score (what picks best.pt) is then -Δm instead of the grader
    baselines: tuple[str, ...] = ()

    def _rules(self) -> None:
        self._at_least(1, "epochs", "batch_size", "grad_accum", "log_every")
        self._at_least(0, "checkpoint_every", "checkpoint_every_min", "preemption_poll_every", note=" (0: never)")
        self._at_least(0, "log_interval_s")
        if self.seed < 0:  # (numpy's generators take none: the first augmented sample would fail)
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        check_folder_name(self.name, "--name", "the run folder is --out/<name>")
        if self.data_moved and not self.resume:
            raise ValueError("--data-moved continues a run whose data is now elsewhere: give it with --resume (and the run's --name)")
        if not self.out.strip():  # (else the current folder, without a word)
            raise ValueError(f"--out {self.out!r} names no folder (an unset variable?): give one, or leave --out out for runs/")
        from mtl.storage import check_literal  # (as in `check_folder_name`)

        check_literal(self.out if "://" in self.out else os.path.abspath(self.out), "--out")  # (a relative one: where it is)
        self._at_least(0, "keep_last", note=" (0: all)")
        if self.max_steps_per_epoch is not None:
            self._at_least(1, "max_steps_per_epoch", note=" (or not given)")


@dataclass(frozen=True)
class DistConfig(_Part):
    """Ray Train settings (--local trains in this process, without Ray, and refuses them).
    Checkpoints go to ``train.out`` (use s3:// or another storage all nodes share)."""

    address: str | None = operational(None)  # Ray cluster address; default: $RAY_ADDRESS, or the cluster of a submitted job
    num_workers: int = 1  # training processes (one GPU each with GPUs)
    #: elastic training: go on with as few as this many workers when nodes are lost (no waiting for
    #: replacements), and grow back to --num-workers when they return. The per-worker batch stays,
    #: the LR plan runs over samples seen (docs/reliability.md); default: always --num-workers
    min_workers: int | None = operational(None)
    resize_interval_s: float = operational(60.0)  # elastic: how often Ray checks whether more workers fit (each resize restarts from the last checkpoint)
    #: default: GPUs on a cluster the run joins (--address, $RAY_ADDRESS, `ray job submit`); on a
    #: Ray instance the run starts itself, GPUs if this machine has any
    use_gpu: bool | None = operational(None)
    cpus_per_worker: float = operational(1.0)  # CPUs Ray reserves per training process (its loader processes run on them)
    gpus_per_worker: float = operational(1.0)  # GPUs per training process when on GPUs
    strategy: Literal["ddp", "deepspeed"] = "ddp"  # PyTorch DDP, or DeepSpeed ZeRO (--zero-stage)
    zero_stage: Literal[0, 1, 2] = 1  # DeepSpeed ZeRO stage
    #: worker/node failures survived by restarting from the last checkpoint, counted over the whole
    #: run (a long run on nodes lost without notice may want more; preemptions with notice are not
    #: counted); -1: no limit (an error that comes back at every start, in the data or a
    #: checkpoint, then restarts the run until it is stopped: `ray job stop`)
    max_failures: int = operational(3)
    #: how long the worker group may wait to be placed; a request the cluster can never hold fails
    #: at once instead. Default: 900 s (nodes booting: 10+ minutes is normal for cloud GPUs), 60 s
    #: for elastic runs (--min-workers): they start only on resources Ray reports, and after a
    #: node's loss this bounds the wait for the node Ray still counts, before the group restarts
    #: smaller (waiting longer would wait for the replacement elastic training goes on without)
    start_timeout_s: float | None = operational(None)

    def _rules(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"--num-workers must be >= 1, got {self.num_workers}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ValueError(f"--min-workers must lie between 1 and --num-workers ({self.num_workers}), got {self.min_workers}")
        if self.min_workers is not None and self.strategy == "deepspeed":
            raise ValueError("--min-workers: DeepSpeed's ZeRO checkpoints are sharded per rank and cannot continue on another "
                             "number of workers; elastic training needs --strategy ddp")
        if self.resize_interval_s <= 0:
            raise ValueError(f"--resize-interval-s must be > 0, got {self.resize_interval_s}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0 or self.max_failures < -1 or self.start_timeout <= 0:
            raise ValueError("--cpus-per-worker and --start-timeout-s must be > 0; --gpus-per-worker >= 0; --max-failures >= 0, "
                             "or -1 for no limit")
        if self.gpus_per_worker > 1:
            raise ValueError(f"--gpus-per-worker {self.gpus_per_worker:g}: a training process uses one GPU; more would be "
                             f"reserved and left idle (more GPUs: --num-workers)")
        if 0 < self.gpus_per_worker < 1 and self.num_workers > 1:
            raise ValueError(f"--gpus-per-worker {self.gpus_per_worker:g} with --num-workers {self.num_workers}: ranks of one "
                             f"run may land on one GPU, which NCCL refuses (\"Duplicate GPU detected\"); give 1 (a fraction "
                             f"suits one-worker sweep trials that share GPUs)")

    @property
    def start_timeout(self) -> float:
        """``--start-timeout-s``, or its default for this run (fixed or elastic)."""
        if self.start_timeout_s is not None:
            return self.start_timeout_s
        return 60.0 if self.min_workers else 900.0


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> "ExperimentConfig":
        for part in (self.data, self.model, self.optim, self.train, self.dist):
            part.validate()
        if self.train.baselines and len(self.optim.tasks) != 2:
            raise ValueError(f"--baselines: Δm compares a multi-task run with single-task ones; this run trains --tasks "
                             f"{self.optim.tasks[0]} only")
        t = self.train
        if self.dist.min_workers is not None and not (t.checkpoint_every or t.checkpoint_every_min):
            # (Ray grows an elastic group back by restarting it: with epoch checkpoints only, each
            # time a node returns would cost up to an epoch)
            raise ValueError(f"--min-workers {self.dist.min_workers}: an elastic run restarts its workers from the last "
                             f"checkpoint whenever it shrinks or grows back, so give it step checkpoints: "
                             f"--checkpoint-every-min M (a failure or resize then costs at most M minutes) or "
                             f"--checkpoint-every N steps")
        if self.train.cuda_graph == "on" and self.graph_obstacle():
            raise ValueError(f"--cuda-graph on: {self.graph_obstacle()} (or --cuda-graph auto/off)")
        return self

    def graph_obstacle(self) -> str | None:
        """What in this config keeps the train step from being captured as a CUDA graph
        (`mtl.cuda_graph`; the device and the strategy are checked where they are known)."""
        if self.train.grad_accum > 1:
            return "a captured step is a whole optimizer step: it needs --grad-accum 1"
        if self.dist.strategy == "deepspeed":
            return "DeepSpeed's step cannot be captured"
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        return _from_dict(cls, d)

    def with_values(self, values: dict[str, Any]) -> "ExperimentConfig":
        """A copy with ``{"optim.lr": 3e-4, ...}`` set, each value converted to its field's type
        (a search library's numpy scalars become the int/float/bool the config holds). Not
        validated."""
        parts: dict[str, dict[str, Any]] = {}
        for path, value in values.items():
            part, _, name = path.partition(".")
            hints = typing.get_type_hints(type(getattr(self, part)))
            if name not in hints:
                raise ValueError(f"no config field {path!r}")
            parts.setdefault(part, {})[name] = _as_type(hints[name], value)
        return dataclasses.replace(self, **{p: dataclasses.replace(getattr(self, p), **kw) for p, kw in parts.items()})


def flag(name: str) -> str:
    """The command-line flag of a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def choices(tp: Any) -> tuple | None:
    """The values a field of type ``tp`` may take when it is a Literal (optional or a tuple of
    them), else None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return args
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return choices(inner[0]) if len(inner) == 1 else None
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return choices(args[0])
    return None


def check_choices(part: Any) -> None:
    """Every Literal-typed field of the dataclass ``part`` holds one of its values (a config
    read from a file is not type-checked otherwise). ValueError naming the flag."""
    for name, tp in typing.get_type_hints(type(part)).items():
        allowed, value = choices(tp), getattr(part, name)
        if allowed is None or value is None:
            continue
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if v not in allowed:
                raise ValueError(f"{flag(name)} must be one of {', '.join(map(str, allowed))}; got {v!r}")


def _as_type(tp: Any, value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp(value) if tp in (int, float, bool) and value is not None else value


# Named starting points for `jobs/train.py` (flags given on the command line override them).
# quick: a first local run that shows the model learn in about 3 minutes on a 2-core CPU
# (README quick start; the full-size synthetic set is for GPUs).
PRESETS: dict[str, ExperimentConfig] = {
    "quick": ExperimentConfig(data=DataConfig(synthetic_size=(64, 128), synthetic_counts=(160, 48, 48)),
                              train=TrainConfig(epochs=4, batch_size=8)),
}


def changed_fields(cfg: ExperimentConfig, base: ExperimentConfig | None = None) -> dict[str, Any]:
    """``{"train.epochs": 4, ...}``: the fields where ``cfg`` differs from ``base`` (defaults)."""
    base = base or ExperimentConfig()
    return {f"{part.name}.{f.name}": getattr(getattr(cfg, part.name), f.name)
            for part in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, part.name))
            if getattr(getattr(cfg, part.name), f.name) != getattr(getattr(base, part.name), f.name)}


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__} is a mapping of its fields, got {d!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, tp = d[f.name], hints[f.name]
        kwargs[f.name] = _from_dict(tp, v) if dataclasses.is_dataclass(tp) else _typed(v, tp, flag(f.name))
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown config keys for {cls.__name__}: {sorted(unknown)}")
    return cls(**kwargs)


def _typed(v: Any, tp: Any, key: str) -> Any:
    """A config file's value ``v`` as the field's type ``tp``, or a ValueError naming ``key`` (its
    flag): a file has no parser to refuse "false" for a bool, "depth" for a list of tasks or
    2.5 for a count, each of which would otherwise train something else or fail deep in the
    run. JSON's lists become tuples; an int where a float goes becomes that float (a run's
    name and hash then match the flag's); a number YAML 1.1 reads as a string ("1e-3") is read."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # (every union here is X | None)
        return None if v is None and type(None) in args else _typed(v, next(a for a in args if a is not type(None)), key)
    if origin is typing.Literal:
        if any(v == a and type(v) is type(a) for a in args):
            return v
        raise ValueError(f"{key} must be one of {', '.join(map(repr, args))}, got {v!r}")
    if origin is tuple:
        items = [args[0]] * len(v) if isinstance(v, (list, tuple)) and args[-1] is Ellipsis else list(args)
        if not isinstance(v, (list, tuple)) or len(items) != len(v):
            raise ValueError(f"{key} must be a list of {'any number of' if args[-1] is Ellipsis else len(args)} values, "
                             f"got {v!r}")
        return tuple(_typed(x, t, key) for x, t in zip(v, items))
    if tp is float and isinstance(v, str):
        with contextlib.suppress(ValueError):
            return float(v)
    if tp is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, tp) and not (tp is int and isinstance(v, bool)):
        return v
    what = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(tp, getattr(tp, "__name__", tp))
    raise ValueError(f"{key} must be {what}, got {v!r}")


def parse_size(text: str, what: str = "--size") -> tuple[int, int]:
    """'256x512' -> (256, 512): the one reader of HxW values (``--size``, ``--crop``...).
    ValueError naming ``what`` otherwise (a flag; "" for none)."""
    h, sep, w = text.strip().lower().partition("x")
    if not (sep and h.isdigit() and w.isdigit() and int(h) >= 8 and int(w) >= 8):
        raise ValueError(f"{what} must be HxW with integers of at least 8 (e.g. 256x512), got {text!r}".strip())
    return int(h), int(w)
