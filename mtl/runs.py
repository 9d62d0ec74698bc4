"""Run identity and the run folder: the one owner of run names, run URLs and ``config.json``.

A run lives in ``<out>/<name>/`` (a local folder or an s3:// prefix) in every mode. Its name is
descriptive and ends with a short hash of everything that changes what is trained (the
*identity*: the resolved config without its `operational` fields), so two configurations never
share a folder by accident — 4e-4 and 4.4e-4 are different runs even where the readable part
rounds. ``config.json`` (the resolved config) is written by the trainer's rank 0 once the data
is found, before the first step.

A folder that already holds a run is only reused with ``--resume``, and only when the stored
configuration agrees with the requested one in every identity field except those in
`RESUMABLE_CHANGES`; otherwise the refusal lists the fields that differ. Local runs and Ray runs
follow the same rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

from mtl.checkpoint import CHECKPOINTS, CheckpointIndex, inside_epoch, tag_epoch
from mtl.config import DataConfig, ExperimentConfig, ModelConfig, flag
from mtl.lease import LEASE_FILE
from mtl.models import deep_supervised, resolve
from mtl.storage import canonical, folder_names, is_local, location, same_place, read_bytes, storage_errors, url_to_fs, write_bytes_atomic

CONFIG_FILE = "config.json"
# Ray Train's record of the checkpoints it registered, in the run folder (`mtl.distributed.ray_train`)
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
# identity fields a resume may change: more (or fewer) epochs extend the run; the LR plan is
# then recomputed for the new length, and the resume says so. They stay in the run's name and
# hash (a 16-epoch run is another recipe than an 8-epoch one), so extending a run names it:
# --resume --name <run> --epochs N
RESUMABLE_CHANGES = frozenset({"train.epochs"})
# identity fields added after runs already existed: left out of the identity (name hash, resume
# check) while they hold these values, the behaviour before they existed, so earlier runs keep
# their names and can be resumed; a stored config without one holds that value (`stored_config`)
LATER_FIELDS = {"optim.tasks": ["semseg", "depth"], "optim.task_weighting": "fixed", "optim.weighting_lr": 0.025,
                "optim.dwa_temperature": 2.0, "train.baselines": [], "model.dilated_convs": "all",
                "optim.weight_decay_style": "decoupled", "optim.deep_supervision": "sum"}


class RunConflict(ValueError):
    """A run folder that cannot be used for the requested run (exists, missing, or differs)."""


def resolve_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Defaults filled in: the architecture's model defaults and the run name. ValueError for
    what only the resolved model shows (`check_batch_for_model`)."""
    cfg = absolute_paths(dataclasses.replace(cfg.validate(), model=resolve(cfg.model)))
    check_batch_for_model(cfg.train.batch_size, cfg.model)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, name=run_name(cfg)))


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """The run folders a config names (``--baselines``) as absolute URLs: Ray runs every worker
    and every sweep trial in a folder of its own, where a relative path means nothing (and
    ``runs/x`` and ``./runs/x`` would give two run names)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, baselines=tuple(out_root(b) for b in cfg.train.baselines)))


def check_batch_for_model(batch_size: int, model: ModelConfig) -> None:
    """ASPP and vortex pooling normalise their image-pooling branch over the batch (one value
    per channel and image), which training cannot do with one image per process."""
    pooled = [c for c in (model.semseg_context, model.depth_context) if c in ("aspp", "vortex")]
    if batch_size == 1 and pooled:
        raise ValueError(f"--batch-size 1: the {pooled[0]} context module normalises its image-pooling branch over the "
                         f"batch, which needs 2 or more images per process (use --grad-accum to fit memory), or "
                         f"--semseg-context/--depth-context none")


def identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """``{"optim.lr": 0.0004, ...}``: every field of the resolved config that changes training."""
    cfg = resolve_model(cfg)
    flat: dict[str, Any] = {}
    for part in dataclasses.fields(cfg):
        sub = getattr(cfg, part.name)
        for f in dataclasses.fields(sub):
            if not f.metadata.get("operational"):
                v = getattr(sub, f.name)
                flat[f"{part.name}.{f.name}"] = list(v) if isinstance(v, tuple) else v
    for k in ("data.root", "data.shards"):  # (``--root data/`` trains what ``--root data`` does: one name)
        if isinstance(flat.get(k), str):
            flat[k] = canonical(flat[k])
    for k, default in LATER_FIELDS.items():
        if flat.get(k) == default:
            del flat[k]
    for k in unused_fields(cfg):
        flat.pop(k, None)
    return flat


def data_location(d: DataConfig) -> str | None:
    """Where the data a config names is (`mtl.storage.location`: a relative --root read from here
    made absolute, a manifest's URL its prefix); None for the synthetic set, which its settings
    name wherever its cache is."""
    return location(d.shards) if d.shards else location(d.root) if d.root else None


def same_kind(a: DataConfig, b: DataConfig) -> bool:
    """Whether two configs read the same kind of data: a folder, shards, or the synthetic set."""
    return (bool(a.shards), bool(a.root)) == (bool(b.shards), bool(b.root))


def same_data(a: DataConfig, b: DataConfig) -> bool:
    """Whether two configs train and validate on one data set, as far as can be told here
    (`mtl.storage.same_place`; the synthetic set by its settings)."""
    if not same_kind(a, b):
        return False
    if a.shards or a.root:
        return same_place(a.shards or a.root, b.shards or b.root)
    return (a.synthetic_size, a.synthetic_counts) == (b.synthetic_size, b.synthetic_counts)


def data_place(d: DataConfig) -> str:
    """The data a config trains and validates on, as messages name it (the path as given)."""
    if d.shards or d.root:
        return f"{'--shards' if d.shards else '--root'} {canonical(d.shards or d.root)}"
    (h, w), counts = d.synthetic_size, " ".join(map(str, d.synthetic_counts))
    return f"the synthetic set of --synthetic-size {h}x{w} --synthetic-counts {counts}"


def unused_fields(cfg: ExperimentConfig) -> set[str]:
    """Fields that change nothing in this (resolved) config: the encoder's dilation when no
    stage is dilated (output stride 32), Adam's weight decay style under SGD, how several
    outputs' losses combine for an architecture with one output per task, the synthetic set's
    settings when data is given."""
    unused = {"model.dilated_convs"} if cfg.model.output_stride == 32 else set()
    unused |= {"optim.weight_decay_style"} if cfg.optim.optimizer == "sgd" else set()
    unused |= set() if deep_supervised(cfg.model.arch) else {"optim.deep_supervision"}
    return unused | ({"data.synthetic_size", "data.synthetic_counts"} if cfg.data.root or cfg.data.shards else set())


def idle_fields(cfg: ExperimentConfig) -> set[str]:
    """Fields of a method this config does not use: SGD's momentum under Adam, ZeRO's stage
    under DDP, a learned or DWA weighting's settings under another weighting, the loss weight of
    one task, the shard stream's buffer on a folder, the augmentation's settings without it.
    Another value trains the same: `config_diff` does not count them, and a new run refuses them
    (`mtl.cli.idle_flags_given`). They stay in `identity`, unlike `unused_fields`: a run named with
    such a value by an earlier version keeps its name."""
    return set(idle_reasons(cfg))


def idle_reasons(cfg: ExperimentConfig) -> dict[str, str]:
    """`idle_fields`, each with why (what would use it)."""
    o, d = cfg.optim, cfg.data
    idle = {"dist.zero_stage": "it is DeepSpeed's (--strategy deepspeed)"} if cfg.dist.strategy != "deepspeed" else {}
    idle |= {"optim.momentum": "it is SGD's (--optimizer sgd)"} if o.optimizer != "sgd" else {}
    idle |= {"optim.dwa_temperature": "it is DWA's (--task-weighting dwa)"} if o.task_weighting != "dwa" else {}
    idle |= ({"optim.weighting_lr": "it is the learned weightings' (--task-weighting uncertainty or famo)"}
             if o.task_weighting not in ("uncertainty", "famo") else {})
    idle |= {"optim.semseg_weight": "it weighs two tasks' losses, and this run trains one"} if len(o.tasks) == 1 else {}
    idle |= {"data.shuffle_buffer": "it is the shard stream's (--shards)"} if not d.shards else {}
    augment = "it is the augmentation's, which --no-augment turns off"
    return idle | (dict.fromkeys(["data.hflip", "data.scale_min", "data.scale_max"], augment) if not d.augment else {})


def stored_config(d: dict[str, Any]) -> ExperimentConfig:
    """The config a run stored (``config.json``, a checkpoint's, a sweep's base), whichever version
    of streetmtl wrote it: a field it lacks holds its value from before the field existed
    (`LATER_FIELDS`), not today's default, so an old run rebuilds the network it trained."""
    if not isinstance(d, dict):
        raise TypeError(f"a config is a mapping of its parts, got {type(d).__name__}")
    d = {part: dict(v) if isinstance(v, dict) else v for part, v in d.items()}
    for path, before in LATER_FIELDS.items():
        part, _, name = path.partition(".")
        if isinstance(d.get(part), dict):
            d[part].setdefault(name, before)
    return ExperimentConfig.from_dict(d)


def config_hash(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True).encode()).hexdigest()[:8]


