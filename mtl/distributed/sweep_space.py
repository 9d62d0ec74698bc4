"""A sweep as data: its search space (`Dim`s given as ``--space`` texts), its objective and its
scheduler (`SweepSpec`), all checked before Ray starts.

A dimension is one config field and how trials draw it::

    --space optim.lr=loguniform:1e-5:1e-3       log-uniform between two bounds
    --space semseg_weight=uniform:0.3:0.7       uniform between two bounds
    --space encoder=choice:resnet18,resnet34    one of a list
    --space aspp_rates=choice:6+12+18,12+24+36  tuple-valued fields: items joined with +
    --space crop=choice:224x448,256x512         sizes as HxW

The field is named by its path (``optim.lr``), its name (``lr``, ``semseg-weight``) or its flag
written inside the same argument (``--space=--lr=loguniform:1e-5:1e-3``: the parser takes a
separate argument that starts with ``--``, as in ``--space --lr=...``, for the next flag and
refuses it); values are read with the field's type and every value a trial may draw is checked
against the config's rules (`ExperimentConfig.validate`). Everything that touches the hyperparameters
follows from the space: Tune's ``param_space``, each trial's config and name, PBT's mutations and
the report's columns (`mtl.distributed.sweep_report`).

Fixed and swept: a flag given on the command line fixes its field for every trial. With
``--space``, a flag given for a field the space sweeps is an error naming both. Without it,
the default space (`DEFAULT_SPACE`) is swept minus the fields whose flags were given (the
sweep says which). Values from a ``--config`` file are a starting point, not flags: the space
overrides them.

Importing this module does not import Ray: the command line checks a sweep before Ray starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterable, Literal, Sequence

import tyro

from mtl.cli import given_fields
from mtl.config import ExperimentConfig, check_folder_name, choices, flag, parse_size

Kind = Literal["loguniform", "uniform", "choice"]
KINDS: tuple[str, ...] = typing.get_args(Kind)
Metric = Literal["grader", "score", "delta_m"]
# the result key each objective reads, and whether higher is better
OBJECTIVES: dict[str, tuple[str, str]] = {"grader": ("grader", "max"), "score": ("score", "max"), "delta_m": ("delta_m", "min")}

# Today's neighbourhood of the report (Adam around 1e-4 at batch 4, §2.1.2; segmentation weight
# around 0.58, §2.1.4; zoom up to 1.25, §5.4), swept when no --space is given.
DEFAULT_SPACE: tuple[str, ...] = ("optim.lr=loguniform:1e-5:1e-3", "optim.semseg_weight=uniform:0.3:0.7",
                                  "data.scale_max=choice:1.0,1.25,1.5", "data.hflip=choice:true,false")
# fields no sweep varies, and why
NOT_SWEPT: dict[str, str] = {
    "optim.tasks": "the trials of a sweep train the same tasks (their scores would not compare); sweep each task set apart",
    "train.epochs": "every trial trains --epochs (the time scale of ASHA and PBT)",
    "dist.num_workers": "every trial has --num-workers workers (the sweep sizes its concurrent trials from it)",
    "train.baselines": "--baselines judge every trial by Δm and pick its best.pt so: give them as a flag, with --metric delta_m",
}
# fields that do nothing when the trials train one task (its loss weight is 1: `mtl.weighting.build_weighting`)
MULTI_TASK_ONLY: dict[str, str] = {"optim.semseg_weight": "weighs the two tasks' losses"}
# fields that do nothing when the trials train without augmentation (`mtl.data.build.train_augment`)
AUGMENT_ONLY: tuple[str, ...] = ("data.scale_min", "data.scale_max", "data.hflip", "data.crop")
# what PBT may change in the middle of a trial: a trial that exploits another continues that
# trial's weights, optimizer state and LR plan with these values. Other fields change the model
# (encoder...), the data plan (batch size: steps per epoch, LR plan length), or state that the
# checkpoint restores over the new value (the optimizer's weight decay and momentum, the task
# weighting's own state), so PBT refuses them.
PBT_MUTABLE: tuple[str, ...] = ("optim.lr", "optim.semseg_weight", "optim.grad_clip", "data.scale_min", "data.scale_max",
                                "data.hflip", "data.augment")
# readable tags in trial names; other fields show as <name><value>
_TAGS: dict[str, Any] = {
    "optim.lr": lambda v: f"lr{v:.1e}", "optim.semseg_weight": lambda v: f"w{v:.2f}", "data.scale_max": lambda v: f"s{v:g}",
    "data.hflip": lambda v: "flip" if v else "noflip", "train.batch_size": lambda v: f"bs{v}", "optim.optimizer": str,
    "model.encoder": str, "model.arch": str, "optim.task_weighting": str,
}


def _parts() -> dict[str, type]:
    return {f.name: type(getattr(ExperimentConfig(), f.name)) for f in dataclasses.fields(ExperimentConfig)}


def _hints() -> dict[str, tuple[Any, dataclasses.Field]]:
    """``"optim.lr"`` -> (its type, its dataclass field), for every leaf of the config."""
    out = {}
    for part, cls in _parts().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f"{part}.{f.name}"] = (hints[f.name], f)
    return out


def field_path(name: str) -> str:
    """``lr``, ``--lr``, ``semseg-weight`` or ``optim.lr`` -> ``optim.lr``; ValueError otherwise."""
    key = name.strip().removeprefix("--").replace("-", "_")
    hints = _hints()
    if key in hints:
        return key
    found = [p for p in hints if p.rpartition(".")[2] == key]
    if not found:
        raise ValueError(f"{name!r} is not a config field (jobs/tune.py --help lists them, one flag each)")
    return found[0]  # field names are unique across the config's parts, as their flags are


def _optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0], len(inner) < len(typing.get_args(tp))
    return tp, False


def _value(tp: Any, text: str, name: str) -> Any:
    """One value of a field of type ``tp``, read from ``text``."""
    inner, optional = _optional(tp)
    allowed = choices(inner) if typing.get_origin(inner) is Literal else None
    if optional and text.lower() == "none" and not (allowed and "none" in allowed):
        return None
    if typing.get_origin(inner) is Literal:
        for v in allowed:
            if str(v) == text:
                return v
        raise ValueError(f"{flag(name)} must be one of {', '.join(map(str, allowed))}; got {text!r}")
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        if args == (int, int):
            return parse_size(text, what=flag(name))
        items = text.split("+")
        if Ellipsis in args:
            return tuple(_value(args[0], item, name) for item in items)
        if len(items) != len(args):
            raise ValueError(f"{flag(name)} takes {len(args)} values joined with +, got {text!r}")
        return tuple(_value(tp_i, item, name) for tp_i, item in zip(args, items))
    if inner is bool:
        lowered = text.lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"{flag(name)} is true or false; got {text!r}")
    try:
        return inner(text)
    except (TypeError, ValueError):
        raise ValueError(f"{flag(name)} expects {getattr(inner, '__name__', inner)}; got {text!r}") from None


def _text(v: Any, tp: Any = None) -> str:
    """A value as ``--space`` writes it (``tp``: the field's type; sizes are HxW)."""
    if isinstance(v, tuple):
        if tp is not None and typing.get_args(_optional(tp)[0]) == (int, int):
            return f"{v[0]}x{v[1]}"
        return "+".join(map(_text, v))
    if isinstance(v, bool):
        return str(v).lower()
    return "none" if v is None else str(v)


@dataclass(frozen=True)
class Dim:
    """One swept field: ``path`` (``optim.lr``), how it is drawn, and its values (``(low, high)``
    for loguniform/uniform, the choices otherwise), typed as the field."""

    path: str
    kind: Kind
    values: tuple

    @property
    def name(self) -> str:
        """The key in Tune's trial config and the report's column: the field's name."""
        return self.path.rpartition(".")[2]

    @property
    def flag(self) -> str:
        return flag(self.name)

    @property
    def continuous(self) -> bool:
        return self.kind != "choice"

    @property
    def text(self) -> str:
        """As given on the command line (canonical form): ``optim.lr=loguniform:1e-05:0.001``."""
        sep, tp = ":" if self.continuous else ",", _hints()[self.path][0]
        return f"{self.path}={self.kind}:" + sep.join(_text(v, tp) for v in self.values)

    def show(self, value: Any) -> str:
        """A value in reports."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "none" if value is None and None in self.values else ""
        if isinstance(value, float):
            return format(value, ".2e" if self.kind == "loguniform" else ".3g")
        tp = _hints()[self.path][0]
        if isinstance(value, str) and typing.get_origin(_optional(tp)[0]) is tuple:
            value = tuple(value.split("+"))  # as a trial reports a tuple to Tune (`tune.trial_result`)
        return _text(self.typed(value), tp)  # the way --space writes it: sizes as HxW

    def tag(self, value: Any) -> str:
        """A value in a trial's name (filesystem-safe)."""
        make = _TAGS.get(self.path)
        if make is not None:
            text = make(value)
        else:
            name = self.name.replace("_", "-")
            text = (name if value else f"no-{name}") if isinstance(value, bool) else \
                f"{name}{value:.3g}" if isinstance(value, float) else f"{name}{_text(value, _hints()[self.path][0])}"
        return re.sub(r"[^A-Za-z0-9.+\-]", "", text)

    def typed(self, value: Any) -> Any:
        """A drawn value as the field holds it (search libraries hand over numpy scalars and
        lists; JSON turns tuples into lists)."""
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, list):
            value = tuple(value)
        return value


