"""A finished sweep as a leaderboard: one row per trial, best first, shown in the terminal and
written as results.csv / .md / .tex plus scores.png (the objective over epochs).

The columns come from the sweep itself (`SweepReport`): one per swept field of its space (name and
number format: `mtl.distributed.sweep_space.Dim`), then the trial's outcome at its best epoch by the
sweep's objective (``--metric``): the tasks' metrics (IoU for segmentation, SI-logRMSE for depth,
the grader for both), the score when it is the objective or the trials train one task, and Δm
(``delta_m``, percent, lower is better) when baselines were given. A trial's status: completed,
stopped early (ASHA), diverged (its training did: it ended there, not retried), unfinished (the
sweep was interrupted before it ended), error, or no result.

**A trial's epochs** (`trial_history`) come from its run folders: training writes every epoch's
metrics there (``metrics/epoch-NNNN.json``) before Tune hears of it. Tune's own results miss
epochs after a resume: it restores them only from its last saved state, and its result file in
the sweep's folder holds only what the new driver received (Tune copies a trial's earlier results
back only for trials with a Tune checkpoint, which ASHA's never have). A PBT trial's epochs may
come from several run folders: a folder seeded from a checkpoint of epoch k (a PBT exploit)
trained the trial's epochs after k. Its values at an epoch are those Tune's result of the epoch
names (``hp/<name>``, when it names the same folder, ``run``), else those its run folder trained
with (its ``config.json``), else the trial's config. Reads Tune's results by duck
typing (``config``, ``path``, ``metrics``: the last result, ``metrics_dataframe``, ``error``), so
this module needs neither Ray nor a live sweep.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from mtl.checkpoint import BEST_FILE, CheckpointIndex, committed_metrics, epoch_tag, metrics_url, tag_epoch
from mtl.distributed.sweep_space import SweepSpec
from mtl.errors import one_line
from mtl.storage import exists, read_bytes, write_bytes_atomic

TEXT_COLUMNS = ("trial", "status")  # left-aligned in the terminal; numbers and hyperparameters right
HP_PREFIX = "hp/"  # the swept values a trial reports with each result
RUN_KEY = "run"  # the run folder (under the sweep's trials/) an epoch was trained in
DIVERGED_KEY = "diverged"  # in a trial's last result when its training diverged (`mtl.distributed.tune.diverged_result`)
SEED_FILE = "pbt-origin.json"  # in a run folder seeded from another trial's checkpoint (`mtl.distributed.tune.seed_run`)


@dataclass(frozen=True)
class Metric:
    column: str
    key: str  # in the trial's results


@dataclass
class TrialRow:
    name: str
    hp: dict[str, Any]  # the swept values at the best epoch
    epochs: int  # the last epoch the trial reached
    best_epoch: int
    values: dict[str, float]  # metric key -> value at the best epoch
    objective: float  # the sweep's objective at the best epoch (nan: no result)
    history: list[tuple[int, float]]  # (epoch, objective) per result
    status: str
    best_model: str  # <the run folder of the best epoch>/best.pt
    error: str = ""  # a failed trial's error, one line (a trial that failed before training has no train.log)


def _nan() -> float:
    return float("nan")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ------------------------------------------------------------------------ a trial's epochs

@dataclass(frozen=True)
class EpochResult:
    """One epoch of a trial: the run folder it was trained in (under the sweep's ``trials/``)
    and its results (validation metrics; the swept values ``hp/<name>`` where Tune has them)."""

    epoch: int
    run: str
    values: dict[str, Any]


def trial_folders(trials_url: str, name: str) -> list[str]:
    """The run folders trial ``name`` trained in, in order: ``name``, ``name-p1``, ``name-p2``..."""
    from mtl.runs import RunFolder

    pattern = re.compile(re.escape(name) + r"(?:-p(\d+))?")
    found = [(int(m.group(1) or 0), e) for e in RunFolder(trials_url).entries() if (m := pattern.fullmatch(e))]
    return [e for _, e in sorted(found)]


def _folders(trials_url: str, name: str) -> dict[str, dict[int, dict[str, Any]]]:
    """Run folder -> its committed epochs' metrics (`committed_metrics`: an epoch whose
    checkpoint never committed is trained again by a resume, and no best.pt holds it), for trial
    ``name``'s folders in order."""
    return {run: committed_metrics(f"{trials_url}/{run}") for run in trial_folders(trials_url, name)}


