"""Command lines made from typed dataclasses (tyro), the same way for every tool in ``jobs/`` and
``data_prep/``.

A tool describes its flags as a frozen dataclass; `parse` turns argv into an instance of it:

* flags are flat (``--lr``, not ``--optim.lr``): the field names of `mtl.config` are unique
  across its parts, and stay what README, docs and cluster configs use;
* a field's comment is its help, a Literal type its choices (the model parts' choices come from
  `mtl.zoo_names`, the registries' one list); ``tuple[int, int]`` fields are sizes, given as
  ``HxW`` and read by `mtl.config.parse_size`;
* a field whose default is None keeps it unless given (there is no ``None`` to type);
  ``bool | None`` becomes a ``--x/--no-x`` pair that leaves None when neither is given;
* a bad flag is one usage line and ``prog: error: <message naming the flag>`` (exit 2), as
  argparse does, instead of tyro's framed box: scripts and tests read these lines.

`parse_experiment` adds what every command carrying an `ExperimentConfig` shares: ``--config
FILE`` (JSON, or YAML with pyyaml; a run's own ``config.json`` included) or a preset as the
starting point, flags on top, and `ExperimentConfig.validate` before anything starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from typing import Annotated, Any, Callable, Iterable, Sequence, TypeVar

import tyro
from tyro import _errors as tyro_errors  # the parse-error hook: private, so pyproject pins tyro to 1.0.x
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

from mtl.config import ExperimentConfig, changed_fields, flag, parse_size

T = TypeVar("T")

# The type of a command's ``experiment`` field: its flags carry no prefix and its help groups are
# named after the config's parts (data, model, optim, train, dist).
FlatExperiment = Annotated[ExperimentConfig, tyro.conf.arg(name="")]

MARKERS = (tyro.conf.OmitArgPrefixes, tyro.conf.DisallowNone)
REGISTRY = ConstructorRegistry()


@REGISTRY.primitive_rule
def _size_rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    """``tuple[int, int]`` (`mtl.config.Size`) is one ``HxW`` token on the command line."""
    if typing.get_origin(info.type) is not tuple or typing.get_args(info.type) != (int, int):
        return None
    return PrimitiveConstructorSpec(
        nargs=1, metavar="HxW", instance_from_str=lambda args: parse_size(args[0], what=""),
        is_instance=lambda x: isinstance(x, tuple) and len(x) == 2, str_from_instance=lambda x: [f"{x[0]}x{x[1]}"])


class UsageError(Exception):
    """A rejected command line, as the one line `parse` prints."""


def _flag(argument: Any) -> str:
    """The flag an error names: tyro lists aliases first and the field's own flag last (for a
    ``--x/--no-x`` pair, ``--x``)."""
    flags = argument.lowered.name_or_flags
    return [f for f in flags if not f.startswith("--no-")][-1] if len(flags) > 1 else flags[0]


def _message(event: Any) -> str | None:
    """One line for a tyro parse failure; None leaves the rarer kinds to tyro's own output."""
    if isinstance(event, tyro_errors.InvalidChoice):
        allowed = [c for c in event.choices if c != "None"]
        if all(c.isdigit() for c in allowed):  # a union of numbers comes back shuffled
            allowed = sorted(allowed, key=int)
        allowed = ", ".join(allowed)
        return f"{_flag(event.argument)} must be one of {allowed}; got {event.value!r}"
    if isinstance(event, tyro_errors.InstantiationFailure):
        name = _flag(event.argument) if event.argument is not None else "a flag"
        # an optional field lists what each member of its union said: the last one is the value's type
        why = [ln.strip() for ln in event.message.splitlines() if ln.strip()][-1]
        why = why.partition(": ")[2] if why.startswith("- ") else why
        return f"{name} {why}" if why.startswith("must") else f"{name}: {why}"
    if isinstance(event, tyro_errors.BadValue):
        return _too_few(event.argument) if event.reason == "too_few_values" else \
            f"{_flag(event.argument)} cannot be given {event.offending_value!r}"
    if isinstance(event, tyro_errors.UnrecognizedArgs):
        return f"unrecognized arguments: {' '.join(event.tokens)}"
    if isinstance(event, tyro_errors.MissingArgs):
        return "the following arguments are required: " + ", ".join(_flag(a.arg) for a in event.missing_arguments)
    return None