def parse_dim(text: str) -> Dim:
    """``PATH=KIND:ARGS`` (see the module docstring) as a `Dim`; ValueError naming the text."""
    name, sep, rest = text.partition("=")
    kind, _, args = rest.partition(":")
    if not sep or kind not in KINDS or not args:
        raise ValueError(f"--space {text}: expected FIELD=loguniform:LOW:HIGH, FIELD=uniform:LOW:HIGH or "
                         f"FIELD=choice:A,B,... (e.g. lr=loguniform:1e-5:1e-3)")
    try:
        path = field_path(name)
    except ValueError as e:
        raise ValueError(f"--space {text}: {e}") from None
    tp, f = _hints()[path]
    short = path.rpartition(".")[2]
    if f.metadata.get("operational"):
        raise ValueError(f"--space {text}: {flag(short)} says how a run executes, not what it trains: a sweep does not vary it")
    if path in NOT_SWEPT:
        raise ValueError(f"--space {text}: {NOT_SWEPT[path]}")
    try:
        if kind == "choice":
            values = tuple(_value(tp, v, short) for v in args.split(","))
            if len(set(map(_text, values))) != len(values):
                raise ValueError("a choice is listed twice")
        else:
            inner, _ = _optional(tp)
            if inner not in (float, int) or inner is bool:
                raise ValueError(f"{kind} draws numbers; {flag(short)} is not a number: give its values with choice:A,B,...")
            if inner is int:
                raise ValueError(f"{flag(short)} is an integer: give its values with choice:A,B,...")
            bounds = args.split(":")
            if len(bounds) != 2:
                raise ValueError(f"{kind} takes two bounds, LOW:HIGH")
            values = tuple(_value(float, b, short) for b in bounds)
            if not values[0] <= values[1]:
                raise ValueError(f"need LOW <= HIGH, got {values[0]:g} and {values[1]:g}")
            if not all(map(math.isfinite, values)):
                raise ValueError("the bounds must be finite numbers")
            if kind == "loguniform" and values[0] <= 0:
                raise ValueError(f"loguniform needs LOW > 0, got {values[0]:g}")
    except ValueError as e:
        raise ValueError(f"--space {text}: {e}") from None
    return Dim(path, kind, values)  # type: ignore[arg-type]