def _short_float(x: float) -> str:
    """4e-4 -> '4e-4', 4.4e-4 -> '4.4e-4', 0.01 -> '1e-2'."""
    mantissa, exp = f"{x:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def run_name(cfg: ExperimentConfig) -> str:
    """``--name``, else e.g. ``branched_resnet34_os16_adam-lr4e-4_w0.5_bs16_e16-3f2a1c9d`` (``w0.5-famo``
    with another task weighting, ``semseg-only`` for a single-task run)."""
    if cfg.train.name:
        return cfg.train.name
    m, o, t = resolve(cfg.model), cfg.optim, cfg.train
    if len(o.tasks) == 1:
        weighting = f"{o.tasks[0]}-only"
    else:
        weighting = f"w{o.semseg_weight:g}" + ("" if o.task_weighting == "fixed" else f"-{o.task_weighting}")
    return (f"{m.arch}_{m.encoder}_os{m.output_stride}_{o.optimizer}-lr{_short_float(o.lr)}_{weighting}_"
            f"bs{t.batch_size}_e{t.epochs}-{config_hash(cfg)}")


def out_root(out: str) -> str:
    """Where runs live, as an absolute URL (Ray's storage needs absolute local paths)."""
    out = out.rstrip("/")
    return out if "://" in out else os.path.abspath(out)


