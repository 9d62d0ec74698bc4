"""What a run is judged by: its tasks' metrics, the score that picks its best epoch, and the
multi-task measure Δm against single-task baselines.

* A multi-task run (both tasks) is ranked by the course grader, mIoU − SI-logRMSE. A single-task
  baseline (``--tasks semseg`` or ``--tasks depth``) by its own task: mIoU, or −SI-logRMSE; the
  other task's metrics are left out of its reports (that head is not trained).
* Δm (Maninis et al. 2019; Vandenhende et al. 2021): the mean relative change of each task's
  metrics against that task's single-task baseline, in percent, signed as in Navon et al. 2022
  (Nash-MTL) and Liu et al. 2023 (FAMO), so that lower is better (−3 means the multi-task model
  is 3 % better on average; Maninis' and Vandenhende's sign is the opposite). The metrics of a
  task are averaged first, then the tasks (those papers average over all metrics), so depth's
  several metrics count as much as segmentation's one. A run given ``--baselines`` is ranked by
  it: its score is −Δm.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from mtl.metrics import DEPTH_KEYS
from mtl.storage import read_bytes

if TYPE_CHECKING:
    from mtl.config import DataConfig, ExperimentConfig

TASKS = ("semseg", "depth")


def trained_only(labels: Any, depth: Any, tasks: Iterable[str]) -> tuple[Any, Any]:
    """A prediction (labels, depth) with the task a single-task model was not trained on (its
    head never learned) as None: what exports and pictures leave out."""
    tasks = tuple(tasks)
    return (labels if "semseg" in tasks else None, depth if "depth" in tasks else None)
# the metrics Δm compares per task, and whether a higher value is better
DELTA_M_METRICS: dict[str, tuple[tuple[str, bool], ...]] = {
    "semseg": (("miou", True),),
    "depth": (("si_log_rmse", False), ("abs_rel", False), ("rmse", False), ("delta1", True)),
}
# metric keys that belong to one task (the rest, e.g. train_loss or epoch, belong to the run)
_DEPTH_KEYS = (*DEPTH_KEYS, "num_depth_images")


def task_of(key: str) -> str | None:
    """The task a metric key belongs to (``iou/road`` and ``train_loss_semseg`` -> semseg), None
    for run-level keys."""
    loss_of = key.removeprefix("train_loss_")
    if loss_of != key and loss_of in TASKS:
        return loss_of
    if key == "miou" or key.startswith("iou/"):
        return "semseg"
    return "depth" if key in _DEPTH_KEYS else None


def selection_score(metrics: Mapping[str, float], tasks: Iterable[str]) -> float:
    """The score that picks a run's best epoch (higher is better; see the module docstring)."""
    tasks = tuple(tasks)
    if tasks == ("semseg",):
        return float(metrics["miou"])
    if tasks == ("depth",):
        return -float(metrics["si_log_rmse"])
    return float(metrics["miou"]) - float(metrics["si_log_rmse"])