def parse_space(texts: Iterable[str]) -> tuple[Dim, ...]:
    dims = tuple(parse_dim(t) for t in texts)
    seen: dict[str, Dim] = {}
    for d in dims:
        if d.path in seen:
            raise ValueError(f"--space sweeps {d.name} twice ({seen[d.path].text} and {d.text})")
        seen[d.path] = d
    return dims


def explicit_fields(argv: Sequence[str]) -> set[str]:
    """The config fields whose flags are on the command line (``--lr 3e-4``, ``--lr=3e-4``,
    ``--no-hflip``; with underscores too, as the parser takes them: ``--semseg_weight``)."""
    return set(given_fields(argv, _hints()))


def choose_space(texts: Sequence[str], given: set[str], tasks: Sequence[str] = ("semseg", "depth"),
                 augment: bool = True, base: ExperimentConfig | None = None) -> tuple[tuple[Dim, ...], list[str]]:
    """The space a sweep runs (see the module docstring) and notes for the log: ``--space`` as
    given, where a flag given for a swept field is an error naming both, and so is a field that
    does nothing in these trials (`_idle`: one that weighs two tasks when they train one of
    ``tasks``, an augmentation setting when ``augment`` is off and not swept); else the default
    space without the fields whose flags were given, and without those."""
    if texts:
        space = parse_space(texts)
        clash = [d for d in space if d.path in given]
        if clash:
            d = clash[0]
            raise ValueError(f"{d.flag} is given and --space {d.text} sweeps it: give one (the flag fixes {d.name} for "
                             f"every trial, --space varies it)")
        idle = [(d, why) for d in space if (why := _idle(d, space, tasks, augment) or _unused_method(d, space, base))]
        if idle:
            d, why = idle[0]
            raise ValueError(f"--space {d.text}: {d.name} {why}: sweep something else")
        return space, []
    space = parse_space(DEFAULT_SPACE)
    fixed = [d for d in space if d.path in given]
    idle = [(d, why) for d in space if d not in fixed and (why := _idle(d, space, tasks, augment))]
    space = tuple(d for d in space if d not in fixed and all(d is not i for i, _ in idle))
    notes = [f"the default space leaves out {', '.join(d.name for d in fixed)}: fixed by "
             f"{', '.join(d.flag for d in fixed)}"] if fixed else []
    notes += [f"the default space leaves out {d.name}: it {why}" for d, why in idle]
    if not space:
        raise ValueError("every field of the default space is fixed by a flag: say what to sweep with --space "
                         "(e.g. --space lr=loguniform:1e-5:1e-3)")
    return space, notes