def run_url(cfg: ExperimentConfig) -> str:
    return f"{out_root(cfg.train.out)}/{run_name(cfg)}"


def config_diff(old: ExperimentConfig, new: ExperimentConfig, ignore: frozenset[str] = frozenset(),
                idle: bool = False) -> list[str]:
    """Identity fields that differ, as ``"optim.lr 0.0004 -> 0.00044"`` (the settings of methods
    both leave unused, `idle_fields`, only when ``idle``: they train the same). A data place spelt
    otherwise is the same place (`mtl.storage.same_place`: ``data/x`` and its absolute path, a
    manifest's URL and its prefix); whether it is still where the run trained, its checkpoints
    say (`mtl.engine.check_resumable`)."""
    a, b = identity(old), identity(new)
    skip = ignore | unused_fields(resolve_model(old)) | unused_fields(resolve_model(new))  # (meaningless on one side)
    skip |= set() if idle else idle_fields(old) & idle_fields(new)  # (another value trains the same; ``idle``: count them)
    for k in ("data.root", "data.shards"):
        if isinstance(a.get(k), str) and isinstance(b.get(k), str) and same_place(a[k], b[k]):
            skip |= {k}
    return [f"{k} {field_value(old, k)!r} -> {field_value(new, k)!r}" for k in sorted(set(a) | set(b))
            if k not in skip and a.get(k) != b.get(k)]


def resolve_model(cfg: ExperimentConfig) -> ExperimentConfig:
    return dataclasses.replace(cfg, model=resolve(cfg.model))


