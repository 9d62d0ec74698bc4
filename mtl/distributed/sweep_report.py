"""A finished sweep as a leaderboard: one row per trial, best first, shown in the terminal and
written as results.csv / .md / .tex plus scores.png (validation score over epochs).

The hyperparameter columns come from the search space's table (`sweep_space.KNOBS`: name and
number format); the rest are the trial's outcome. Reads Tune's results by duck typing (``config``,
``path``, ``metrics_dataframe``, ``error``), so this module needs neither Ray nor a live sweep.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from typing import Any

from mtl.checkpoint import BEST_FILE
from mtl.distributed.sweep_space import KNOBS
from mtl.storage import write_bytes_atomic

COLUMNS = ("rank", "trial", *(k.name for k in KNOBS), "epochs", "best_epoch", "IoU", "SI-logRMSE", "grader", "status")
TEXT_COLUMNS = ("trial", "status")  # left-aligned in the terminal; numbers and hyperparameters right


@dataclass
class TrialRow:
    name: str
    hp: dict[str, Any]
    epochs: int
    best_epoch: int
    miou: float
    si_log_rmse: float
    grader: float
    history: list[float]  # grader per epoch
    status: str
    best_model: str  # <trial's run>/best.pt


def rows_from_results(results, max_epochs: int) -> list[TrialRow]:
    """One row per trial, at its best epoch; ranked by grader, trials without a result last."""
    rows = [_row(r, max_epochs) for r in results]
    return sorted(rows, key=lambda x: (x.grader == x.grader, x.grader), reverse=True)


def _row(r, max_epochs: int) -> TrialRow:
    hp = {k.name: r.config.get(k.name) for k in KNOBS}
    name = os.path.basename(r.path.rstrip("/"))
    df = r.metrics_dataframe
    hist = [] if df is None or "grader" not in df else [float(x) for x in df["grader"].tolist() if x == x]
    if not hist:
        nan = float("nan")
        return TrialRow(name, hp, 0, 0, nan, nan, nan, [], "error" if r.error else "no result", "")
    b = max(range(len(hist)), key=hist.__getitem__)
    status = "error" if r.error else ("stopped early" if len(hist) < max_epochs else "completed")
    return TrialRow(name, hp, len(hist), b + 1, float(df["miou"].iloc[b]), float(df["si_log_rmse"].iloc[b]), hist[b], hist,
                    status, f"{r.config.get('trials_url', '')}/{name}/{BEST_FILE}")


def _cells(i: int, r: TrialRow) -> list[str]:
    return [str(i + 1), r.name, *(k.show(r.hp.get(k.name)) for k in KNOBS), str(r.epochs), str(r.best_epoch),
            f"{r.miou:.2f}", f"{r.si_log_rmse:.2f}", f"{r.grader:.2f}", r.status]


def leaderboard_table(rows: list[TrialRow], title: str):
    from rich.table import Table

    t = Table(title=title)
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in TEXT_COLUMNS else "right")
    for i, r in enumerate(rows):
        t.add_row(*_cells(i, r))
    return t


def csv_text(rows: list[TrialRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(list(COLUMNS) + ["best_model"])
    for i, r in enumerate(rows):
        w.writerow(_cells(i, r) + [r.best_model])
    return buf.getvalue()


def markdown_text(rows: list[TrialRow], title: str) -> str:
    md = [f"**{title}**", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_cells(i, r)) + " |" for i, r in enumerate(rows)]
    return "\n".join(md) + "\n"


def latex_text(rows: list[TrialRow], title: str) -> str:
    """A LaTeX table without the trial names (too long for a page)."""
    def esc(s: str) -> str:
        return s.replace("_", r"\_").replace("%", r"\%")

    keep = [j for j, c in enumerate(COLUMNS) if c != "trial"]
    tex = [r"\begin{table}[h]", r"\centering", r"\begin{tabular}{" + "r" * len(keep) + "}", r"\hline",
           " & ".join(esc(COLUMNS[j]) for j in keep) + r" \\", r"\hline"]
    for i, r in enumerate(rows):
        cells = _cells(i, r)
        tex.append(" & ".join(esc(cells[j]) for j in keep) + r" \\")
    tex += [r"\hline", r"\end{tabular}", r"\caption{" + esc(title) + "}", r"\end{table}"]
    return "\n".join(tex) + "\n"


def write_reports(rows: list[TrialRow], out_url: str, title: str) -> dict[str, str]:
    """results.csv / .md / .tex (best first) and scores.png under ``out_url``; returns their URLs."""
    out = out_url.rstrip("/")
    files = {"csv": (f"{out}/results.csv", csv_text(rows).encode()),
             "md": (f"{out}/results.md", markdown_text(rows, title).encode()),
             "tex": (f"{out}/results.tex", latex_text(rows, title).encode()),
             "png": (f"{out}/scores.png", score_plot(rows, title))}
    for url, data in files.values():
        write_bytes_atomic(url, data)
    return {kind: url for kind, (url, _) in files.items()}


def score_plot(rows: list[TrialRow], title: str) -> bytes:
    """Validation grader score over epochs for every trial; a cross marks where ASHA stopped one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for r in rows:
        if not r.history:
            continue
        epochs = list(range(1, len(r.history) + 1))
        (line,) = ax.plot(epochs, r.history, marker="o", ms=3, lw=1.2, label=r.name[:60])
        if r.status == "stopped early":
            ax.plot(epochs[-1], r.history[-1], marker="x", ms=10, mew=2, color=line.get_color())
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation grader score (IoU - SI-logRMSE)")
    ax.set_title(f"{title} (x = stopped early by ASHA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