def task_metrics(metrics: dict[str, Any], tasks: Iterable[str],
                 baselines: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """``metrics`` without the keys of tasks that were not trained, without the grader for a
    single-task run, and with its ``score`` (`selection_score`). With ``baselines`` (task ->
    metrics, `load_baselines`), also ``delta_m``, and the score is -Δm: the run is judged by it."""
    tasks = tuple(tasks)
    out = {k: v for k, v in metrics.items() if task_of(k) in (None, *tasks)}
    if len(tasks) == 1:
        out.pop("grader", None)
    out["score"] = selection_score(metrics, tasks)
    if baselines:
        out["delta_m"] = delta_m(metrics, baselines)
        out["score"] = -out["delta_m"]
    return out


def delta_m(metrics: Mapping[str, float], baselines: Mapping[str, Mapping[str, float]]) -> float:
    """Δm in percent (lower is better) of a multi-task run's ``metrics`` against ``baselines``
    (task -> that task's single-task metrics; every task of `DELTA_M_METRICS` needed)."""
    missing = [t for t in DELTA_M_METRICS if t not in baselines]
    if missing:
        raise ValueError(f"Δm needs a single-task baseline for {' and '.join(missing)} (a run trained with --tasks {missing[0]})")
    per_task = []
    for task, keys in DELTA_M_METRICS.items():
        changes = []
        for key, higher_is_better in keys:
            base, value = float(baselines[task][key]), float(metrics[key])
            if not (math.isfinite(base) and base != 0):
                raise ValueError(f"Δm: the {task} baseline's {key} is {base}, not a number to compare against")
            rel = (value - base) / abs(base)
            changes.append(-rel if higher_is_better else rel)
        per_task.append(sum(changes) / len(changes))
    return 100.0 * sum(per_task) / len(per_task)


def best_metrics(run_url: str) -> tuple[ExperimentConfig, dict[str, float]]:
    """A finished (or running) run's configuration and the validation metrics of its best
    epoch, read from its folder (``config.json``, ``metrics/epoch-*.json`` of the epochs its
    checkpoints committed). ValueError naming what is missing."""
    from mtl.checkpoint import committed_metrics
    from mtl.config import ExperimentConfig
    from mtl.runs import CONFIG_FILE

    run_url = run_url.rstrip("/")
    raw = read_bytes(f"{run_url}/{CONFIG_FILE}")
    if raw is None:
        raise ValueError(f"{run_url} is not a run folder (no {CONFIG_FILE})")
    cfg = ExperimentConfig.from_dict(json.loads(raw))
    tasks = tuple(cfg.optim.tasks)
    epochs = list(committed_metrics(run_url).values())
    if not epochs:
        raise ValueError(f"{run_url} has no validation metrics yet (metrics/epoch-*.json of an epoch whose checkpoint "
                         f"checkpoints/latest.json names): its first epoch has not ended")
    scored = [m for m in epochs if math.isfinite(selection_score(m, tasks))]  # (max() would keep a NaN met first)
    if not scored:
        raise ValueError(f"{run_url}: no epoch's validation score is a number (every epoch's metrics/epoch-*.json)")
    return cfg, max(scored, key=lambda m: selection_score(m, tasks))


def read_baselines(run_urls: Iterable[str], data: DataConfig | None = None) -> dict[str, dict[str, float]]:
    """task -> the best metrics of its single-task baseline run, from those runs' folders. Given
    the run's ``data``, each baseline must have been validated on it:
    Δm compares validation metrics, and the baselines' also weigh which epoch is best."""
    from mtl.runs import data_place, same_data

    out: dict[str, dict[str, float]] = {}
    for url in run_urls:
        cfg, metrics = best_metrics(url)
        tasks = tuple(cfg.optim.tasks)
        if len(tasks) != 1:
            raise ValueError(f"{url} trained {' and '.join(tasks)}: a Δm baseline is a single-task run (--tasks semseg or --tasks depth)")
        if tasks[0] in out:
            raise ValueError(f"two baselines for {tasks[0]} given ({url} is the second)")
        if data is not None and not same_data(cfg.data, data):
            raise ValueError(f"--baselines: {url} was validated on {data_place(cfg.data)}, and this run is on {data_place(data)}: "
                             f"Δm compares the validation metrics of one split (train the baseline on this data, or compare "
                             f"finished runs with jobs/evaluate.py --baselines, which evaluates each on the same split)")
        out[tasks[0]] = metrics
    return out


def load_baselines(run_urls: Iterable[str], data: DataConfig | None = None) -> dict[str, dict[str, float]]:
    """`read_baselines`, checked: one run of each task, validated on ``data`` when given, every
    value Δm compares there and usable (a zero or NaN cannot be compared against). ValueErrors
    name ``--baselines``."""
    urls = tuple(run_urls)
    found = read_baselines(urls, data)
    missing = [t for t in DELTA_M_METRICS if t not in found]
    if missing:
        raise ValueError(f"--baselines: Δm needs a single-task run of each task; none of {' '.join(urls)} trained "
                         f"{' or '.join(missing)} (a run of --tasks {missing[0]})")
    for task, keys in DELTA_M_METRICS.items():  # every value Δm compares against is there
        absent = [k for k, _ in keys if k not in found[task]]
        if absent:
            raise ValueError(f"--baselines: the {task} run's best epoch has no {', '.join(absent)} (Δm compares them)")
    delta_m({k: v for metrics in found.values() for k, v in metrics.items()}, found)  # a zero or NaN: ValueError
    return found
