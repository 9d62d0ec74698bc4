"""Ray Tune sweeps: every trial is a full (possibly multi-worker) Ray Train run; ASHA stops the
weak ones early on the grader score. Results become a leaderboard (terminal, Markdown, LaTeX,
CSV) and a plot of validation score over epochs."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback

from mtl.config import ExperimentConfig
from mtl.storage import write_bytes_atomic

HYPERPARAMS = ("lr", "optimizer", "semseg_weight", "scale_max", "hflip", "batch_size")


@dataclass(frozen=True)
class SweepConfig:
    """The search space and the sweep's mechanics. Ranges default to the report's neighbourhood:
    Adam around 1e-4 (§2.1.2), segmentation weight around 0.58 (§2.1.4), zoom up to 1.25 (§5.4)."""

    sweep_name: str = "sweep"
    num_samples: int = 16
    lr_min: float = 1e-5
    lr_max: float = 1e-3
    optimizers: tuple[str, ...] = ("adam",)
    semseg_weight_min: float = 0.3
    semseg_weight_max: float = 0.7
    scale_max_choices: tuple[float, ...] = (1.0, 1.25, 1.5)
    hflip_choices: tuple[bool, ...] = (True, False)
    batch_sizes: tuple[int, ...] = (16,)
    grace_period: int = 1  # epochs every trial gets before ASHA may stop it
    reduction_factor: int = 2
    max_concurrent: int | None = None  # None = as many as the cluster's CPUs/GPUs hold
    search: str = "random"  # random | optuna | hyperopt
    search_seed: int = 0

    def validate(self) -> "SweepConfig":
        if not (0 < self.lr_min <= self.lr_max):
            raise ValueError(f"learning rates must satisfy 0 < --lr-min <= --lr-max, got {self.lr_min}, {self.lr_max}")
        if not (0.0 <= self.semseg_weight_min <= self.semseg_weight_max <= 1.0):
            raise ValueError(f"task weights must satisfy 0 <= --semseg-weight-min <= --semseg-weight-max <= 1, "
                             f"got {self.semseg_weight_min}, {self.semseg_weight_max}")
        if not self.scale_max_choices or min(self.scale_max_choices) < 1.0:
            raise ValueError(f"--scale-max-choices are zoom factors >= 1, got {self.scale_max_choices}")
        bad = [o for o in self.optimizers if o not in ("adam", "sgd")]
        if bad or not self.optimizers:
            raise ValueError(f"--optimizers must be adam and/or sgd, got {self.optimizers}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch-sizes must be positive, got {self.batch_sizes}")
        if self.num_samples < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("--num-samples >= 1, --grace-period >= 1 and --reduction-factor >= 2 are required")
        if self.search not in ("random", "optuna", "hyperopt"):
            raise ValueError(f"--search must be random, optuna or hyperopt, got {self.search!r}")
        return self


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    return {
        "lr": tune.loguniform(sweep.lr_min, sweep.lr_max),
        "optimizer": tune.choice(list(sweep.optimizers)),
        "semseg_weight": tune.uniform(sweep.semseg_weight_min, sweep.semseg_weight_max),
        "scale_max": tune.choice(list(sweep.scale_max_choices)),
        "hflip": tune.choice(list(sweep.hflip_choices)),
        "batch_size": tune.choice(list(sweep.batch_sizes)),
    }


def trial_config(base: ExperimentConfig, hp: dict[str, Any], name: str, trials_url: str, resume: bool = False) -> ExperimentConfig:
    """The base config with one trial's hyperparameters; its Train run lives in ``trials_url/name``
    (``resume``: continue it — a trial restarted by ``Tuner.restore``)."""
    return dataclasses.replace(
        base,
        optim=dataclasses.replace(base.optim, lr=float(hp["lr"]), optimizer=hp["optimizer"], semseg_weight=float(hp["semseg_weight"])),
        data=dataclasses.replace(base.data, scale_max=float(hp["scale_max"]), hflip=bool(hp["hflip"])),
        train=dataclasses.replace(base.train, batch_size=int(hp["batch_size"]), out=trials_url, name=name, resume=resume),
    ).validate()


def trial_name(arch: str, hp: dict[str, Any], trial_id: str) -> str:
    """Descriptive, filesystem-safe: branched_adam-lr3.2e-04_w0.58_s1.25_flip_bs16_3f2a1_00004."""
    flip = "flip" if hp.get("hflip") else "noflip"
    return (f"{arch}_{hp.get('optimizer')}-lr{hp.get('lr', 0):.1e}_w{hp.get('semseg_weight', 0):.2f}_"
            f"s{hp.get('scale_max', 0):g}_{flip}_bs{hp.get('batch_size')}_{trial_id}")


def _trial(config: dict[str, Any]) -> None:
    """A Tune trial: one full Ray Train run reporting each epoch's validation metrics to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mtl.distributed.capacity import worker_bundle
    from mtl.distributed.ray_train import make_trainer
    from mtl.runs import RunFolder, prepare_run

    base = ExperimentConfig.from_dict(config["base"])
    name = ray.tune.get_context().get_trial_name()  # stable across Tuner.restore: the Train run resumes
    started = RunFolder(f"{config['trials_url']}/{name}").has_checkpoint()
    cfg = prepare_run(trial_config(base, config, name, config["trials_url"], resume=started))
    bundle = worker_bundle(cfg.dist.cpus_per_worker, cfg.dist.gpus_per_worker, bool(cfg.dist.use_gpu))
    result = make_trainer(cfg, bundle, callbacks=[TuneReportCallback()]).fit()
    if result.error:
        raise result.error


