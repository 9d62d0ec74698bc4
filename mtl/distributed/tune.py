"""Ray Tune sweeps: every trial is a full (possibly multi-worker) Ray Train run; ASHA stops the
weak ones early on the grader score. The search space is `mtl.distributed.sweep_space`; the
leaderboard and reports written at the end are `mtl.distributed.sweep_report`."""

from __future__ import annotations

import dataclasses
from typing import Any

from ray.tune import Callback

from mtl.config import ExperimentConfig
from mtl.distributed.sweep_space import SweepConfig, check_space, param_space, space, trial_config, trial_name


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

    check_space(space(sweep.validate()), base)
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
        arch = base.model.arch
        tuner = tune.Tuner(
            trainable,
            param_space={**param_space(space(sweep)), "base": base.to_dict(), "trials_url": f"{sweep_url}/trials"},
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
