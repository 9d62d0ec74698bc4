"""What a run shows while it trains (rank 0 only), on a terminal and in logs.

On a terminal: a rich progress bar and a metrics table per epoch. When stdout is not a terminal
(``ray job logs``, a batch system, ``| tee``), a live bar would print nothing until the epoch
ends, so plain progress lines are printed instead, one per ``--log-interval-s`` seconds at most.
Everything shown — start lines, progress lines, tables — is also kept as plain text in the run
folder's ``train.log`` (`RunLog`).
"""

from __future__ import annotations

import io
import threading
import time
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mtl.multitask import TASKS
from mtl.storage import is_local, read_bytes, url_to_fs, write_bytes_atomic

MAIN_KEYS = {"miou": "mIoU", "si_log_rmse": "SI-log", "grader": "grader", "delta_m": "Δm %", "mae": "MAE m", "rmse": "RMSE m",
             "abs_rel": "absRel", "delta1": "δ1 %", "train_loss": "loss", "weights/semseg": "w seg",
             "train_images_per_s": "img/s"}
#: decimals shown, where two would hide differences between runs (abs-rel is a fraction: 0.197 and 0.199)
DECIMALS = {"abs_rel": 3}


def wide_console(stderr: bool = False) -> Console:
    """A console for logs: soft-wrapped, and wide enough for tables when output is not a terminal."""
    c = Console(soft_wrap=True, stderr=stderr)
    return c if c.is_terminal else Console(soft_wrap=True, stderr=stderr, width=220)


def metrics_table(metrics: dict[str, float], title: str) -> Table:
    """The main numbers in one row; columns of metrics a run does not have (a single-task run's
    other task) are left out."""
    keys = [k for k in MAIN_KEYS if k in metrics]
    table = Table(title=title, show_header=True)
    for k in keys:
        table.add_column(MAIN_KEYS[k], justify="right")
    table.add_row(*("-" if metrics[k] != metrics[k] else f"{metrics[k]:.{DECIMALS.get(k, 2)}f}" for k in keys))  # (NaN: none)
    return table


def class_iou_table(metrics: dict[str, float], title: str) -> Table | None:
    """Per-class IoU (%), one row per class as segmentation toolkits print it; classes absent
    from both ground truth and predictions show "-" (they do not count in the mIoU). None when
    ``metrics`` has no segmentation."""
    names = [k.split("/", 1)[1] for k in metrics if k.startswith("iou/")]
    if not names:
        return None
    table = Table(title=title, show_header=True)
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    for name in names:
        v = metrics[f"iou/{name}"]
        table.add_row(name, f"{v:.2f}" if v == v else "-")
    table.add_row("[bold]mean[/]", f"[bold]{metrics['miou']:.2f}[/]")
    return table


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RunLog:
    """Prints to the console and keeps a plain-text copy in ``url`` (``<run>/train.log``).

    A local file is appended to line by line (``tail -f`` works); on object stores, where a file
    cannot be appended to, the whole log is rewritten at every `flush` (epoch ends, on the log's
    own thread while training goes on, and the end of the run). A resumed run continues the same
    file.
    """

    def __init__(self, url: str | None, console: Console | None = None, echo: bool = True) -> None:
        self.url, self.echo = url, echo
        self._lock = threading.RLock()  # (a background checkpoint's writer thread logs too)
        self.console = console or wide_console()
        self._plain = Console(file=io.StringIO(), width=160, color_system=None, soft_wrap=True)
        self._remote_text = ""
        self._writer: ThreadPoolExecutor | None = None  # (remote: one thread, writes in order)
        self._written: Future | None = None  # the last write handed to it
        if url is not None and is_local(url):
            fs, path = url_to_fs(url)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        elif url is not None:
            self._remote_text = (read_bytes(url) or b"").decode()

    def __call__(self, renderable: Any) -> None:
        """Show ``renderable`` (rich markup, a table...) and record it."""
        with self._lock:
            if self.echo:
                self.console.print(renderable)
            self.record(renderable)

    def record(self, renderable: Any) -> None:
        """Record without showing (e.g. progress lines while a live bar is on the terminal)."""
        if self.url is None:
            return
        with self._lock:
            self._plain.file = io.StringIO()
            self._plain.print(renderable)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            text = "".join(f"{stamp} {ln}\n" for ln in self._plain.file.getvalue().rstrip("\n").splitlines())
            if is_local(self.url):
                with open(url_to_fs(self.url)[1], "a") as fh:
                    fh.write(text)
            else:
                self._remote_text += text

    def flush(self, wait: bool = True) -> None:
        """Remote: the whole log so far to ``url``. ``wait=False``: on the log's own thread (an
        epoch's end: the PUT need not stall training); the last such write's failure is raised
        by the next flush, unless a later write has replaced it, which holds every line it held.
        A waiting flush (the run's end) follows the writes handed over before it."""
        if self.url is None or is_local(self.url):
            return
        with self._lock:
            text = self._remote_text.encode()
        last, self._written = self._written, None
        if wait:
            if last is not None:
                futures.wait([last])  # (this write replaces it, and raises its own failure)
            if self._writer is not None:  # (idle now; a later background flush starts another)
                self._writer.shutdown(wait=False)
                self._writer = None
            write_bytes_atomic(self.url, text)
            return
        if last is not None and last.done():
            last.result()  # (raises its failure)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streetmtl-log")
        self._written = self._writer.submit(write_bytes_atomic, self.url, text)


