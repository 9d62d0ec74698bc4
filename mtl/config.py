"""One typed configuration tree, from the CLI through Ray to the train loop.

`ExperimentConfig` is a frozen dataclass tree. Resolved (`mtl.runs.resolve_config`), it is
printed at start, saved as ``config.json`` in the run folder and inside every checkpoint, and
rebuilt from JSON (`from_dict`) on resume or in a Ray worker.

Fields made with `operational` say where and how a run executes (loader processes, output
folder, logging, Ray resources) rather than what it trains: they are left out of the run's
identity (`mtl.runs.identity`), so they may differ between a run and its resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

ARCHS = ("deeplabv3p", "branched", "distillation", "branched_vortex")


def operational(default: Any = None, **kw: Any) -> Any:
    """A field that does not change what is trained (see the module docstring)."""
    return field(default=default, metadata={"operational": True}, **kw)


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # Miniscapes folder (path or fsspec URL); None = cached synthetic set
    shards: str | None = None  # WebDataset shard set (prefix or manifest URL, e.g. s3://b/p); overrides root
    synthetic_size: tuple[int, int] = (128, 256)  # HxW of the auto-generated synthetic set
    synthetic_counts: tuple[int, int, int] = (400, 80, 80)  # train/val/test
    scale_min: float = 1.0
    scale_max: float = 1.25
    crop: tuple[int, int] | None = None  # None = crop back to the input size after scaling
    hflip: bool = True
    augment: bool = True
    workers: int | None = operational(None)  # loader processes per training process; None = auto (`mtl.data.auto_workers`)
    prefetch: int = operational(4)  # batches each loader worker keeps ready
    shuffle_buffer: int = 256  # samples (shard streaming)

    def validate(self) -> None:
        if self.root and self.shards:
            raise ValueError(f"--root {self.root} and --shards {self.shards} both name the training data: give one")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"--scale-min/--scale-max: need 0 < min <= max, got {self.scale_min}, {self.scale_max}")
        if self.crop is not None and min(self.crop) <= 0:
            raise ValueError(f"--crop must be positive, got {self.crop}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "deeplabv3p"
    encoder: str = "resnet34"
    pretrained: str | None = None  # torchvision-format weights, local path or s3://
    output_stride: int | None = None  # 8/16/32; None = the architecture's default
    aspp_rates: tuple[int, ...] | None = None  # None = (6,12,18) at OS16, (12,24,36) at OS8
    vortex_rates: tuple[int, ...] = (1, 3, 9, 27)
    semseg_context: str | None = None  # aspp | vortex | none; None = the architecture's default
    depth_context: str | None = None
    semseg_decoder: str | None = None  # skip | double_skip
    depth_decoder: str | None = None
    depth_space: Literal["log", "linear"] = "log"  # what the depth head predicts (normalised)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"--arch must be one of {ARCHS}, got {self.arch!r}")
        if self.output_stride not in (None, 8, 16, 32):
            raise ValueError(f"--output-stride must be 8, 16 or 32, got {self.output_stride}")
        if self.depth_space not in ("log", "linear"):
            raise ValueError(f"--depth-space must be log or linear, got {self.depth_space!r}")
        for name in ("aspp_rates", "vortex_rates"):
            rates = getattr(self, name)
            if rates is not None and (not rates or min(rates) < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be positive integers, got {rates}")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-4 * 4  # the report's best Adam LR (1e-4 at batch 4), scaled to batch 16
    weight_decay: float = 1e-4
    momentum: float = 0.9
    poly_power: float = 0.9
    warmup_steps: int = 0
    semseg_weight: float = 0.5  # loss = w * CE + (1 - w) * depth
    grad_clip: float | None = None

    def validate(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"--optimizer must be adam or sgd, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if not 0.0 <= self.semseg_weight <= 1.0:
            raise ValueError(f"--semseg-weight must lie in [0, 1], got {self.semseg_weight}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("--weight-decay and --warmup-steps must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 16
    batch_size: int = 16  # per worker
    grad_accum: int = 1
    seed: int = 0
    device: str = operational("auto")  # auto | cpu | cuda
    bf16: bool = True  # autocast on CUDA; ignored on CPU
    channels_last: bool = operational(True)
    compile: bool = operational(False)
    out: str = operational("runs")  # where runs live: a local folder or s3:// prefix
    name: str | None = operational(None)  # run name; None = descriptive name + hash of the training config
    resume: bool = operational(False)  # continue the run in <out>/<name> (required to reuse an existing run folder)
    keep_last: int = operational(2)
    log_every: int = operational(10)  # steps between loss readouts (the loop's only host sync)
    log_interval_s: float = operational(30.0)  # seconds between plain progress lines when stdout is not a terminal
    max_steps_per_epoch: int | None = None  # debug: cut epochs short

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("--epochs, --batch-size and --grad-accum must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.log_every < 1 or self.log_interval_s < 0:
            raise ValueError("--log-every must be >= 1 and --log-interval-s >= 0")


@dataclass(frozen=True)
class DistConfig:
    """Ray Train settings (--local trains one process and refuses --num-workers > 1 and
    --strategy deepspeed). Checkpoints go to ``train.out`` (use s3:// or another storage all
    nodes share)."""

    address: str | None = operational(None)  # Ray cluster address; None = $RAY_ADDRESS or the cluster of a submitted job
    num_workers: int = 1
    # None = GPUs on a cluster the run joins (address, $RAY_ADDRESS, `ray job submit`); on a Ray
    # instance the run starts itself, GPUs if this machine has any
    use_gpu: bool | None = operational(None)
    cpus_per_worker: float = operational(1.0)
    gpus_per_worker: float = operational(1.0)
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 1
    max_failures: int = operational(3)  # worker/node failures survived by restarting from the last checkpoint
    # how long the worker group may wait to be placed (nodes booting: 10+ minutes is normal for
    # cloud GPUs); a request the cluster can never hold fails at once instead
    start_timeout_s: float = operational(900.0)

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"--num-workers must be >= 1, got {self.num_workers}")
        if self.strategy not in ("ddp", "deepspeed"):
            raise ValueError(f"--strategy must be ddp or deepspeed, got {self.strategy!r}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"--zero-stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0 or self.max_failures < 0 or self.start_timeout_s <= 0:
            raise ValueError("--cpus-per-worker and --start-timeout-s must be > 0; --gpus-per-worker and --max-failures >= 0")


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
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        return _from_dict(cls, d)


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
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, tp = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(tp):
            v = _from_dict(tp, v)
        elif isinstance(v, list):
            v = tuple(v)  # JSON turns tuples into lists
        kwargs[f.name] = v
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown config keys for {cls.__name__}: {sorted(unknown)}")
    return cls(**kwargs)


# --------------------------------------------------------------------------- CLI <-> config

def _parser_type(tp: Any) -> tuple[Any, dict[str, Any]]:
    """argparse (type, extra kwargs) for a dataclass field type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _parser_type(inner[0])
    if origin is Literal:
        return type(args[0]), {"choices": list(args)}
    if origin is tuple:
        return (_str2bool if args[0] is bool else args[0]), {"nargs": "+"}
    if tp is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    return tp, {}