def _lineage(trials_url: str, folders: dict[str, dict[int, dict[str, Any]]]) -> dict[int, str]:
    """Epoch -> the run folder that trained it for the trial: a folder seeded from a checkpoint of
    epoch k (a PBT exploit: `SEED_FILE`) trained the epochs after k; what an earlier folder holds
    after k (trained before the exploit reached the trial) is not the trial's."""
    out: dict[int, str] = {}
    for run, epochs in folders.items():
        seed = read_bytes(f"{trials_url}/{run}/{SEED_FILE}")
        seeded = tag_epoch(json.loads(seed)["from"]["tag"]) if seed is not None else None
        if seeded is not None:
            out = {e: r for e, r in out.items() if e <= seeded}
        out.update(dict.fromkeys(epochs, run))
    return out


def trial_history(trials_url: str, name: str, rows: Sequence[dict[str, Any]] = ()) -> list[EpochResult]:
    """Trial ``name``'s results, one per epoch, in order (see the module docstring): its run
    folders' metrics, each epoch from the folder that trained it for the trial (`_lineage`), with
    Tune's results (``rows``) for the swept values of the epochs Tune says were trained there,
    and for epochs no folder holds (a diverged trial's last result; a sweep whose folders are gone)."""
    folders = _folders(trials_url.rstrip("/"), name) if trials_url else {}
    lineage = _lineage(trials_url.rstrip("/"), folders)
    tune = {int(r["epoch"]): r for r in rows if _finite(r.get("epoch"))}  # (the last result of an epoch reported twice)
    out = []
    for epoch in sorted(set(lineage) | set(tune)):
        row, run = tune.get(epoch, {}), lineage.get(epoch)
        named = row.get(RUN_KEY) if isinstance(row.get(RUN_KEY), str) else None
        if run is None or (named is not None and named not in folders):  # (Tune names a folder the listing lacks: its row)
            out.append(EpochResult(epoch, named or name, dict(row)))
            continue
        hp = {k: v for k, v in row.items() if k.startswith(HP_PREFIX) and named in (None, run)}
        out.append(EpochResult(epoch, run, {**hp, **folders[run][epoch]}))
    return out


def _tune_rows(df) -> list[dict[str, Any]]:  # noqa: ANN001 - a pandas DataFrame (duck-typed)
    """Tune's results of a trial as one dict per result (``epoch`` counted from 1 when absent)."""
    if df is None:
        return []
    columns = {c: df[c].tolist() for c in list(df)}
    n = max((len(v) for v in columns.values()), default=0)
    rows = [{c: v[i] for c, v in columns.items() if i < len(v) and v[i] is not None} for i in range(n)]
    return [r if "epoch" in r else {**r, "epoch": i + 1} for i, r in enumerate(rows)]


def _folder_values(trials_url: str, run: str) -> dict[str, dict[str, Any]]:
    """The config a run folder trained with (its ``config.json``, as stored), {} when it has none."""
    from mtl.runs import CONFIG_FILE

    raw = read_bytes(f"{trials_url}/{run}/{CONFIG_FILE}") if trials_url else None
    return json.loads(raw) if raw is not None else {}