def _too_few(argument: Any) -> str:
    """``--synthetic-counts expects 3 values (INT INT INT)``: how many a flag of several takes."""
    nargs, metavar = argument.lowered.nargs, argument.lowered.metavar
    if isinstance(nargs, int) and nargs > 1:
        return f"{_flag(argument)} expects {nargs} values ({metavar})"
    return f"{_flag(argument)} expects a value"


def _raise_usage_error(event: Any) -> None:
    message = _message(event)
    if message is not None:
        raise UsageError(message)


def usage_error(message: str, prog: str | None = None) -> None:
    """Print argparse's two lines (usage, then ``prog: error: message``) and exit with 2."""
    prog = prog or os.path.basename(sys.argv[0])
    print(f"usage: {prog} [-h] [OPTIONS]\n{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _unwrap(doc: str | None) -> str | None:
    """A module docstring as a help description. tyro joins a line that starts with a letter to
    the previous one, so each paragraph of prose becomes one line first; indented lines
    (examples) stay as they are, right under the text that introduces them."""
    if doc is None:
        return None
    out = ""
    for p in doc.strip().split("\n\n"):
        has_example = any(ln.startswith(" ") for ln in p.splitlines())
        out += ("\n" if p.startswith(" ") else "\n\n") if out else ""
        out += p if has_example else " ".join(ln.strip() for ln in p.splitlines())
    return out


def parse(cls: type[T], argv: Sequence[str] | None = None, *, description: str | None = None, default: T | None = None,
          check: Callable[[T], Any] | None = None, prog: str | None = None) -> T:
    """An instance of the dataclass ``cls`` from ``argv`` (default: ``sys.argv[1:]``): fields
    start from ``default`` (else their own defaults), flags override them. ``check`` runs on the
    result; a ValueError from it is a usage error like a bad flag."""
    kwargs = {} if default is None else {"default": default}
    prog = prog or os.path.basename(sys.argv[0])
    try:
        with tyro_errors.on_parse_error(_raise_usage_error):
            out = tyro.cli(cls, args=sys.argv[1:] if argv is None else list(argv), prog=prog, description=_unwrap(description),
                           config=MARKERS, registry=REGISTRY, **kwargs)
        if check is not None:
            check(out)
    except (UsageError, ValueError) as e:
        usage_error(str(e), prog)
    return out


# --------------------------------------------------------------------- commands with a training config

_CONFIG_FILE = "this config file (JSON, or YAML with pyyaml; local or fsspec URL), e.g. a run's config.json"
CONFIG_HELP = f"start from {_CONFIG_FILE}: with --resume it continues that run; flags given override the file"
SWEEP_CONFIG_HELP = f"the trials' base configuration from {_CONFIG_FILE}; flags given override the file, --space sweeps over it"


def read_config(url: str) -> ExperimentConfig:
    """An `ExperimentConfig` from a JSON or YAML file; keys left out keep their defaults (a run's
    own config.json: their values from before they existed)."""
    from mtl.storage import read_bytes

    data = read_bytes(url)
    if data is None:
        raise FileNotFoundError(f"--config {url}: no such file")
    if url.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {url}: YAML needs pyyaml (pip install pyyaml), or give JSON") from None
        try:
            tree = yaml.safe_load(data)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {url} is not YAML ({e})") from None
    else:
        try:
            tree = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {url} is not JSON ({e})") from None
    try:
        if isinstance(tree, dict) and _is_run_config(url, tree):
            from mtl.runs import stored_config

            return _where_it_is(stored_config(tree).validate(), url)
        return ExperimentConfig.from_dict(tree or {}).validate()
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"--config {url}: not a valid streetmtl config: {e}") from None