def field_value(cfg: ExperimentConfig, path: str) -> Any:
    """The value of field ``path`` ("model.dilated_convs") of the resolved ``cfg``, as `identity`
    writes values (lists for tuples); also where `identity` leaves the field out."""
    part, _, name = path.partition(".")
    sub = resolve(cfg.model) if part == "model" else getattr(cfg, part)
    v = getattr(sub, name)
    return list(v) if isinstance(v, tuple) else v


class RunFolder:
    """``<out>/<name>/``: what it holds (``config.json``, checkpoints of either layout)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def entries(self) -> list[str]:
        """What the folder holds, but its driver's lease (`mtl.lease`: there while a driver runs)."""
        return [n for n in folder_names(self.url) if not n.startswith(LEASE_FILE)]  # (with its renewal's temporary file)

    def has_checkpoint(self, entries: list[str] | None = None) -> bool:
        """A checkpoint to continue from (``checkpoints/latest.json``, in every mode).
        ``entries``: the folder's listing when the caller has it already."""
        return self.latest_tag(entries) is not None

    def latest_tag(self, entries: list[str] | None = None) -> str | None:
        """The checkpoint ``checkpoints/latest.json`` names, else None."""
        entries = self.entries() if entries is None else entries
        return CheckpointIndex(self.url).latest_tag() if CHECKPOINTS in entries else None

    def ray_checkpoint(self, entries: list[str]) -> str | None:
        """The latest checkpoint Ray's record names (when its folder is there), else None. Ahead
        of the pointer when Ray took a report and the run's rank 0 died before moving
        ``latest.json`` (a Ray restart moves it, `mtl.distributed.ray_train.RayStorage.latest`)."""
        if RAY_SNAPSHOT not in entries:
            return None
        try:
            latest = json.loads(read_bytes(f"{self.url}/{RAY_SNAPSHOT}") or b"{}").get("latest_checkpoint_result") or {}
        except ValueError:
            return None  # (Ray's own file: Ray judges it when the run starts)
        name = latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None
        if not (isinstance(name, str) and name.startswith(f"{CHECKPOINTS}/")):
            return None
        tag = name.rstrip("/").rsplit("/", 1)[-1]
        with storage_errors(self.url):
            fs, path = url_to_fs(f"{self.url}/{CHECKPOINTS}/{tag}")
            return tag if fs.exists(path) else None  # (a stale record: Ray drops it when the run starts)

    def has_old_layout(self, entries: list[str]) -> bool:
        """Checkpoints as Ray runs wrote them before the one layout (``epoch-NNNN/``, ``final.pt``):
        `mtl.checkpoint.load_checkpoint` reads them, a resume cannot continue them."""
        return any(e.startswith("epoch-") for e in entries) or "final.pt" in entries

    def read_config(self) -> ExperimentConfig | None:
        data = read_bytes(f"{self.url}/{CONFIG_FILE}")
        if data is None:
            return None
        try:
            return stored_config(json.loads(data))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self.url}/{CONFIG_FILE} is not a streetmtl config ({e})") from e

    def write_config(self, cfg: ExperimentConfig) -> None:
        """``config.json``, synced, as ``--config`` feeds it back from any folder: local places
        (``--root``, ``--shards``, ``--out``) absolute, as the checkpoints record the data
        (`data_location`: a relative path meant where the run was started); without the
        command's switches, ``--resume`` (the command's alone, `mtl.cli`) and ``--data-moved``
        (the move it allowed is done: the saved config continues the run at the new place)."""
        local = {f"data.{k}": location(getattr(cfg.data, k)) for k in ("root", "shards")
                 if getattr(cfg.data, k) and is_local(getattr(cfg.data, k))}
        out = {"train.out": out_root(cfg.train.out)} if is_local(cfg.train.out) else {}
        cfg = cfg.with_values({"train.data_moved": False, "train.resume": False, **local, **out})
        # (synced: --resume needs it, and a power loss must not leave it empty beside a whole checkpoint)
        write_bytes_atomic(f"{self.url}/{CONFIG_FILE}", (cfg.to_json() + "\n").encode(), sync=True)