# swept, these choose a method (an optimizer, a weighting...): a setting the base configuration leaves idle
# (`mtl.runs.idle_fields`) may count in some trials
CHOOSES_METHOD = ("optim.optimizer", "optim.task_weighting", "optim.tasks", "data.root", "data.shards", "data.augment",
                  "dist.strategy")


def _unused_method(d: Dim, space: Sequence[Dim], base: ExperimentConfig | None) -> str | None:
    """Why sweeping ``d`` changes nothing: it is a setting of a method no trial uses (SGD's
    momentum when every trial trains with Adam...: `mtl.runs.idle_reasons`), or None."""
    if base is None or base.train.resume:  # (a resumed sweep's space was new once: `check_resume` holds it to it)
        return None
    from mtl.runs import idle_reasons

    reasons = [idle_reasons(v).get(d.path) for v in method_variants(space, base)]
    return f"changes nothing in these trials: {reasons[0]}" if all(reasons) else None


def method_variants(space: Sequence[Dim], base: ExperimentConfig) -> list[ExperimentConfig]:
    """``base`` with every combination of the methods the space chooses among (`CHOOSES_METHOD`)."""
    variants = [base]
    for o in space:
        if o.path in CHOOSES_METHOD and not o.continuous:
            variants = [v.with_values({o.path: x}) for v in variants for x in o.values]
    return variants


def _idle(d: Dim, space: Sequence[Dim], tasks: Sequence[str], augment: bool) -> str | None:
    """Why sweeping ``d`` would change nothing in trials of ``tasks`` (``augment``: the trials'
    augmentation, unless the space sweeps it too), or None."""
    if len(tasks) == 1 and d.path in MULTI_TASK_ONLY:
        return f"{MULTI_TASK_ONLY[d.path]}, and these trials train --tasks {tasks[0]} only"
    if not augment and d.path in AUGMENT_ONLY and all(o.path != "data.augment" for o in space):
        return "belongs to the augmentation, which --no-augment turns off for these trials"
    return None