def _where_it_is(cfg: ExperimentConfig, url: str) -> ExperimentConfig:
    """A run's config.json as read where its run folder is now: ``--out`` is the folder above it
    (a run folder moved or copied elsewhere continues there), while that folder bears the run's
    name; else the ``--out`` it names."""
    folder = url.rstrip("/").rpartition("/")[0]
    parent, _, name = folder.rpartition("/")
    if name != cfg.train.name or not parent:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out=parent))


def _is_run_config(url: str, tree: dict) -> bool:
    """A run's own ``config.json`` (it names the run): settings it lacks predate it and take
    their values from before they existed (`mtl.runs.stored_config`), not today's defaults."""
    from mtl.runs import CONFIG_FILE

    train = tree.get("train")
    return url.rstrip("/").rsplit("/", 1)[-1] == CONFIG_FILE and isinstance(train, dict) and bool(train.get("name"))


def _given(argv: Sequence[str], name: str) -> str | bool | None:
    """The value of ``--name VALUE`` / ``--name=VALUE`` in ``argv`` (True for a bare switch with
    no value), None when absent: the starting point has to be known before the flags are read."""
    for i, tok in enumerate(argv):
        if tok == name:
            return argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
        if tok.startswith(name + "="):
            return tok.partition("=")[2]
    return None


def given_fields(argv: Sequence[str], paths: Iterable[str]) -> list[str]:
    """Those of the config fields ``paths`` (``optim.lr``) whose flags are on the command line
    (``--lr 3e-4``, ``--lr=3e-4``, ``--no-hflip``; with underscores too, as the parser takes
    them: ``--semseg_weight``)."""
    flags = {tok.split("=", 1)[0].replace("_", "-") for tok in argv if tok.startswith("--")}
    dashed = {path: path.rpartition(".")[2].replace("_", "-") for path in paths}
    return [path for path, d in dashed.items() if {f"--{d}", f"--no-{d}"} & flags]


def idle_flags_given(cfg: ExperimentConfig, argv: Sequence[str], where: str = "this run") -> str | None:
    """What is wrong with a setting given with a value other than its default for a method this
    run does not use (`mtl.runs.idle_fields`), by a flag or by the ``--config`` file, else None: it
    would be ignored, and name another run than the same training without it. Not for a resume: a
    run an earlier version started with such a value is named by it, and continues with it."""
    from mtl.runs import field_value, idle_reasons

    if cfg.train.resume:
        return None
    reasons = idle_reasons(cfg)
    flags = given_fields(argv, reasons)
    url = _given(argv, "--config")
    from_file = [p for p in reasons if p not in flags] if isinstance(url, str) else []
    defaults = ExperimentConfig()
    given = [p for p in [*flags, *from_file] if field_value(cfg, p) != field_value(defaults, p)]
    if not given:
        return None
    p = given[0]
    said = _as_flag(p, field_value(cfg, p))
    if p in flags:
        return f"{said} changes nothing in {where}: {reasons[p]}; leave it out"
    return (f"{said} (from --config {url}) changes nothing in {where}: {reasons[p]}; give {_as_flag(p, field_value(defaults, p))} "
            "(its default) or remove it from the file")


def _as_flag(path: str, value: Any) -> str:
    """How a command line gives field ``path`` the ``value``: ``--momentum 0.5``, ``--no-hflip``."""
    name = path.rpartition(".")[2]
    return flag(name if value is not False else f"no_{name}") + ("" if isinstance(value, bool) else f" {value:g}")