def max_concurrent_trials(base: ExperimentConfig, sweep: SweepConfig, bundle: dict[str, float]) -> int:
    """``--max-concurrent``, else as many trials as the cluster holds once the autoscaler has
    added what its config allows (what it holds now when that cannot be known)."""
    from mtl.distributed.capacity import max_concurrent, read_capacity

    return sweep.max_concurrent or max_concurrent(base.dist.num_workers, bundle, read_capacity(), sweep.num_samples)


def _search_alg(sweep: SweepConfig):
    if sweep.search == "random":
        return None
    try:
        if sweep.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(seed=sweep.search_seed)
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=sweep.search_seed)
    except ImportError as e:
        raise ValueError(f"--search {sweep.search} needs the {sweep.search} package: pip install {sweep.search} ({e})") from e


def run_sweep(base: ExperimentConfig, sweep: SweepConfig, resume: bool = False):
    """Run (or, with ``resume``, continue) the sweep; returns Tune's ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from mtl.distributed.ray_train import connect, plan
    from mtl.runs import out_root

    sweep.validate()
    workers = plan(base, connect(base))  # the GPU decision, once for every trial; fails fast if never placeable
    base = dataclasses.replace(base, dist=dataclasses.replace(base.dist, use_gpu=workers.use_gpu))
    storage = out_root(base.train.out)
    sweep_url = f"{storage}/{sweep.sweep_name}"
    trainable = tune.with_resources(_trial, {"CPU": 0.01})  # the trial itself only waits; Train workers hold the resources
    if resume:
        if not tune.Tuner.can_restore(sweep_url):
            raise FileNotFoundError(f"no sweep to resume at {sweep_url}")
        tuner = tune.Tuner.restore(sweep_url, trainable=trainable, resume_unfinished=True, restart_errored=True)
    else:
        space = {**param_space(sweep), "base": base.to_dict(), "trials_url": f"{sweep_url}/trials"}
        arch = base.model.arch
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="grader", mode="max", num_samples=sweep.num_samples, search_alg=_search_alg(sweep),
                scheduler=ASHAScheduler(max_t=base.train.epochs, grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor),
                max_concurrent_trials=max_concurrent_trials(base, sweep, workers.bundle),
                trial_name_creator=lambda t: trial_name(arch, t.config, t.trial_id),
                trial_dirname_creator=lambda t: trial_name(arch, t.config, t.trial_id),
            ),
            run_config=tune.RunConfig(name=sweep.sweep_name, storage_path=storage, callbacks=[LeaderboardCallback(base.train.epochs)]),
        )
    return tuner.fit()


# ----------------------------------------------------------------------------- the report

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
    best_model: str


def rows_from_results(results, max_epochs: int) -> list[TrialRow]:
    rows = []
    for r in results:
        hp = {k: r.config.get(k) for k in HYPERPARAMS}
        name = os.path.basename(r.path.rstrip("/"))
        df = r.metrics_dataframe
        hist = [] if df is None or "grader" not in df else [float(x) for x in df["grader"].tolist() if x == x]
        if not hist:
            rows.append(TrialRow(name, hp, 0, 0, float("nan"), float("nan"), float("nan"), [], "error" if r.error else "no result", ""))
            continue
        b = max(range(len(hist)), key=hist.__getitem__)
        status = "error" if r.error else ("stopped early" if len(hist) < max_epochs else "completed")
        trials_url = r.config.get("trials_url", "")
        rows.append(TrialRow(name, hp, len(hist), b + 1, float(df["miou"].iloc[b]), float(df["si_log_rmse"].iloc[b]), hist[b], hist,
                             status, f"{trials_url}/{name}/best.pt"))
    return sorted(rows, key=lambda x: (x.grader == x.grader, x.grader), reverse=True)


COLUMNS = ("rank", "trial", "lr", "optimizer", "semseg_weight", "scale_max", "hflip", "batch_size", "epochs", "best_epoch",
           "IoU", "SI-logRMSE", "grader", "status")


def _cells(i: int, r: TrialRow) -> list[str]:
    hp = r.hp
    return [str(i + 1), r.name, f"{hp['lr']:.2e}", str(hp["optimizer"]), f"{hp['semseg_weight']:.2f}", f"{hp['scale_max']:g}",
            str(hp["hflip"]), str(hp["batch_size"]), str(r.epochs), str(r.best_epoch), f"{r.miou:.2f}", f"{r.si_log_rmse:.2f}",
            f"{r.grader:.2f}", r.status]


def leaderboard_table(rows: list[TrialRow], title: str):
    from rich.table import Table

    t = Table(title=title)
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("trial", "status", "optimizer") else "right")
    for i, r in enumerate(rows):
        t.add_row(*_cells(i, r))
    return t


def write_reports(rows: list[TrialRow], out_url: str, title: str) -> dict[str, str]:
    """results.csv / .md / .tex (best first) and scores.png under ``out_url``; returns their URLs."""
    paths = {ext: f"{out_url.rstrip('/')}/results.{ext}" for ext in ("csv", "md", "tex")}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(list(COLUMNS) + ["best_model"])
    for i, r in enumerate(rows):
        w.writerow(_cells(i, r) + [r.best_model])
    write_bytes_atomic(paths["csv"], buf.getvalue().encode())

    md = [f"**{title}**", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_cells(i, r)) + " |" for i, r in enumerate(rows)]
    write_bytes_atomic(paths["md"], ("\n".join(md) + "\n").encode())

    esc = lambda s: s.replace("_", r"\_").replace("%", r"\%")  # noqa: E731
    cols = [c for c in COLUMNS if c != "trial"]
    tex = [r"\begin{table}[h]", r"\centering", r"\begin{tabular}{" + "r" * len(cols) + "}", r"\hline",
           " & ".join(esc(c) for c in cols) + r" \\", r"\hline"]
    tex += [" & ".join(esc(c) for j, c in enumerate(_cells(i, r)) if COLUMNS[j] != "trial") + r" \\" for i, r in enumerate(rows)]
    tex += [r"\hline", r"\end{tabular}", r"\caption{" + esc(title) + "}", r"\end{table}"]
    write_bytes_atomic(paths["tex"], ("\n".join(tex) + "\n").encode())

    paths["png"] = f"{out_url.rstrip('/')}/scores.png"
    write_bytes_atomic(paths["png"], score_plot(rows, title))
    return paths


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


class LeaderboardCallback(Callback):
    """Prints the leaderboard whenever a trial finishes (the terminal view during the sweep)."""

    def __init__(self, max_epochs: int) -> None:
        self.max_epochs = max_epochs
        self.best: dict[str, tuple[float, int, dict[str, Any]]] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
        g = result.get("grader")
        if g is not None and (trial.trial_id not in self.best or g > self.best[trial.trial_id][0]):
            self.best[trial.trial_id] = (g, result.get("training_iteration", 0), result)

    def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
        from rich.table import Table

        from mtl.progress import wide_console

        t = Table(title=f"sweep leaderboard ({sum(1 for x in trials if x.status == 'TERMINATED')}/{len(trials)} trials done)")
        for c in ("trial", "status", "best grader", "at epoch"):
            t.add_column(c)
        ranked = sorted(trials, key=lambda x: self.best.get(x.trial_id, (float("-inf"),))[0], reverse=True)
        for x in ranked:
            g, ep, _ = self.best.get(x.trial_id, (float("nan"), 0, None))
            t.add_row(str(x), x.status, f"{g:.2f}", str(ep))
        wide_console().print(t)