def check_space(space: Iterable[Dim], base: ExperimentConfig, limit: int = 4096) -> None:
    """Every value a trial may draw makes a valid training config (`mtl.runs.resolve_config`: the
    config's rules and its resolved model's); ValueError naming the ``--space`` otherwise. The
    ends of continuous ranges and every choice are checked together (``scale_min`` above
    ``scale_max`` is caught), up to ``limit`` combinations, then one field at a time. Runs
    before any trial."""
    if base.train.checkpoint_every or base.train.checkpoint_every_min:  # results, ASHA's rungs, PBT's checkpoints: epochs
        raise ValueError("--checkpoint-every/--checkpoint-every-min: sweeps checkpoint at epoch ends only (a trial's results, ASHA's rungs and "
                         "PBT's checkpoints are per epoch)")
    from mtl.runs import resolve_config  # (what a trial's run checks: the resolved model's rules too)

    space = tuple(space)
    for d in space:
        for v in d.values:
            try:
                resolve_config(base.with_values({d.path: v}))
            except ValueError as e:
                raise ValueError(f"--space {d.text}: {e}") from None
    if math.prod(len(d.values) for d in space) <= limit:
        for combo in itertools.product(*(d.values for d in space)):
            try:
                resolve_config(base.with_values({d.path: v for d, v in zip(space, combo)}))
            except ValueError as e:
                values = ", ".join(f"{d.name}={_text(v)}" for d, v in zip(space, combo))
                raise ValueError(f"--space: a trial may draw {values}, which is not a valid config: {e}") from None


CROP_FIELDS = ("data.crop", "data.scale_max", "data.augment")  # what decides whether a crop is filled (`crop_note`)


def check_crops(space: Iterable[Dim], base: ExperimentConfig, image_size: tuple[int, int] | None) -> None:
    """Every crop a trial may draw is filled by some zoom of the ``image_size`` images
    (`mtl.data.build.crop_note`, which a trial's run checks too); ValueError naming the values
    otherwise. A range's ends are checked (its smallest --scale-max matters)."""
    from mtl.data.build import crop_note

    drawn = {d.path: d for d in space if d.path in CROP_FIELDS}
    options = [drawn[p].values if p in drawn else (getattr(base.data, p.partition(".")[2]),) for p in CROP_FIELDS]
    for combo in itertools.product(*options):
        try:
            crop_note(base.with_values(dict(zip(CROP_FIELDS, combo))).data, image_size)
        except ValueError as e:
            values = ", ".join(f"{drawn[p].name}={_text(v, tuple[int, int])}" for p, v in zip(CROP_FIELDS, combo) if p in drawn)
            raise ValueError(f"--space: a trial may draw {values}: {e}" if values else str(e)) from None


def param_space(space: Iterable[Dim]) -> dict[str, Any]:
    """Tune's search space: one domain per dimension, under its name."""
    from ray import tune

    draw = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
            "choice": lambda v: tune.choice(list(v))}
    return {d.name: draw[d.kind](d.values) for d in space}


def hyperparameters(space: Iterable[Dim], config: dict[str, Any]) -> dict[str, Any]:
    """A trial's drawn values, by name, typed as the fields hold them."""
    return {d.name: d.typed(config[d.name]) for d in space if d.name in config}


def trial_config(base: ExperimentConfig, space: Iterable[Dim], hp: dict[str, Any], name: str, trials_url: str,
                 resume: bool = False) -> ExperimentConfig:
    """The base config with one trial's values of the swept fields (every other field as the
    base has it: defaults, --config file, flags); its Train run lives in ``trials_url/name``
    (``resume``: continue it)."""
    cfg = base.with_values({d.path: d.typed(hp[d.name]) for d in space if d.name in hp})
    return cfg.with_values({"train.out": trials_url, "train.name": name, "train.resume": resume}).validate()


def trial_name(arch: str, space: Iterable[Dim], hp: dict[str, Any], trial_id: str) -> str:
    """Descriptive, filesystem-safe, from the swept values: ``branched_lr3.2e-04_w0.58_s1.25_flip_3f2a1_00004``."""
    return "_".join([arch, *(d.tag(d.typed(hp[d.name])) for d in space if hp.get(d.name) is not None), trial_id])


