"""Rich progress bar and metric tables for the train loop (rank 0 only)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

MAIN_KEYS = {"miou": "mIoU", "si_log_rmse": "SI-log", "grader": "grader", "mae": "MAE m", "rmse": "RMSE m",
             "abs_rel": "absRel", "delta1": "δ1 %", "train_loss": "loss", "train_images_per_s": "img/s"}


def wide_console(stderr: bool = False) -> Console:
    """A console for logs: soft-wrapped, and wide enough for tables when output is not a terminal."""
    c = Console(soft_wrap=True, stderr=stderr)
    return c if c.is_terminal else Console(soft_wrap=True, stderr=stderr, width=220)


def metrics_table(metrics: dict[str, float], title: str) -> Table:
    table = Table(title=title, show_header=True)
    for label in MAIN_KEYS.values():
        table.add_column(label, justify="right")
    table.add_row(*(f"{metrics[k]:.2f}" if k in metrics else "-" for k in MAIN_KEYS))
    return table


class TrainProgress:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = wide_console()
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} | {task.fields[ips]} img/s | lr {task.fields[lr]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, disable=not enabled,
        )
        self.task = None

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task("train", total=steps, epoch=f"{epoch + 1}/{epochs}", loss="-", ips="-", lr="-")

    def update(self, completed: int, loss: float, ips: float, lr: float) -> None:
        self.progress.update(self.task, completed=completed, loss=f"{loss:.4f}", ips=f"{ips:.1f}", lr=f"{lr:.3g}")

    def metrics_table(self, metrics: dict[str, float]) -> None:
        if self.enabled:
            self.progress.console.print(metrics_table(metrics, f"validation after epoch {metrics['epoch']}"))
