"""A finished sweep as a leaderboard: one row per trial, best first, shown in the terminal and
written as results.csv / .md / .tex plus scores.png (the objective over epochs).

The columns come from the sweep itself (`SweepReport`): one per swept field of its space (name and
number format: `mtl.distributed.sweep_space.Dim`), then the trial's outcome at its best epoch by the
sweep's objective (``--metric``): the tasks' metrics (IoU for segmentation, SI-logRMSE for depth,
the grader for both), the score when it is the objective or the trials train one task, and Δm
(``delta_m``, percent, lower is better) when baselines were given. A trial's values are read from
its results at that epoch (``hp/<name>``, ``run``: a PBT trial's values change as it goes, and its
epochs may come from several run folders), else from its config. A trial's status: completed,
stopped early (ASHA), diverged (its training did: it ended there, not retried), unfinished (the
sweep was interrupted before it ended), error, or no result. Reads Tune's results by duck typing
(``config``, ``path``, ``metrics``: the last result, ``metrics_dataframe``, ``error``), so this
module needs neither Ray nor a live sweep.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

from mtl.checkpoint import BEST_FILE
from mtl.distributed.sweep_space import SweepSpec
from mtl.storage import write_bytes_atomic

TEXT_COLUMNS = ("trial", "status")  # left-aligned in the terminal; numbers and hyperparameters right
HP_PREFIX = "hp/"  # the swept values a trial reports with each result
RUN_KEY = "run"  # the run folder (under the sweep's trials/) an epoch was trained in
DIVERGED_KEY = "diverged"  # in a trial's last result when its training diverged (`mtl.distributed.tune.diverged_result`)


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


def _nan() -> float:
    return float("nan")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


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
        name = os.path.basename(r.path.rstrip("/"))
        df, key = r.metrics_dataframe, self.spec.key
        has = (lambda c: df is not None and c in df)  # noqa: E731
        objective = [float(x) for x in df[key].tolist()] if has(key) else []
        epochs = [int(x) for x in df["epoch"].tolist()] if has("epoch") else list(range(1, len(objective) + 1))
        found = [i for i, x in enumerate(objective) if x == x]
        config_hp = {d.name: r.config.get(d.name) for d in self.spec.space}
        if not found:
            return TrialRow(name, config_hp, 0, 0, {}, _nan(), [], _status(r, "no result"), "")
        pick = max if self.spec.mode == "max" else min
        b = pick(found, key=objective.__getitem__)
        hp = {d.name: _cell(df, HP_PREFIX + d.name, b, config_hp[d.name]) for d in self.spec.space}
        values = {m.key: float(_cell(df, m.key, b, _nan())) for m in self.metrics}
        last = epochs[found[-1]]
        status = _status(r, "completed" if last >= max_epochs else "stopped early", trained_all=last >= max_epochs)
        run = _cell(df, RUN_KEY, b, name)
        return TrialRow(name, hp, last, epochs[b], values, objective[b], [(epochs[i], objective[i]) for i in found], status,
                        f"{r.config.get('trials_url', '')}/{run}/{BEST_FILE}")

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


def _cell(df, column: str, i: int, default: Any) -> Any:
    """``df[column]`` at row ``i``, ``default`` when there is no such column or value."""
    if df is None or column not in df:
        return default
    v = df[column].iloc[i]
    return default if v is None or (isinstance(v, float) and v != v) else v


def _number(x: float) -> str:
    return f"{x:.2f}" if _finite(x) else ""