# ------------------------------------------------------------------------- the sweep's mechanics

@dataclass(frozen=True)
class SweepConfig:
    """The sweep's flags (the training config's are the other flags of jobs/tune.py)."""

    sweep_name: str = "sweep"  # the sweep's folder under --out (results, trials); --resume continues it
    num_samples: int = 16  # trials (pbt: no more than run at once, its population)
    #: a swept field and its values, repeated for each: FIELD=loguniform:LOW:HIGH, FIELD=uniform:LOW:HIGH or
    #: FIELD=choice:A,B,... (tuple values joined with +), e.g. --space lr=loguniform:1e-5:1e-3 --space
    #: encoder=choice:resnet18,resnet34 (FIELD: name or path, lr or optim.lr; a flag only as --space=--lr=...);
    #: default: lr, semseg_weight, scale_max and hflip, less the ones given as flags
    space: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    #: what the sweep optimises: grader (mIoU - SI-logRMSE), score (a run's selection score: the grader, a
    #: single-task run's own metric, or -Δm with --baselines), or delta_m (multi-task performance against
    #: --baselines, the training flag every trial then reports Δm by; lower is better)
    metric: Metric = "grader"
    scheduler: Literal["asha", "pbt"] = "asha"  # asha: stop weak trials early; pbt: population-based training
    grace_period: int = 1  # ASHA: epochs every trial gets before it may be stopped
    reduction_factor: int = 2  # ASHA keeps the best 1/reduction_factor at each rung
    perturbation_interval: int = 2  # PBT: epochs between perturbations (weak trials copy a strong one's weights, values perturbed)
    quantile_fraction: float = 0.25  # PBT: the bottom fraction copies the top fraction
    pbt_sync: bool = False  # PBT: perturb when every trial has reached the interval (trials pause and restart there)
    max_concurrent: int | None = None  # trials at once; default: as many as the cluster's CPUs/GPUs hold
    search: Literal["random", "optuna", "hyperopt"] = "random"  # how trials are drawn (optuna/hyperopt: their packages)
    search_seed: int = 0  # seed of the draws (the random search's too: the same seed draws the same trials)

    def validate(self) -> "SweepConfig":
        """The mechanics (the space is checked against a training config: `check_space`)."""
        if self.num_samples < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("--num-samples >= 1, --grace-period >= 1 and --reduction-factor >= 2 are required")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be >= 1 (or not given: as many as the cluster holds), got {self.max_concurrent}")
        if self.perturbation_interval < 1 or not 0 < self.quantile_fraction <= 0.5:
            raise ValueError("--perturbation-interval >= 1 and 0 < --quantile-fraction <= 0.5 are required")
        if self.search_seed < 0:
            raise ValueError(f"--search-seed must be >= 0, got {self.search_seed}")
        if self.scheduler == "pbt" and self.search != "random":
            raise ValueError(f"--scheduler pbt draws its first values at random and then perturbs them: leave out --search "
                             f"{self.search}")
        if self.scheduler == "pbt":  # (the cluster's own limit is checked once Ray is connected)
            at_once = self.num_samples if self.max_concurrent is None else self.max_concurrent
            check_pbt_population(self.num_samples, at_once, f"--max-concurrent {self.max_concurrent}", "raise --max-concurrent")
        check_search_package(self.search)
        check_folder_name(self.sweep_name, "--sweep-name", "the sweep's folder is --out/<sweep-name>")
        return self


SCHEDULER_FIELDS = {"asha": ("grace_period", "reduction_factor"),
                    "pbt": ("perturbation_interval", "quantile_fraction", "pbt_sync")}  # (each scheduler's own flags)


def check_scheduler_flags(sweep: SweepConfig, argv: Sequence[str]) -> None:
    """ValueError for a flag of the other scheduler on the command line: it would be ignored."""
    other = "pbt" if sweep.scheduler == "asha" else "asha"
    given = given_fields(argv, SCHEDULER_FIELDS[other])
    if given:
        raise ValueError(f"{', '.join(flag(f) for f in given)} {'is' if len(given) == 1 else 'are'} for --scheduler {other}; "
                         f"this sweep runs --scheduler {sweep.scheduler}: leave {'it' if len(given) == 1 else 'them'} out")