class SweepReport:
    """The leaderboard of a sweep of ``spec`` whose trials train ``tasks``."""

    def __init__(self, spec: SweepSpec, tasks: Sequence[str]) -> None:
        self.spec, self.tasks = spec, tuple(tasks)
        metrics = []
        if "semseg" in self.tasks:
            metrics.append(Metric("IoU", "miou"))
        if "depth" in self.tasks:
            metrics.append(Metric("SI-logRMSE", "si_log_rmse"))
        if len(self.tasks) == 2:
            metrics.append(Metric("grader", "grader"))
        if spec.metric == "score" or len(self.tasks) == 1:
            metrics.append(Metric("score", "score"))
        if spec.baselines:
            metrics.append(Metric("delta_m", "delta_m"))
        self.metrics = metrics
        self.columns = ("rank", "trial", *(d.name for d in spec.space), "epochs", "best_epoch", *(m.column for m in metrics),
                        "status")

    # ------------------------------------------------------------------------------ rows

    def rows(self, results, max_epochs: int) -> list[TrialRow]:
        """One row per trial, at its best epoch; ranked by the objective, trials without a result last."""
        rows = [self._row(r, max_epochs) for r in results]
        sign = 1.0 if self.spec.mode == "max" else -1.0
        return sorted(rows, key=lambda x: (_finite(x.objective), sign * x.objective if _finite(x.objective) else 0.0),
                      reverse=True)

    def _row(self, r, max_epochs: int) -> TrialRow:
        row = self._results_row(r, max_epochs)
        if r.error:
            row.error = one_line(r.error)
        return row

    def _results_row(self, r, max_epochs: int) -> TrialRow:
        name, trials_url = os.path.basename(r.path.rstrip("/")), r.config.get("trials_url", "")
        key = self.spec.key
        rows = _tune_rows(r.metrics_dataframe)
        try:
            history = trial_history(trials_url, name, rows)
        except (OSError, ValueError) as e:  # (one unreadable folder must not cost the whole report)
            print(f"report: trial {name}'s run folders could not be read ({e}): its row shows what Tune reported",
                  file=sys.stderr)
            history = trial_history("", name, rows)
        found = [h for h in history if _number_or_none(h.values.get(key)) is not None]
        config_hp = {d.name: r.config.get(d.name) for d in self.spec.space}
        if not found:
            return TrialRow(name, config_hp, 0, 0, {}, _nan(), [], _status(r, "no result"), "")
        pick = max if self.spec.mode == "max" else min
        best = pick(found, key=lambda h: float(h.values[key]))
        values = {m.key: _number_or_none(best.values.get(m.key), _nan()) for m in self.metrics}
        last = found[-1].epoch
        trained_all = last >= max_epochs and _committed_epoch(trials_url, found[-1].run, last) >= max_epochs
        status = _status(r, "completed" if last >= max_epochs else "stopped early", trained_all=trained_all)
        return TrialRow(name, self._values(best, trials_url, config_hp), last, best.epoch, values, float(best.values[key]),
                        [(h.epoch, float(h.values[key])) for h in found], status, f"{trials_url}/{best.run}/{BEST_FILE}")

    def _values(self, best: EpochResult, trials_url: str, config_hp: dict[str, Any]) -> dict[str, Any]:
        """The swept values of epoch ``best``: as Tune's result has them, else as its run folder
        trained with, else the trial's config."""
        out, stored = {}, None
        for d in self.spec.space:
            v = best.values.get(HP_PREFIX + d.name)
            if v is None or (isinstance(v, float) and v != v):
                stored = _folder_values(trials_url, best.run) if stored is None else stored
                part, _, field = d.path.partition(".")
                v = stored.get(part, {}).get(field, config_hp[d.name])
            out[d.name] = v
        return out

    def cells(self, i: int, r: TrialRow) -> list[str]:
        return [str(i + 1), r.name, *(d.show(r.hp.get(d.name)) for d in self.spec.space), str(r.epochs), str(r.best_epoch),
                *(_number(r.values.get(m.key, _nan())) for m in self.metrics), r.status]

    # ---------------------------------------------------------------------------- views

    def table(self, rows: list[TrialRow], title: str):
        from rich.table import Table

        t = Table(title=title)
        for c in self.columns:
            t.add_column(c, justify="left" if c in TEXT_COLUMNS else "right")
        for i, r in enumerate(rows):
            t.add_row(*self.cells(i, r))
        return t

    def csv_text(self, rows: list[TrialRow]) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(list(self.columns) + ["best_model"])
        for i, r in enumerate(rows):
            w.writerow(self.cells(i, r) + [r.best_model])
        return buf.getvalue()

    def markdown_text(self, rows: list[TrialRow], title: str) -> str:
        md = [f"**{title}**", "", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        md += ["| " + " | ".join(self.cells(i, r)) + " |" for i, r in enumerate(rows)]
        return "\n".join(md) + "\n"

    def latex_text(self, rows: list[TrialRow], title: str) -> str:
        """A LaTeX table without the trial names (too long for a page)."""
        def esc(s: str) -> str:
            return s.replace("_", r"\_").replace("%", r"\%")

        keep = [j for j, c in enumerate(self.columns) if c != "trial"]
        tex = [r"\begin{table}[h]", r"\centering", r"\begin{tabular}{" + "r" * len(keep) + "}", r"\hline",
               " & ".join(esc(self.columns[j]) for j in keep) + r" \\", r"\hline"]
        for i, r in enumerate(rows):
            cells = self.cells(i, r)
            tex.append(" & ".join(esc(cells[j]) for j in keep) + r" \\")
        tex += [r"\hline", r"\end{tabular}", r"\caption{" + esc(title) + "}", r"\end{table}"]
        return "\n".join(tex) + "\n"

    def write(self, rows: list[TrialRow], out_url: str, title: str) -> dict[str, str]:
        """results.csv / .md / .tex (best first) and scores.png under ``out_url``; returns their URLs."""
        out = out_url.rstrip("/")
        files = {"csv": (f"{out}/results.csv", self.csv_text(rows).encode()),
                 "md": (f"{out}/results.md", self.markdown_text(rows, title).encode()),
                 "tex": (f"{out}/results.tex", self.latex_text(rows, title).encode()),
                 "png": (f"{out}/scores.png", self.plot(rows, title))}
        for url, data in files.values():
            write_bytes_atomic(url, data)
        return {kind: url for kind, (url, _) in files.items()}

    def plot(self, rows: list[TrialRow], title: str) -> bytes:
        """The objective over epochs for every trial; a cross marks where ASHA stopped one."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
        for r in rows:
            if not r.history:
                continue
            epochs, values = zip(*r.history)
            (line,) = ax.plot(epochs, values, marker="o", ms=3, lw=1.2, label=r.name[:60])
            if r.status == "stopped early":
                ax.plot(epochs[-1], values[-1], marker="x", ms=10, mew=2, color=line.get_color())
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(OBJECTIVE_LABELS[self.spec.metric])
        ax.set_title(title + (" (x = stopped early by ASHA)" if self.spec.scheduler == "asha" else ""))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (no trial with a result: no legend)
            ax.legend(fontsize=6, loc="best")
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return buf.getvalue()


OBJECTIVE_LABELS = {"grader": "validation grader score (IoU - SI-logRMSE)", "score": "validation score",
                    "delta_m": "Δm against the single-task baselines (%, lower is better)"}


def _committed_epoch(trials_url: str, run: str, last: int) -> int:
    """The epochs completed at the checkpoint run folder ``run``'s pointer names: an epoch's
    metrics are written before its checkpoint, so a sweep interrupted in between has the epoch's
    results, but the trial trains it again when resumed. ``last`` (the trial's last epoch with a
    result) when the folder cannot tell: Tune's result alone (no folders, or not this epoch's)."""
    if not trials_url or not exists(metrics_url(f"{trials_url}/{run}", epoch_tag(last))):
        return last
    try:
        tag = CheckpointIndex(f"{trials_url}/{run}").latest_tag()
    except (OSError, ValueError):  # (the row shows what there is; the resume names the problem)
        return last
    return tag_epoch(tag or "") or 0  # (none: not one checkpoint committed)


def _status(r, ended: str, trained_all: bool = False) -> str:  # noqa: ANN001 - a Tune Result
    """How trial ``r`` ended: ``error``; ``diverged`` (its training did, `DIVERGED_KEY`); else
    ``ended`` (completed, stopped early by ASHA, no result) when it trained all its epochs or
    Tune saw it end (its last result is ``done``: set when the trial returns or a scheduler
    stops it); else ``unfinished``: the sweep was interrupted (Ctrl-C) first, and Tune returns
    such a trial as if it had ended; --resume continues it. (A trial that trained all its epochs
    is completed whatever ``done`` says: Tune may store its last result before marking it, and
    a resumed sweep restores that.)"""
    if r.error:
        return "error"
    metrics = r.metrics or {}
    if metrics.get(DIVERGED_KEY):
        return "diverged"
    return ended if trained_all or metrics.get("done") else "unfinished"


def _number_or_none(v: Any, default: Any = None) -> Any:
    """``v`` as a float, ``default`` when it is missing or NaN."""
    if v is None or isinstance(v, str):
        return default
    v = float(v)
    return default if v != v else v


def _number(x: float) -> str:
    return f"{x:.2f}" if _finite(x) else ""
