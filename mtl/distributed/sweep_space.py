"""A sweep's search space, as data: one table of knobs (`KNOBS`).

A knob is a config field a sweep varies (``"optim.lr"``), how its values are drawn, and how a
report and a trial's name show them. Everything that touches the hyperparameters is derived
from the table: Tune's ``param_space``, the checks before any trial starts, each trial's
config and name, and the report's columns (`mtl.distributed.sweep_report`). `SweepConfig`
holds the ranges the knobs read (its flags: ``--lr-min``, ``--optimizers``...); a space given
another way (a ``--space`` flag, say) only has to map knobs to values, as `space` does.

Importing this module does not import Ray: the command line checks a space before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from mtl.config import ExperimentConfig, Optimizer, flag

Kind = Literal["loguniform", "uniform", "choice"]


@dataclass(frozen=True)
class Knob:
    path: str  # the config field a trial sets, "<part>.<field>"
    kind: Kind  # loguniform/uniform between two bounds, or one of a list
    fields: tuple[str, ...]  # the SweepConfig fields holding its values: (min, max), or (choices,)
    fmt: str  # format spec of a value in reports ("" = str())
    tag: Callable[[Any], str]  # the value in a trial's name
    after: str = "_"  # what follows the tag in a trial's name

    @property
    def name(self) -> str:
        """The key in Tune's trial config and the report's column: the field's name (unique
        across the config's parts, as its flag is)."""
        return self.path.rpartition(".")[2]

    def show(self, value: Any) -> str:
        return "" if value is None else format(value, self.fmt)


# The trial name reads like a run name: optimizer-lr first (adam-lr3.2e-04), then the rest.
KNOBS: tuple[Knob, ...] = (
    Knob("optim.optimizer", "choice", ("optimizers",), "", str, after="-"),
    Knob("optim.lr", "loguniform", ("lr_min", "lr_max"), ".2e", lambda v: f"lr{v:.1e}"),
    Knob("optim.semseg_weight", "uniform", ("semseg_weight_min", "semseg_weight_max"), ".2f", lambda v: f"w{v:.2f}"),
    Knob("data.scale_max", "choice", ("scale_max_choices",), "g", lambda v: f"s{v:g}"),
    Knob("data.hflip", "choice", ("hflip_choices",), "", lambda v: "flip" if v else "noflip"),
    Knob("train.batch_size", "choice", ("batch_sizes",), "", lambda v: f"bs{v}"),
)


@dataclass(frozen=True)
class SweepConfig:
    """The ranges of `KNOBS` and the sweep's mechanics. Ranges default to the report's
    neighbourhood: Adam around 1e-4 (§2.1.2), segmentation weight around 0.58 (§2.1.4), zoom up
    to 1.25 (§5.4)."""

    sweep_name: str = "sweep"  # the sweep's folder under --out (results, trials); --resume continues it
    num_samples: int = 16  # trials
    lr_min: float = 1e-5  # learning rate: log-uniform from here...
    lr_max: float = 1e-3  # ...to here
    optimizers: tuple[Optimizer, ...] = ("adam",)  # optimizers to draw from
    semseg_weight_min: float = 0.3  # segmentation loss weight w (depth gets 1 - w): uniform from here...
    semseg_weight_max: float = 0.7  # ...to here
    scale_max_choices: tuple[float, ...] = (1.0, 1.25, 1.5)  # largest random zoom factors to draw from
    hflip_choices: tuple[bool, ...] = (True, False)  # random flips on/off to draw from
    batch_sizes: tuple[int, ...] = (16,)  # batch sizes (per training process) to draw from
    grace_period: int = 1  # epochs every trial gets before ASHA may stop it
    reduction_factor: int = 2  # ASHA keeps the best 1/reduction_factor at each rung
    max_concurrent: int | None = None  # trials at once; default: as many as the cluster's CPUs/GPUs hold
    search: Literal["random", "optuna", "hyperopt"] = "random"  # how trials are drawn (optuna/hyperopt: their packages)
    search_seed: int = 0  # seed of the search algorithm

    def validate(self) -> "SweepConfig":
        """The mechanics (the ranges are checked against a training config: `check_space`)."""
        if self.num_samples < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("--num-samples >= 1, --grace-period >= 1 and --reduction-factor >= 2 are required")
        return self


def space(sweep: SweepConfig) -> dict[Knob, tuple]:
    """Each knob's values: ``(min, max)`` for the continuous kinds, the choices otherwise."""
    return {k: tuple(getattr(sweep, f) for f in k.fields) if k.kind != "choice" else tuple(getattr(sweep, k.fields[0]))
            for k in KNOBS}


def check_space(knobs: dict[Knob, tuple], base: ExperimentConfig) -> None:
    """Every value a trial may draw makes a valid training config (`ExperimentConfig.validate`
    owns what valid means); ValueError naming the sweep's flag otherwise. Runs before any trial."""
    if base.train.checkpoint_every:  # each report is a Tune result: ASHA's rungs count them as epochs
        raise ValueError("--checkpoint-every: sweeps checkpoint at epoch ends only (every checkpoint is a result that "
                         "ASHA counts as an epoch)")
    for knob, values in knobs.items():
        flags = [flag(f) for f in knob.fields]
        if not values:
            raise ValueError(f"{flags[0]} needs at least one value")
        if knob.kind != "choice" and values[0] > values[1]:
            raise ValueError(f"need {flags[0]} <= {flags[1]}, got {values[0]}, {values[1]}")
        for i, v in enumerate(values):
            try:
                base.with_values({knob.path: v}).validate()
            except ValueError as e:
                raise ValueError(f"{flags[min(i, len(flags) - 1)]}: {e}") from None


def param_space(knobs: dict[Knob, tuple]) -> dict[str, Any]:
    """Tune's search space: one domain per knob, under its name."""
    from ray import tune

    draw = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
            "choice": lambda v: tune.choice(list(v))}
    return {k.name: draw[k.kind](values) for k, values in knobs.items()}


def trial_config(base: ExperimentConfig, hp: dict[str, Any], name: str, trials_url: str, resume: bool = False) -> ExperimentConfig:
    """The base config with one trial's hyperparameters; its Train run lives in ``trials_url/name``
    (``resume``: continue it — a trial restarted by ``Tuner.restore``)."""
    cfg = base.with_values({k.path: hp[k.name] for k in KNOBS if k.name in hp})
    return cfg.with_values({"train.out": trials_url, "train.name": name, "train.resume": resume}).validate()


def trial_name(arch: str, hp: dict[str, Any], trial_id: str) -> str:
    """Descriptive, filesystem-safe: branched_adam-lr3.2e-04_w0.58_s1.25_flip_bs16_3f2a1_00004."""
    return f"{arch}_" + "".join(k.tag(hp[k.name]) + k.after for k in KNOBS if hp.get(k.name) is not None) + trial_id