def check_search_package(search: str) -> None:
    """``--search optuna``/``hyperopt`` needs that package: ValueError saying so, before Ray starts
    and before the sweep's folder is written (Ray's searchers fail with a bare assertion)."""
    import importlib.util

    if search != "random" and importlib.util.find_spec(search) is None:
        raise ValueError(f"--search {search} needs the {search} package, which is not installed: pip install {search}")


def check_pbt_population(num_samples: int, at_once: int, why: str, room: str) -> None:
    """PBT's population is the trials that run at once: Tune starts no new trial while that
    many are live (paused ones included), and PBT ranks live trials only. So more trials than
    run at once would start only as others finish, outside the population, and one trial at a
    time has no one to copy: both are refused with a ValueError naming the numbers (``why``:
    where ``at_once`` comes from; ``room``: how to allow more at once)."""
    if num_samples < 2:
        raise ValueError(f"--scheduler pbt compares trials that run side by side: --num-samples {num_samples} gives it none "
                         f"to compare; ask for 2 or more, or use --scheduler asha")
    if at_once < 2:
        raise ValueError(f"--scheduler pbt compares trials that run side by side, and only 1 runs at once ({why}): PBT would "
                         f"never perturb. Make room for 2 or more ({room}), or use --scheduler asha")
    if num_samples > at_once:
        raise ValueError(f"--scheduler pbt: its population is the trials that run at once, {at_once} here ({why}); "
                         f"--num-samples {num_samples} would start the other {num_samples - at_once} only as those finish, "
                         f"outside the population. Lower --num-samples to {at_once}, or make room for {num_samples} at once "
                         f"({room})")


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep runs, resolved and checked: the space, the objective, the scheduler. Stored
    as ``sweep.json`` in the sweep's folder (a resume must ask for the same) and handed to every
    trial."""

    space: tuple[Dim, ...]
    metric: Metric = "grader"
    baselines: tuple[str, ...] = ()
    scheduler: Literal["asha", "pbt"] = "asha"
    perturbation_interval: int = 2
    pbt_sync: bool = False
    quantile_fraction: float = 0.25
    grace_period: int = 1
    reduction_factor: int = 2
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> str:
        """The result key the scheduler reads."""
        return OBJECTIVES[self.metric][0]

    @property
    def mode(self) -> str:
        return OBJECTIVES[self.metric][1]

    @property
    def pbt(self) -> bool:
        return self.scheduler == "pbt"

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("space", "notes")}
        return {"space": [d.text for d in self.space], **{k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepSpec":
        d = dict(d)
        space = parse_space(d.pop("space"))
        return cls(space=space, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def differences(self, other: "SweepSpec") -> list[str]:
        a, b = self.to_dict(), other.to_dict()
        return [f"{k} {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b.get(k)]

    def pbt_mutations(self) -> dict[str, Any]:
        """PBT's ``hyperparam_mutations``: continuous fields as their Tune domain (perturbed by
        x0.8/x1.2 or redrawn, then clipped to the range: `clip`), choices as the list (an
        adjacent choice, or redrawn)."""
        from ray import tune

        draw = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v)}
        return {d.name: draw[d.kind](d.values) if d.continuous else list(d.values) for d in self.space}

    def clip(self, config: dict[str, Any]) -> dict[str, Any]:
        """A perturbed trial config with its continuous values back inside their ranges."""
        for d in self.space:
            if d.continuous and config.get(d.name) is not None:
                config[d.name] = min(max(float(config[d.name]), d.values[0]), d.values[1])
        return config


def plan_sweep(sweep: SweepConfig, base: ExperimentConfig, given: set[str]) -> SweepSpec:
    """The sweep the command line asks for, checked against the training config ``base``
    (``given``: the config fields whose flags were on the command line). ValueError naming
    the flags otherwise. Reads nothing (the baselines' folders, ``--baselines`` of the training
    config, are read by the caller)."""
    sweep.validate()
    notes = _check_flags(sweep, base, given)
    tasks = tuple(base.optim.tasks)
    space, space_notes = choose_space(sweep.space, given, tasks, base.data.augment, base)
    notes += space_notes
    if not base.train.resume and all(d.path != "data.augment" for d in space):  # (a resumed sweep's trials were new once)
        base.data.check_new()
    check_space(space, base)
    if sweep.metric in ("grader", "delta_m") and len(tasks) != 2:
        raise ValueError(f"--metric {sweep.metric} judges a multi-task run; these trials train --tasks {tasks[0]} only: "
                         f"use --metric score")
    if sweep.metric == "delta_m" and not base.train.baselines:
        raise ValueError("--metric delta_m needs --baselines: the run folders of a --tasks semseg and a --tasks depth run")
    if sweep.metric == "grader" and base.train.baselines:
        raise ValueError("--baselines judges every trial by Δm (its best.pt is its lowest-Δm epoch), so the sweep must too: "
                         "--metric delta_m (or --metric score, which is then -Δm)")
    if sweep.scheduler == "pbt":
        _check_pbt(space, base)
    return SweepSpec(space, sweep.metric, tuple(base.train.baselines), sweep.scheduler, sweep.perturbation_interval,
                     sweep.pbt_sync, sweep.quantile_fraction, sweep.grace_period, sweep.reduction_factor, tuple(notes))


def _check_flags(sweep: SweepConfig, base: ExperimentConfig, given: set[str]) -> list[str]:
    """Flags a sweep would not follow: ValueError naming them. ``--name`` (every trial's run is
    named after the trial), ``--data-moved``; a scheduler interval that leaves --epochs no room: ASHA's grace
    period must end before the last epoch (Ray refuses a longer one once it has started, and an
    equal one never stops a trial early), PBT's first perturbation must come before it (one at
    the last epoch has nothing left to train). A one-epoch sweep under ASHA (the defaults: grace
    period 1) runs every trial to its end: a note for the log says so."""
    if "train.name" in given:
        raise ValueError("--name: every trial's run is named after the trial (<out>/<sweep-name>/trials/<trial>): name the "
                         "sweep with --sweep-name")
    if "train.data_moved" in given:  # (each trial would need it only for its own first attempt after the move)
        raise ValueError("--data-moved continues one run (jobs/train.py --resume --name <run> --data-moved); a sweep cannot "
                         "continue on moved data: resume it where its data was")
    epochs = base.train.epochs
    if sweep.scheduler == "asha" and epochs == sweep.grace_period == 1:
        return ["--epochs 1: ASHA stops no trial early (it judges trials after their first epoch); every trial trains it"]
    if sweep.scheduler == "asha" and sweep.grace_period >= epochs:
        raise ValueError(f"--grace-period {sweep.grace_period} with --epochs {epochs}: ASHA stops trials early only after the "
                         f"grace period, which must end before the last epoch: --grace-period below {epochs}, or more --epochs")
    if sweep.scheduler == "pbt" and sweep.perturbation_interval >= epochs:
        raise ValueError(f"--perturbation-interval {sweep.perturbation_interval} with --epochs {epochs}: PBT would never "
                         f"perturb a trial before its last epoch: --perturbation-interval below {epochs}, or more --epochs")
    return []


def _check_pbt(space: tuple[Dim, ...], base: ExperimentConfig) -> None:
    mutable = ", ".join(p.rpartition(".")[2] for p in PBT_MUTABLE)
    for d in space:
        if d.path not in PBT_MUTABLE:
            raise ValueError(f"--scheduler pbt cannot sweep {d.name} (--space {d.text}): PBT changes the swept values in the "
                             f"middle of a trial, which continues from another trial's weights and optimizer state, and "
                             f"{d.flag} cannot change there (PBT can change {mutable}). Sweep {d.name} with --scheduler asha, "
                             f"or fix it with {d.flag}")
    if any(d.path == "optim.semseg_weight" for d in space) and base.optim.task_weighting != "fixed":
        raise ValueError(f"--scheduler pbt would perturb semseg_weight, which weighs the losses only with --task-weighting "
                         f"fixed (it is {base.optim.task_weighting})")