class TrainProgress:
    """The progress display of the train loop: a live bar on a terminal, plain lines otherwise
    (and always into the run log)."""

    def __init__(self, log: RunLog, enabled: bool = True, interval_s: float = 30.0,
                 tasks: tuple[str, ...] = TASKS) -> None:
        """``tasks``: the tasks trained, whose losses the lines show (a single-task run's other
        head is weighted 0: its loss says nothing)."""
        self.log, self.enabled, self.interval_s, self.tasks = log, enabled, interval_s, tuple(tasks)
        self.live = enabled and log.echo and log.console.is_terminal
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} | {task.fields[ips]} img/s | lr {task.fields[lr]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=log.console, disable=not self.live,
        )
        self.task = None
        self.last_line = float("-inf")

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, epochs: int, steps: int, steps_left_in_run: int, first_step: int = 0) -> None:
        """``first_step``: the epoch's steps trained before (a resume inside it): not timed here."""
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task("train", total=steps, epoch=f"{epoch + 1}/{epochs}", loss="-", ips="-", lr="-")
        self.epoch, self.epochs, self.steps, self.run_left = epoch, epochs, steps, steps_left_in_run
        self.first = first_step
        self.t0 = time.monotonic()

    def update(self, done: int, loss: list[float], ips: float, lr: float) -> None:
        """``loss``: [total, semseg, depth] running means; ``done``: steps of this epoch."""
        if not self.enabled:
            return
        self.progress.update(self.task, completed=done, loss=f"{loss[0]:.4f}", ips=f"{ips:.1f}", lr=f"{lr:.3g}")
        now = time.monotonic()
        if now - self.last_line < self.interval_s and done < self.steps:
            return
        self.last_line = now
        timed = done - self.first  # (steps this process trained and timed)
        per_step = (now - self.t0) / max(timed, 1)
        parts = ", ".join(f"{task} {v:.4f}" for task, v in zip(TASKS, loss[1:]) if task in self.tasks)
        line = (f"epoch {self.epoch + 1}/{self.epochs} step {done}/{self.steps} ({100 * done / self.steps:.0f}%) | "
                f"loss {loss[0]:.4f} ({parts}) | {ips:.1f} img/s | lr {lr:.3g} | "
                f"elapsed {_hms(now - self.t0)} | ETA epoch {_hms((self.steps - done) * per_step)}, "
                f"run {_hms((self.run_left - timed) * per_step)}")
        if self.live:
            self.log.record(line)  # the bar shows it on the terminal
        else:
            self.log(line)

    def metrics_table(self, metrics: dict[str, float]) -> None:
        if self.enabled:
            self.log(metrics_table(metrics, f"validation after epoch {metrics['epoch']}"))