def parse_size(text: str) -> tuple[int, int]:
    """'256x512' -> (256, 512): the one reader of ``--size HxW`` flags. ValueError naming
    ``--size`` otherwise."""
    h, sep, w = text.strip().lower().partition("x")
    if not (sep and h.isdigit() and w.isdigit() and int(h) >= 8 and int(w) >= 8):
        raise ValueError(f"--size must be HxW with integers of at least 8 (e.g. 256x512), got {text!r}")
    return int(h), int(w)


def size_arg(text: str) -> tuple[int, int]:
    """`parse_size` as an argparse ``type`` (its message shown as the usage error)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _str2bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_args(parser: argparse.ArgumentParser, cls: type = ExperimentConfig) -> None:
    """One flag per leaf field (``--lr``, ``--batch-size``, ``--no-hflip``...)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            group = parser.add_argument_group(f.name)
            _add_leaf_args(group, tp)


def add_leaf_args(group: Any, cls: type) -> None:
    """Flags for the fields of one flat dataclass (e.g. a sweep config)."""
    _add_leaf_args(group, cls)


def leaf_from_args(args: argparse.Namespace, cls: type) -> Any:
    """Build a flat dataclass from the flags `add_leaf_args` added (defaults where not given)."""
    changes = {}
    for g in dataclasses.fields(cls):
        v = getattr(args, f"{cls.__name__}.{g.name}", None)
        if v is not None:
            changes[g.name] = tuple(v) if isinstance(v, list) else v
    return cls(**changes)


def _add_leaf_args(group: Any, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        typ, extra = _parser_type(hints[f.name])
        kw: dict[str, Any] = {"default": None, "dest": f"{cls.__name__}.{f.name}", **extra}
        if typ is not None:
            kw["type"] = typ
        kw["help"] = f"default: {getattr(defaults, f.name)}"
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def config_from_args(args: argparse.Namespace, base: ExperimentConfig | None = None) -> ExperimentConfig:
    """Apply the flags that were given on top of ``base`` (defaults when None); validate."""
    base = base or ExperimentConfig()
    parts = {}
    for f in dataclasses.fields(ExperimentConfig):
        sub = getattr(base, f.name)
        given = leaf_from_args(args, type(sub))
        changes = {g.name: getattr(given, g.name) for g in dataclasses.fields(sub)
                   if getattr(args, f"{type(sub).__name__}.{g.name}", None) is not None}
        parts[f.name] = dataclasses.replace(sub, **changes)
    return ExperimentConfig(**parts).validate()
