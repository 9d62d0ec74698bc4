"""curves.png: a run's epochs at a glance (`mtl.tracking` draws it during training).

`draw_curves` draws in a child process (`_child`), not in the training process:
matplotlib holds the GIL for the whole drawing, and a training thread that queues short torch
ops, each of which releases and takes the GIL back, then waits up to the interpreter's switch
interval (5 ms) for each. `python jobs/benchmark.py background` on the dev CPU (2 cores): a
training thread that queues 70 short ops per step spends 0.5-0.6 ms of host time per step
alone or while the child draws, 7-13 ms (median; p95 41-63 ms) while another thread draws; and
a background checkpoint's copy into host memory at the first epoch's end took 1.1 s instead of
0.1 while a thread drew. The child costs its start and matplotlib's import (about 0.7 s of
another core) once per drawing, at most once a minute. This module imports no torch: the
child starts in a moment.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import math
import numbers
import os
import pickle
import subprocess
import sys
from typing import Any

NO_MATPLOTLIB_EXIT = 3  # the child's exit status when matplotlib cannot be imported
DRAW_TIMEOUT_S = 120.0


def number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (NaN included), else None: metrics dicts also
    hold lists (``epoch_lrs``), strings and flags, which are no scalars to plot."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _matplotlib() -> tuple[Any, Any] | None:
    """(Figure, FigureCanvasAgg), or None without matplotlib. The object API draws with Agg
    without switching the process's pyplot backend."""
    try:
        importlib.import_module("matplotlib")  # the package first: its submodules may be cached
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _series(epochs: dict[int, dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs = sorted(epochs)
    return xs, [v if (v := number(epochs[e].get(key))) is not None else math.nan for e in xs]


def _lr_curve(epochs: dict[int, dict[str, Any]]) -> tuple[list[float], list[float]]:
    """The LR of every step, on the epoch axis: epoch e's ``epoch_lrs`` are the LRs of its last
    steps, up to its ``step``, placed between the end of epoch e-1 (0 at e=1) and e."""
    xs: list[float] = []
    ys: list[float] = []
    for e in sorted(epochs):
        m, lrs = epochs[e], epochs[e].get("epoch_lrs")
        end = number(m.get("step"))
        if not isinstance(lrs, list) or not lrs or end is None:
            xs.append(float(e))
            ys.append(number(m.get("lr")) if number(m.get("lr")) is not None else math.nan)
            continue
        start = number(epochs.get(e - 1, {}).get("step")) if e > 1 else 0.0
        start = end - len(lrs) if start is None or start >= end else start
        first = end - len(lrs) + 1
        xs += [e - 1 + (first + i - start) / (end - start) for i in range(len(lrs))]
        ys += [v if (v := number(lr)) is not None else math.nan for lr in lrs]
    return xs, ys


_PANELS = (  # title, (label, metrics key)...
    ("train loss", (("total", "train_loss"), ("semseg", "train_loss_semseg"), ("depth", "train_loss_depth"))),
    ("val mIoU (%)", (("mIoU", "miou"),)),
    ("val SI-logRMSE", (("SI-logRMSE", "si_log_rmse"),)),
    ("selection", (("grader", "grader"), ("score", "score"))),
    ("learning rate", (("LR", None),)),
    ("task weights", (("semseg", "weights/semseg"), ("depth", "weights/depth"))),
)


def _panels(epochs: dict[int, dict[str, Any]]) -> list[tuple[str, list[tuple[str, list[float], list[float]]]]]:
    """The panels that have data: (title, [(label, xs, ys)])."""
    out = []
    for title, lines in _PANELS:
        drawn = []
        for label, key in lines:
            xs, ys = _lr_curve(epochs) if key is None else _series(epochs, key)
            if any(math.isfinite(y) for y in ys):
                drawn.append((label, xs, ys))
        if drawn:
            out.append((title, drawn))
    return out


def _resumed(epochs: dict[int, dict[str, Any]]) -> list[int]:
    """The epochs during which the run was resumed: its ``restarts`` count went up (from 0
    before the first: a resume inside epoch 1)."""
    order = sorted(epochs)
    count = {e: number(epochs[e].get("restarts")) or 0 for e in order}
    return [e for before, e in zip([None, *order], order) if count[e] > (count[before] if before is not None else 0)]


def render(epochs: dict[int, dict[str, Any]], title: str) -> bytes | None:
    """curves.png of a run's epochs (epoch number -> metrics), drawn in this process, or None
    without matplotlib. Epochs during which the run was resumed (``restarts`` went up) are shaded."""
    mpl = _matplotlib()
    if mpl is None:
        return None
    Figure, FigureCanvasAgg = mpl
    panels = _panels(epochs)
    fig = Figure(figsize=(13, 7), dpi=80)  # fixed margins: a layout engine doubles the drawing time
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    fig.subplots_adjust(left=0.07, right=0.98, top=0.9, bottom=0.08, wspace=0.25, hspace=0.4)
    resumed = _resumed(epochs)
    for ax, (name, lines) in zip(axes, panels):
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 and name != "learning rate" else None, ms=3, label=label)
        for e in resumed:
            ax.axvspan(e - 1, e, color="grey", alpha=0.15, lw=0)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title + ("   (shaded: epochs with a resume)" if resumed else ""))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# the child's first lines: no working directory on its path (a folder there named like a module
# would shadow it); this package's root (argv[1]) first unless the child's path has it already
# (a non-editable install's root is site-packages, which must stay behind the standard library)
_BOOT = ("import sys; root = sys.argv[1]; sys.path[:1] = [p for p in sys.path[:1] if p]; "
         "root in sys.path or sys.path.insert(0, root); from mtl.curves import _child; sys.exit(_child())")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def draw_curves(epochs: dict[int, dict[str, Any]], title: str) -> bytes | None:
    """`render` in a child process (see the module docstring); None without matplotlib. A child
    that fails raises RuntimeError with the last line it printed."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # (where `mtl` is imported from)
    child = subprocess.run([sys.executable, "-c", _BOOT, root], input=pickle.dumps((epochs, title)),
                           capture_output=True, timeout=DRAW_TIMEOUT_S)
    if child.returncode == NO_MATPLOTLIB_EXIT:
        return None
    if child.returncode == 0 and child.stdout.startswith(PNG_SIGNATURE):
        return child.stdout
    lines = child.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {child.returncode}"]
    why = lines[-1] if child.returncode != 0 else f"it printed no PNG ({len(child.stdout)} bytes)"
    raise RuntimeError(f"the child process drawing curves.png (mtl.curves): {why}")


def _child() -> int:
    """The child (`draw_curves`; also ``python -m mtl.curves``): (epochs, title) pickled on stdin, the PNG on stdout."""
    epochs, title = pickle.loads(sys.stdin.buffer.read())  # (from the parent process, which started this one)
    png = render(epochs, title)
    if png is None:
        return NO_MATPLOTLIB_EXIT
    sys.stdout.buffer.write(png)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