def prepare_run(cfg: ExperimentConfig, log: Callable[[str], None] = print, local: bool = False,
                check_new: bool = True) -> ExperimentConfig:
    """Check that the run folder may be used as asked; returns the resolved config. Raises
    `RunConflict` otherwise. Writes nothing (the trainer writes ``config.json`` once the data
    is found).

    * no folder: a new run (``--resume``: nothing to resume, with a hint at similar runs), which
      must pass `DataConfig.check_new` (``check_new``: a sweep's plan checked its trials);
    * a folder with a checkpoint: only ``--resume`` continues it (one that only Ray's record
      names: only on Ray, not ``local``);
    * a folder without one (the run stopped before its first epoch ended, say on a corrupt file
      or out of memory): it starts over, with another configuration too (said).
    With a checkpoint the stored configuration must match (`check_same_training`).
    """
    cfg = resolve_config(cfg)
    folder = RunFolder(run_url(cfg))
    entries = folder.entries()
    if not entries:
        if cfg.train.resume:
            raise RunConflict(f"nothing to resume at {folder.url}" + _similar_runs_hint(cfg))
        if check_new:
            cfg.data.check_new()
        return cfg
    stored = folder.read_config()
    if folder.has_old_layout(entries):
        raise RunConflict(f"run folder {folder.url} holds checkpoints in the layout of earlier versions (epoch-NNNN/ at its "
                          f"top): jobs/evaluate.py reads them, but a run cannot continue them; choose another --name/--out")
    pointer = folder.latest_tag(entries)
    has, ray_ahead = pointer is not None, _ray_ahead(folder, entries, pointer)
    if ray_ahead and local:  # (a local run would resume the older one and delete this one at its first commit)
        raise RunConflict(f"run folder {folder.url} has checkpoint {ray_ahead} in Ray's record, newer than its latest.json "
                          f"names (the run's rank 0 died before moving it): continue it on Ray (--resume, without --local), "
                          f"which moves latest.json to it")
    if not (has or ray_ahead):  # (nothing trained is kept: it may start over as asked, e.g. with its data mended)
        changed = config_diff(stored, cfg) if stored is not None else []
        log(f"run folder {folder.url} has no checkpoint yet (it stopped before its first epoch ended): starting it over"
            + (f" with {'; '.join(changed)}" if changed else ""))
        if check_new:
            cfg.data.check_new()
        return cfg
    moved = moved_data(stored, cfg)
    if not cfg.train.resume:
        differ = config_diff(stored, cfg, ignore=RESUMABLE_CHANGES | moved) if stored is not None else []
        raise RunConflict(f"run folder {folder.url} already holds a run with checkpoints"
                          + (f", trained with another configuration ({'; '.join(differ)}): choose another --name/--out for "
                             f"the new run" if differ else ": pass --resume to continue it, or choose another --name/--out "
                                                            "for a new run"))
    if stored is not None:
        check_same_training(stored, cfg, f"run {folder.url}", moved)
    newest = max(t for t in (pointer, ray_ahead) if t is not None)
    check_length(cfg.train.epochs, tag_epoch(newest) or 0, inside_epoch(newest), f"{folder.url}/{CHECKPOINTS}/{newest}")
    changed = config_diff(stored, cfg, moved) if stored is not None else []
    if changed:
        log(f"resuming with changed {', '.join(changed)}: the LR plan is recomputed for the new length")
    return cfg


def moved_data(stored: ExperimentConfig | None, cfg: ExperimentConfig) -> frozenset[str]:
    """The data fields a resume with ``--data-moved`` may change: the place of data of the kind
    the run trained on (a folder stays a folder, shards stay shards); where its checkpoints say
    it trained decides the rest (`mtl.engine.check_resumable`)."""
    if not cfg.train.data_moved or stored is None or not same_kind(stored.data, cfg.data):
        return frozenset()
    return frozenset({"data.root", "data.shards"}) if cfg.data.shards or cfg.data.root else frozenset()