def starting_point(argv: Sequence[str], presets: dict[str, ExperimentConfig]) -> ExperimentConfig:
    """What the flags of a command override: ``--config FILE``, else a preset switched on
    (``--quick``), else the defaults. A file and a preset together are refused: which would win
    is not obvious."""
    url = _given(argv, "--config")
    chosen = [name for name in presets if _given(argv, "--" + name) is True]
    if url is not None and chosen:
        raise ValueError(f"--config and --{chosen[0]} both give a starting configuration: give one")
    if url is True:
        raise ValueError("--config expects a value")
    if url is not None:
        return _unpin_derived(read_config(url))
    return presets[chosen[0]] if chosen else ExperimentConfig()


def _unpin_derived(cfg: ExperimentConfig) -> ExperimentConfig:
    """A config file as the flags' starting point. A run's config.json records its name, its
    resolved model and whether it was resumed; fed back unchanged it derives the same name (so
    ``--resume`` continues that run), while flags that change training name a new run instead of
    reusing the old folder under a stale name, and another ``--arch`` or ``--output-stride`` gets
    its own defaults (`mtl.models.architectures.unpin_derived`). Whether to resume is the
    command's flag alone: a resumed run's file would otherwise continue a folder nobody named
    with ``--resume``, or refuse a new run ("nothing to resume")."""
    from mtl.models.architectures import unpin_derived
    from mtl.runs import run_name

    cfg = dataclasses.replace(cfg, model=unpin_derived(cfg.model), train=dataclasses.replace(cfg.train, resume=False))
    unnamed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, name=None))
    return unnamed if cfg.train.name and run_name(unnamed) == cfg.train.name else cfg


def preset_help(preset: ExperimentConfig) -> str:
    """``--epochs 4, ...``: how a preset differs from the defaults, for its flag's help (sizes HxW)."""
    def shown(v: Any) -> str:
        if isinstance(v, (tuple, list)):
            return "x".join(map(str, v)) if len(v) == 2 and all(isinstance(x, int) for x in v) else " ".join(map(str, v))
        return str(v)

    return ", ".join(f"{flag(k.rpartition('.')[2])} {shown(v)}" for k, v in changed_fields(preset).items())


def parse_experiment(cls: type[T], argv: Sequence[str] | None = None, *, description: str | None = None,
                     presets: dict[str, ExperimentConfig] | None = None, check: Callable[[T], Any] | None = None) -> T:
    """`parse` for a command dataclass with an ``experiment: ExperimentConfig`` field (its
    flags flat) and a ``config`` field (``--config FILE``): the experiment starts from
    `starting_point` and is validated; ``check`` adds the command's own rules."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from mtl.errors import USER_ERRORS, one_line

    try:
        base = starting_point(argv, presets or {})
    except USER_ERRORS as e:  # a missing, unreachable or broken file
        usage_error(one_line(e))

    def validate(cmd: T) -> None:
        cmd.experiment.validate()  # type: ignore[attr-defined]
        if check is not None:
            check(cmd)

    cmd = parse(cls, argv, description=description, default=cls(experiment=base), check=validate)
    renamed = _new_run_name(base, cmd.experiment, argv)  # type: ignore[attr-defined]
    return cmd if renamed is None else dataclasses.replace(cmd, experiment=renamed)  # type: ignore[type-var]


def _new_run_name(start: ExperimentConfig, cfg: ExperimentConfig, argv: Sequence[str]) -> ExperimentConfig | None:
    """``cfg`` without the name it took from its starting point, when the flags train something
    else and name no run: a run's config.json whose name is not derived (``--name``, or a run
    trained longer with ``--resume --epochs``: `_unpin_derived` keeps it) with another ``--lr``
    is a new run under a name of its own, not that folder's run refused. With ``--resume`` the
    name stays: the resume then names what it refuses. None: as it is."""
    from mtl.runs import RESUMABLE_CHANGES, config_diff

    name = start.train.name
    if not name or cfg.train.name != name or cfg.train.resume or _given(argv, "--name") is not None:
        return None
    if not config_diff(start, cfg, ignore=RESUMABLE_CHANGES):
        return None
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, name=None))