def check_length(epochs: int, done: int, inside: bool, where: str) -> None:
    """A resume may not end a run before the epochs its checkpoint ``where`` has begun: ``done``
    epochs, and part of the next when it is a step checkpoint (``inside``). The run folder would
    describe a shorter run than its checkpoints hold, and nothing would be trained."""
    begun = done + (1 if inside else 0)
    if epochs < begun:
        trained = f"{done} epochs and part of epoch {begun}" if inside else f"{done} epochs"
        raise RunConflict(f"resume refused: --epochs {epochs}, but {where} has trained {trained} already (--epochs {begun} or "
                          f"more continues it)")


def _ray_ahead(folder: RunFolder, entries: list[str], pointer: str | None) -> str | None:
    """The checkpoint Ray's record names when it is newer than the pointer's (tags sort in the
    order they are written), or there is no pointer; else None."""
    tag = folder.ray_checkpoint(entries)
    return tag if tag is not None and (pointer is None or tag > pointer) else None


def check_same_training(stored: ExperimentConfig, requested: ExperimentConfig, what: str,
                        also_ignore: frozenset[str] = frozenset()) -> None:
    """Refuse (listing the fields) when ``requested`` trains something else than ``stored``
    (``also_ignore``: fields the caller has compared otherwise)."""
    differ = config_diff(stored, requested, ignore=RESUMABLE_CHANGES | also_ignore)
    if differ:
        moved = (any(d.startswith(("data.root ", "data.shards ")) for d in differ) and same_kind(stored.data, requested.data)
                 and not requested.train.data_moved)
        kind = requested.train.data_moved and not same_kind(stored.data, requested.data)
        raise RunConflict(f"resume refused: {what} was trained with another configuration: {'; '.join(differ)}"
                          + ("; if the run's data was moved there, add --data-moved" if moved else "")
                          + ("; --data-moved continues on data of the kind the run trained on (a folder as --root, shards "
                             "as --shards)" if kind else "")
                          + predates_hint(stored, requested))


def predates_hint(stored: ExperimentConfig, requested: ExperimentConfig) -> str:
    """The flags that continue a run trained before a setting existed whose default is now
    another (``--dilated-convs all``), when the request has today's default there."""
    default, unused = ExperimentConfig(), unused_fields(resolve_model(stored)) | unused_fields(resolve_model(requested))
    flags = [f"{flag(k.partition('.')[2])} {v}" for k, v in LATER_FIELDS.items()
             if isinstance(v, str) and k not in unused
             and field_value(stored, k) == v != field_value(requested, k) == field_value(default, k)]
    return f". It predates today's default there: {' '.join(flags)} continues it" if flags else ""


#: a similar run that trains the same: its name came otherwise (a data path spelt otherwise, e.g.
#: a shard set's manifest.json or a relative --root given from another folder; a chosen --name)
_SAME_TRAINING = "nothing that changes training: its name came from another spelling of a path or from --name"


def _similar_runs_hint(cfg: ExperimentConfig, limit: int = 3, reads: int = 50) -> str:
    """Runs beside the requested one with the same architecture, and how they differ: a changed
    flag changes the run name, so "nothing to resume" usually means "you changed something".
    Only folders named like this architecture's runs are read (at most ``reads``)."""
    root = out_root(cfg.train.out)
    try:
        names = [n for n in RunFolder(root).entries() if n.startswith(f"{cfg.model.arch}_")]
    except (OSError, ValueError):
        return ""
    found = []
    for name in sorted(names)[:reads]:
        try:
            other = RunFolder(f"{root}/{name}").read_config()
        except (OSError, ValueError):
            continue
        if other is not None:
            diff = config_diff(other, cfg) or [f"{d} (unused by it, but part of its name)" for d in config_diff(other, cfg, idle=True)]
            found.append((len(diff), name, diff, predates_hint(other, cfg)))
    if not found:
        return ""
    lines = [f"{name} (differs in {'; '.join(d) or _SAME_TRAINING}{hint})"
             for _, name, d, hint in sorted(found)[:limit]]
    return (". Runs of the same architecture there: " + " | ".join(lines)
            + ". To continue one of them, pass its --name with --resume (only --epochs may differ: that extends it)")
