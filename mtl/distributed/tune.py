"""Ray Tune sweeps: every trial is a full (possibly multi-worker) Ray Train run, scheduled by ASHA
(stops weak trials early) or population-based training. The sweep itself (space, objective,
scheduler) is `mtl.distributed.sweep_space.SweepSpec`; the leaderboard and reports written at the
end are `mtl.distributed.sweep_report`.

**A trial** is a Tune function (Tune cannot wrap a Train V2 trainer itself) that builds a
`TorchTrainer` for its config and runs it in a thread. Each epoch's report reaches the trial
through `ForwardReports` (a Train callback in the Train controller, over a Ray queue); the trial
adds what the sweep judges by (``score``; training reports ``delta_m`` itself with --baselines) and its swept values
(``hp/<name>``, ``run``), then reports it to Tune. Step checkpoints inside an epoch (a preemption
notice) carry no validation and are not forwarded.

**Run folders.** A trial's Train run lives in ``<sweep>/trials/<trial name>/`` (a name that
stays the same when the sweep is resumed, so its Train run resumes from its own checkpoint:
``--resume`` continues unfinished and failed trials under their own ids, hence names).

**Trials at once** (`trials_at_once`): as many as the cluster holds, each trial's own actor
taking none of the CPUs and GPUs its workers are counted from (`trial_resources`). Under PBT
they are the whole population: Tune starts no new trial while that many are live, paused ones
included, and PBT ranks live trials only; so a PBT sweep asks for no more trials than run at
once, and for at least two (`sweep_space.check_pbt_population`).

**PBT** (``--scheduler pbt``) perturbs every ``--perturbation-interval`` epochs: a trial in the
bottom ``--quantile-fraction`` copies one of the top fraction and perturbs the copy's swept values
(continuous ones x0.8 or x1.2 or redrawn, clipped to their range; choices moved to a neighbour or
redrawn). At those epochs (but the last) a trial hands Tune a checkpoint: a copy of its Train
checkpoint (model, optimizer, train state, RNG; DeepSpeed's shards) with ``origin.json`` naming
the run folder and tag it came from; Tune keeps each trial's last four. A trial (re)started with
such a checkpoint:

* from its own latest run folder (the sweep was resumed, or PBT paused it to run another):
  continues that folder, as ASHA's trials do;
* from another trial (an exploit) or an older folder: starts a new run folder
  ``<trial name>-p<k>``, seeded with that checkpoint — its config rewritten to the trial's new
  values, its best score reset so that the folder's ``best.pt`` is its own best epoch — and
  continues training from there (same epoch, step, LR plan position and data order; the new LR
  applies from the next step). ``pbt-origin.json`` there says where it came from.

PBT perturbs only at multiples of the interval, also after ``--resume`` (`AlignedPBT`). A
trial restarted after its last epoch trains nothing and reports that epoch again
(`report_last_epoch`). The report takes each epoch from the run folder that trained it, with
its values (`sweep_report.trial_history`), so a PBT trial's row shows the values of its best
epoch and its ``best.pt``. PBT counts time in epochs; it changes only the fields `sweep_space.PBT_MUTABLE` lists.

**ASHA** judges a trial at each rung (``--grace-period`` x ``--reduction-factor``^k epochs) by
its score at that epoch, also after ``--resume``: Tune saves no scheduler state, and the rungs
are filled again from the trials' run folders (`AlignedASHA`).

**After --resume** Tune knows a trial's results only as of its last saved state (a few seconds
before the driver died) and, with a new driver, keeps in the trial's result file only what it
received since; every epoch's metrics are in the trial's run folders, which the scheduler, the
leaderboard and the report read (`sweep_report.trial_history`).

**MLflow.** With ``MLFLOW_TRACKING_URI`` set, Tune's MLflow callback logs every trial as an
MLflow run of the experiment named after the sweep (its fixed settings as parameters, each
epoch's results, its swept values ``hp/<name>`` included, as metrics at that epoch:
`SweepMLflowCallback`); the trials' own training does not log to MLflow then.

**Divergence.** A trial whose training diverges (loss or weights no longer numbers) ends
normally, reported as diverged (`end_trial`): neither Ray Train nor Tune retries it, and the
sweep goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

from ray.air.constants import TRAINING_ITERATION
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.train import UserCallback
from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, PopulationBasedTraining

from mtl.config import ExperimentConfig
from mtl.distributed.sweep_report import DIVERGED_KEY, HP_PREFIX, RUN_KEY, SEED_FILE, trial_folders, trial_history
from mtl.distributed.sweep_space import (SweepConfig, SweepSpec, check_pbt_population, check_search_package, hyperparameters,
                                         param_space, trial_config, trial_name)

ORIGIN_FILE = "origin.json"  # in a checkpoint handed to Tune: where it came from
#: a custom resource of the cluster's head (cluster/): trials run there, off the (spot) GPU nodes
TRIAL_RESOURCE = "streetmtl_trials"
TUNE_CHECKPOINT = "checkpoint"  # the Train checkpoint's files inside a Tune checkpoint
SWEEP_FILE = "sweep.json"  # in the sweep's folder: the sweep's spec and base config (a resume must match)
#: the folder of a sweep that holds its trials' run folders (``<sweep>/trials/<trial name>/``)
TRIALS_DIR = "trials"
TUNER_FILE = "tuner.pkl"  # Tune's own state in the sweep's folder (written when the Tuner is made), what a resume restores
#: what a trial's actor asks for on a cluster without `TRIAL_RESOURCE`: a nominal amount of memory,
#: a resource every node has and no worker bundle asks for (see `trial_resources`)
TRIAL_MEMORY = 1 << 20


class ForwardReports(UserCallback):
    """Train callback (runs in the Train controller): each epoch's report (rank 0's metrics and
    the checkpoint's tag) to the trial, through a Ray queue."""

    def __init__(self, queue) -> None:  # noqa: ANN001 - ray.util.queue.Queue
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:  # noqa: ANN001
        if "epoch_step" in metrics[0]:  # a step checkpoint inside an epoch: no validation, not a result
            return
        tag = checkpoint.path.rstrip("/").rsplit("/", 1)[-1] if checkpoint is not None else None
        self.queue.put((dict(metrics[0]), tag))


def trial_result(metrics: dict[str, Any], tasks: tuple[str, ...], hp: dict[str, Any], run: str) -> dict[str, Any]:
    """What a trial reports to Tune for one epoch: its metrics (with ``delta_m`` when it trains
    with --baselines), the score that ranks it (when training did not report it), its swept
    values and its run folder's name."""
    from mtl.multitask import selection_score

    out = dict(metrics)
    if "score" not in out:
        out["score"] = selection_score(metrics, tasks)
    out.update({HP_PREFIX + k: "+".join(map(str, v)) if isinstance(v, tuple) else v for k, v in hp.items()})
    out[RUN_KEY] = run
    return out


def _trial(config: dict[str, Any]) -> None:
    """A Tune trial: one full Ray Train run (or, under PBT, one per exploit) reporting each
    epoch's validation metrics to Tune (see the module docstring)."""
    import threading

    import ray.tune
    from ray.util.queue import Queue

    from mtl.distributed.capacity import worker_bundle
    from mtl.distributed.ray_train import make_trainer, prepare_run_folder
    from mtl.runs import run_name, run_url, stored_config

    spec = SweepSpec.from_dict(config["sweep"])
    base = stored_config(config["base"])  # (a sweep started by an earlier version: its trials' base as stored)
    hp = hyperparameters(spec.space, config)
    name = ray.tune.get_context().get_trial_name()  # stable across Tuner.restore: the Train run resumes
    cfg = start_run(base, spec, hp, config["trials_url"], name, ray.tune.get_checkpoint())
    outside_ray = prepare_run_folder(run_url(cfg))  # (before its Train controller starts)
    if finished(cfg):  # restarted after its last epoch (the sweep resumed; PBT paused it there): nothing to train
        report_last_epoch(cfg, hp)
        return
    bundle = worker_bundle(cfg.dist.cpus_per_worker, cfg.dist.gpus_per_worker, bool(cfg.dist.use_gpu))
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    # the trial's rank 0 does not log to MLflow: Tune's MLflow callback logs the trials
    trainer = make_trainer(cfg, bundle, callbacks=[ForwardReports(reports)], track_mlflow=False, outside_ray=outside_ray)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - raised again in the trial below
            outcome["error"] = e
        finally:
            reports.put(None)

    thread = threading.Thread(target=fit, name="streetmtl-trial-fit", daemon=True)
    thread.start()
    _forward(reports, spec, cfg, hp)
    thread.join()
    end_trial(outcome, spec, hp, run_name(cfg), name)


def report_last_epoch(cfg: ExperimentConfig, hp: dict[str, Any]) -> None:
    """The result of the last epoch of a run that has trained all its epochs, reported again by
    its trial restarted after it: Tune may not have it (it restores a resumed sweep's results from
    its last saved state, and a result reported since is reported by no one else), and a trial
    whose last result is an earlier epoch counts as stopped early. The epoch's metrics file, else
    (it is written before the checkpoint: gone only if deleted) the checkpoint's own metrics."""
    import ray.tune

    from mtl.checkpoint import epoch_metrics, load_checkpoint
    from mtl.runs import run_name, run_url

    url = run_url(cfg)
    metrics = epoch_metrics(url).get(cfg.train.epochs) or load_checkpoint(url)["metrics"]
    ray.tune.report(trial_result(metrics, tuple(cfg.optim.tasks), hp, run_name(cfg)))


def _forward(reports, spec: SweepSpec, cfg: ExperimentConfig, hp: dict[str, Any]) -> None:  # noqa: ANN001 - a Ray queue
    """Each epoch's report of the trial's Train run to Tune (with a PBT checkpoint at the
    perturbation epochs), until the run ends (None)."""
    import ray.tune

    from mtl.runs import run_name, run_url

    run, url, tasks = run_name(cfg), run_url(cfg), tuple(cfg.optim.tasks)
    while (item := reports.get()) is not None:
        metrics, tag = item
        result = trial_result(metrics, tasks, hp, run)
        epoch = int(metrics.get("epoch", 0))
        if spec.pbt and tag and epoch % spec.perturbation_interval == 0 and epoch < cfg.train.epochs:
            with tempfile.TemporaryDirectory(prefix="streetmtl-pbt-") as d:  # Tune copies it into the trial's folder
                pack_checkpoint(url, tag, d)
                ray.tune.report(result, checkpoint=ray.tune.Checkpoint.from_directory(d))
        else:
            ray.tune.report(result)


def end_trial(outcome: dict[str, Any], spec: SweepSpec, hp: dict[str, Any], run: str, name: str) -> None:
    """How a trial's Train run ended: its failure is raised (Tune restarts the trial up to
    --max-failures, then counts it failed); a divergence is an outcome, reported (`diverged_result`)
    and ended normally, so that neither Ray Train nor Tune repeats a run that would only diverge
    again, and the sweep goes on (`mtl.distributed.ray_train.fit_outcome`)."""
    import ray.tune

    from mtl.distributed.ray_train import DIVERGED, diverged

    if "error" in outcome:  # (Train V2 raises a run's failure from fit(); its Result holds none)
        raise outcome["error"]
    found = diverged(outcome.get("result"))
    if found:
        print(f"trial {name}: {found[DIVERGED]}")
        ray.tune.report(diverged_result(spec, found["epoch"], hp, run))


def diverged_result(spec: SweepSpec, epoch: int, hp: dict[str, Any], run: str) -> dict[str, Any]:
    """The last result of a trial whose training diverged in ``epoch``: the marker
    (``diverged``) and the objective as NaN. Tune wants the objective in every result; ASHA
    files a NaN under no rung's cutoff (``np.nanpercentile`` skips it), PBT passes over the
    result (`AlignedPBT`), a search library takes it as a failed draw, and the report ranks the
    trial by the epochs it finished (status ``diverged``)."""
    nan = float("nan")
    return trial_result({spec.key: nan, "score": nan, "epoch": epoch, DIVERGED_KEY: 1}, (), hp, run)


# ------------------------------------------------------------------ run folders and PBT checkpoints

def start_run(base: ExperimentConfig, spec: SweepSpec, hp: dict[str, Any], trials_url: str, name: str,
              checkpoint=None) -> ExperimentConfig:  # noqa: ANN001 - a Tune checkpoint
    """The config of the Train run trial ``name`` runs now, its folder ready (see the module
    docstring): its latest run folder (resumed when it has a checkpoint), or, when Tune hands it
    a checkpoint from elsewhere (a PBT exploit), a new folder seeded with that checkpoint. Tune
    keeps handing a trial the exploited checkpoint until the trial reports one of its own: a
    restart in between goes on in the folder already seeded from it (same checkpoint, same values)."""
    from mtl.runs import RunFolder, prepare_run, run_url

    runs = trial_folders(trials_url, name)
    run = runs[-1] if runs else name
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            with open(os.path.join(d, ORIGIN_FILE)) as fh:
                origin = json.load(fh)
            if origin["run"].rstrip("/") != f"{trials_url}/{run}" and not _seeded_from(f"{trials_url}/{run}", origin, hp):
                run = f"{name}-p{len(runs)}" if runs else f"{name}-p1"
                seed_run(trial_config(base, spec.space, hp, run, trials_url), d, hp)
    cfg = trial_config(base, spec.space, hp, run, trials_url)
    # (Ray's record may name a checkpoint before latest.json does: a report taken, the trial
    # restarted before rank 0 moved the pointer; the run then resumes from Ray's, `RayStorage.latest`)
    folder = RunFolder(run_url(cfg))
    entries = folder.entries()
    resume = folder.has_checkpoint(entries) or folder.ray_checkpoint(entries) is not None
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=resume))
    return prepare_run(cfg, check_new=False)  # (`plan_sweep` checked what its trials may draw)


def _seeded_from(run_url: str, origin: dict[str, str], hp: dict[str, Any]) -> bool:
    """Run folder ``run_url`` was seeded (`seed_run`) from checkpoint ``origin`` with values ``hp``."""
    from mtl.storage import read_bytes

    data = read_bytes(f"{run_url}/{SEED_FILE}")
    if data is None:
        return False
    seed = json.loads(data)
    return seed["from"] == origin and seed["values"] == json.loads(json.dumps(hp, default=str))


def finished(cfg: ExperimentConfig) -> bool:
    """The run's latest checkpoint is its last epoch's."""
    from mtl.checkpoint import CheckpointIndex, epoch_tag
    from mtl.runs import run_url

    return CheckpointIndex(run_url(cfg)).latest_tag() == epoch_tag(cfg.train.epochs)


def pack_checkpoint(run_url: str, tag: str, folder: str) -> None:
    """A PBT checkpoint in local ``folder``: the Train checkpoint ``<run>/checkpoints/<tag>``
    (all its files) and where it came from."""
    from mtl.checkpoint import CHECKPOINTS
    from mtl.storage import storage_errors, url_to_fs

    url = f"{run_url}/{CHECKPOINTS}/{tag}"
    with storage_errors(url):
        fs, path = url_to_fs(url)
        fs.get(path.rstrip("/") + "/", os.path.join(folder, TUNE_CHECKPOINT) + "/", recursive=True)
    with open(os.path.join(folder, ORIGIN_FILE), "w") as fh:
        json.dump({"run": run_url, "tag": tag}, fh)


def seed_run(cfg: ExperimentConfig, folder: str, hp: dict[str, Any]) -> None:
    """A new run folder for ``cfg`` holding the checkpoint of the PBT checkpoint ``folder``
    (`pack_checkpoint`) as its latest: its stored config becomes ``cfg`` (the trial's perturbed
    values: the resume check then accepts it), its best score is reset (``best.pt`` in the new
    folder is its own best epoch); weights, optimizer, train state and RNG stay."""
    from mtl.checkpoint import STATE_FILE, CheckpointIndex, FolderStorage, checkpoint_bytes, load_safely
    from mtl.runs import resolve_config, run_url
    from mtl.storage import write_bytes_atomic

    with open(os.path.join(folder, ORIGIN_FILE)) as fh:
        origin = json.load(fh)
    url = run_url(cfg)
    with tempfile.TemporaryDirectory(prefix="streetmtl-seed-") as d:
        files = os.path.join(d, TUNE_CHECKPOINT)
        shutil.copytree(os.path.join(folder, TUNE_CHECKPOINT), files)
        with open(os.path.join(files, STATE_FILE), "rb") as fh:
            state = load_safely(fh.read(), f"{origin['run']}/checkpoints/{origin['tag']}/{STATE_FILE}")
        state.pop("format", None)
        state["config"] = resolve_config(cfg).to_dict()
        state["train_state"] = {**state.get("train_state", {}), "best": float("-inf")}
        state["is_best"] = False  # (the donor's best epoch: not one of this run's)
        with open(os.path.join(files, STATE_FILE), "wb") as fh:
            fh.write(checkpoint_bytes(state))
        storage = FolderStorage(url, keep_last=0)
        storage.publish(files, origin["tag"], {})
        CheckpointIndex(url).commit(origin["tag"])
    write_bytes_atomic(f"{url}/{SEED_FILE}", json.dumps({"from": origin, "values": hp}, indent=1, default=str).encode())


# --------------------------------------------------------------------------------- the driver

def max_concurrent_trials(base: ExperimentConfig, sweep: SweepConfig, bundle: dict[str, float]) -> int:
    """``--max-concurrent``, else as many trials as the cluster holds once the autoscaler has
    added what its config allows (what it holds now when that cannot be known): trials of
    ``--num-workers`` workers of ``bundle`` each (their GPUs, on GPUs)."""
    from mtl.distributed.capacity import max_concurrent, read_capacity

    return sweep.max_concurrent or max_concurrent(base.dist.num_workers, bundle, read_capacity(), sweep.num_samples)


def trials_at_once(base: ExperimentConfig, sweep: SweepConfig, spec: SweepSpec, bundle: dict[str, float]) -> int:
    """`max_concurrent_trials`; under PBT, its whole population, so a cluster that holds fewer
    trials than ``--num-samples``, or one only, is refused (``--max-concurrent`` was checked
    with the flags: `SweepConfig.validate`)."""
    concurrent = max_concurrent_trials(base, sweep, bundle)
    if spec.pbt and sweep.max_concurrent is None:
        per_worker = ", ".join(f"{k} {v:g}" for k, v in bundle.items())
        why = f"the cluster holds {concurrent} trial(s) of {base.dist.num_workers} worker(s) x {{{per_worker}}}"
        room = ("more nodes, or fewer/smaller workers per trial: --num-workers, --cpus-per-worker, --gpus-per-worker; or "
                "--max-concurrent when the cluster will grow in ways this run cannot see")
        check_pbt_population(sweep.num_samples, concurrent, why, room)
    return concurrent


def mlflow_callback(experiment: str, spec: SweepSpec):
    """`SweepMLflowCallback` logging every trial of sweep ``spec`` as a run of MLflow experiment
    ``experiment`` when ``MLFLOW_TRACKING_URI`` is set; None otherwise
    (`mtl.tracking.mlflow_tracking_uri`: an error when mlflow is not installed)."""
    from mtl.tracking import mlflow_tracking_uri

    uri = mlflow_tracking_uri()
    if uri is None:
        return None
    return SweepMLflowCallback(spec, tracking_uri=uri, experiment_name=experiment, save_artifact=False)


class SweepMLflowCallback(MLflowLoggerCallback):
    """Tune's MLflow callback for a sweep's trials. Parameters: a trial's fixed settings, logged
    once per trial. Tune calls ``log_trial_start`` again whenever a trial restarts (PBT's
    exploits and pauses, a retry), and MLflow refuses to change a parameter's value ("Changing
    param values is not allowed"), which PBT's perturbed values would: the swept values reach
    MLflow with every result instead, as metrics ``hp/<name>``, and those that are no numbers
    (a choice of words, a size) as tags ``hp/<name>`` (a tag may change; MLflow's metrics are
    numbers, and Tune's callback drops other values without a word). Metrics are logged at the
    result's epoch: Tune's ``training_iteration`` starts at 1 again whenever a trial restarts
    without a Tune checkpoint."""

    def __init__(self, spec: SweepSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.swept = {d.path for d in spec.space}
        self._params_logged: set[str] = set()
        self._tagged: dict[str, dict[str, str]] = {}  # trial_id -> the hp tags its run has

    def log_trial_start(self, trial) -> None:  # noqa: ANN001 - a Tune Trial
        if trial not in self._trial_runs:
            self._trial_runs[trial] = self._run_of(trial)
        if trial.trial_id not in self._params_logged:
            self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=self.fixed_params(trial.config))
            self._params_logged.add(trial.trial_id)

    def _run_of(self, trial) -> str:  # noqa: ANN001 - a Tune Trial
        """The MLflow run of ``trial``: the one an earlier driver of this sweep started, found by
        its ``trial_id`` tag and marked running again (Tune keeps no record of it: a sweep
        continued with ``--resume`` restores its callbacks as they were before any trial began),
        else a new one. Without this each continued trial became a second run, and its first
        stayed "running" for ever."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        found = client.search_runs([self.mlflow_util.experiment_id], filter_string=f"tags.trial_id = '{trial.trial_id}'",
                                   max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        tags = {**self.tags, "trial_name": str(trial), "trial_id": trial.trial_id}
        return self.mlflow_util.start_run(tags=tags, run_name=str(trial)).info.run_id

    def fixed_params(self, config: dict[str, Any]) -> dict[str, Any]:
        """A trial's config without its swept values (at the top level, and the base's own
        values of the swept fields, which the trial does not train with)."""
        base = {part: {k: v for k, v in fields.items() if f"{part}.{k}" not in self.swept}
                for part, fields in config.get("base", {}).items()}
        names = {p.rpartition(".")[2] for p in self.swept}
        return {**{k: v for k, v in config.items() if k not in names and k != "base"}, "base": base}

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:  # noqa: ANN001
        step = int(result.get("epoch") or result[TRAINING_ITERATION])
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=result, step=step)
        self._tag_words(trial, result)

    def _tag_words(self, trial, result: dict) -> None:  # noqa: ANN001 - a Tune Trial
        """The swept values that are no numbers, as the trial's tags (set when they change)."""
        words = {k: str(v) for k, v in result.items() if k.startswith(HP_PREFIX) and not _is_number(v)}
        tagged = self._tagged.setdefault(trial.trial_id, {})
        new = {k: v for k, v in words.items() if tagged.get(k) != v}
        if new:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.tracking_uri)
            for k, v in new.items():
                client.set_tag(self._trial_runs[trial], k, v)
            tagged.update(new)


def _is_number(v: Any) -> bool:
    """Whether MLflow takes ``v`` as a metric (Tune's callback logs what ``float`` accepts)."""
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def _search_alg(sweep: SweepConfig, max_concurrent: int):
    """How trials are drawn; at most ``max_concurrent`` run at once (Tune applies its own
    ``max_concurrent_trials`` only to searchers it wraps, not to a random search it is handed)."""
    if sweep.search == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=sweep.search_seed, max_concurrent=max_concurrent)
    check_search_package(sweep.search)  # (Ray's searchers without their package: a bare AssertionError)
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.search_seed)
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(random_state_seed=sweep.search_seed)


def _scheduler(spec: SweepSpec, epochs: int):
    """ASHA, or PBT; both count time in epochs (the ``epoch`` every result carries)."""
    if spec.pbt:
        return AlignedPBT(epochs=epochs, time_attr="epoch", perturbation_interval=spec.perturbation_interval,
                          hyperparam_mutations=spec.pbt_mutations(), quantile_fraction=spec.quantile_fraction,
                          custom_explore_fn=spec.clip, synch=spec.pbt_sync)
    return AlignedASHA(time_attr="epoch", max_t=epochs, grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)


class AlignedASHA(AsyncHyperBandScheduler):
    """ASHA that judges a trial at each rung by its score at the rung's own epoch, also after
    ``--resume``. Tune saves no scheduler state: a restored ASHA starts with empty rungs, and
    Ray files a result under the highest rung the trial has passed, so a trial resumed after
    epoch 5 would file its epoch-6 score in the epoch-4 rung, and another trial reaching epoch 4
    with a score above the first one's at epoch 4 but below its epoch 6 would be stopped. Here:

    * the rungs are filled again from the trials' run folders (`trial_history`: every epoch's
      metrics, also those whose results Tune lost): a restored trial's epochs up to its last
      result Tune kept when Tune adds it (finished trials included), and the epochs before its
      first result after each (re)start (it resumed after them; a later epoch may be trained
      again, its metrics being written before its checkpoint);
    * a result between rungs decides nothing and is filed nowhere (in a run of consecutive
      epochs each rung is reached at its own epoch, as Ray has it).

    The scores filed from the folders are not judged again: the trial trained past those rungs
    while the sweep's driver lived, so ASHA judged it there then (a trial below a cutoff would
    not have trained on). A rung the folders hold no score for stays without the trial's."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._caught_up: set[str] = set()  # the trials whose epochs before this start are in the rungs

    def on_trial_add(self, tune_controller, trial) -> None:  # noqa: ANN001
        super().on_trial_add(tune_controller, trial)
        self._caught_up.discard(trial.trial_id)  # (a restart after a failure: its first result catches up again)
        last = trial.run_metadata.last_result.get(self._time_attr)  # (restored: what Tune kept of its results)
        if last is not None:
            self._replay(trial, int(last))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:  # noqa: ANN001
        if self._time_attr not in result:
            return self.CONTINUE
        time = int(result[self._time_attr])
        if trial.trial_id not in self._caught_up:
            self._caught_up.add(trial.trial_id)
            self._replay(trial, time - 1)
        if time < self._max_t and not self._at_rung(trial, time):
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:  # noqa: ANN001
        if self._time_attr in result and not self._at_rung(trial, int(result[self._time_attr])):
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)

    def _at_rung(self, trial, time: int) -> bool:  # noqa: ANN001
        bracket = self._trial_info.get(trial.trial_id)
        return bracket is not None and any(time == milestone for milestone, _ in bracket._rungs)

    def _replay(self, trial, through: int) -> None:  # noqa: ANN001
        """File ``trial``'s scores at the rungs up to epoch ``through`` from its run folders,
        where a rung has none of it yet."""
        bracket, url = self._trial_info.get(trial.trial_id), trial.config.get("trials_url")
        rungs = [(m, recorded) for m, recorded in bracket._rungs if m <= through] if bracket is not None and url else []
        if not rungs:
            return
        scores = self._scores(trial, url)
        for milestone, recorded in rungs:
            v = scores.get(int(milestone))
            if isinstance(v, (int, float)) and v == v:
                recorded.setdefault(trial.trial_id, self._metric_op * float(v))

    def _scores(self, trial, url: str) -> dict[int, Any]:  # noqa: ANN001
        """Epoch -> the objective from the trial's run folders; {} when they cannot be read (the
        rungs then miss the trial's earlier scores: a storage error must not stop the sweep)."""
        try:
            return {h.epoch: h.values.get(self._metric) for h in trial_history(url, str(trial))}
        except (OSError, ValueError) as e:
            print(f"ASHA: trial {trial}'s run folders could not be read ({e}): its earlier scores are not in the rungs")
            return {}


class AlignedPBT(PopulationBasedTraining):
    """PBT that perturbs a trial only at multiples of ``perturbation_interval``, the epochs at
    which it hands Tune a checkpoint (`_trial`), also when it meets the trial in the middle of
    its run. Tune saves no scheduler state, so after ``--resume`` PBT knows every trial afresh
    (last perturbed at 0) and would perturb at its first result, say epoch 5 with interval 2:
    an epoch without a checkpoint, so an exploit of it is skipped, and every 2 epochs from
    there, never at a checkpoint again. Here a trial's first result at epoch ``t`` counts the
    last multiple before ``t`` as its last perturbation (0 for a fresh trial, as PBT has it;
    a trial first seen at 5 or 6 next perturbs at 6). Synchronous mode's next common
    perturbation moves there too: PBT starts it at the first interval and moves it one interval
    on per perturbation, so after a resume it would lag behind the trials, which from their
    second perturbation on would no longer wait for each other. A trial's last result after its
    training diverged (`diverged_result`) is passed over: the trial ends there; so is its
    result of the run's last epoch (``epochs``): there is nothing left to train, and an exploit
    there would throw the finished run away to train its last epochs again from another's
    checkpoint, which could be exploited at the end once more. A trial Tune adds again (its retry
    after a failure resets PBT's record of it) is aligned again at its next result."""

    def __init__(self, epochs: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._epochs = epochs
        self._seen: set[str] = set()  # the trials this scheduler has had a result from

    def on_trial_add(self, tune_controller, trial) -> None:  # noqa: ANN001
        super().on_trial_add(tune_controller, trial)
        self._seen.discard(trial.trial_id)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:  # noqa: ANN001
        if result.get(DIVERGED_KEY):  # (its objective is NaN: nothing to rank, nor to copy)
            return self.CONTINUE
        if self._epochs is not None and int(result.get(self._time_attr, 0)) >= self._epochs:
            return self.CONTINUE
        if trial.trial_id not in self._seen and self._time_attr in result:
            self._seen.add(trial.trial_id)
            self._align(self._trial_state[trial], int(result[self._time_attr]))
        return super().on_trial_result(tune_controller, trial, result)

    def _align(self, state, time: int) -> None:  # noqa: ANN001 - PBT's _PBTTrialState
        last = (time - 1) - (time - 1) % self._perturbation_interval
        if last > state.last_perturbation_time:
            state.last_perturbation_time = last
            if self._synch:
                self._next_perturbation_sync = max(self._next_perturbation_sync, last + self._perturbation_interval)


def sweep_url(base: ExperimentConfig, sweep: SweepConfig) -> str:
    from mtl.runs import out_root

    return f"{out_root(base.train.out)}/{sweep.sweep_name}"


# the sweep flags Tune keeps from the start of a sweep, beside the spec: which trials are drawn, how many at once
STORED_SWEEP_FLAGS = ("num_samples", "search", "search_seed", "max_concurrent")


def check_resume(base: ExperimentConfig, sweep: SweepConfig, spec: SweepSpec) -> None:
    """A resumed sweep continues what it started with: another space, objective, scheduler,
    number or draw of trials, or training config on the command line (operational settings such
    as --workers or --cpus-per-worker included) is refused (Tune would go on with the stored one)."""
    from mtl.runs import config_diff, predates_hint, stored_config
    from mtl.storage import read_bytes

    url = sweep_url(base, sweep)
    raw = read_bytes(f"{url}/{SWEEP_FILE}")
    if raw is None:
        raise FileNotFoundError(f"no sweep to resume at {url} (no {SWEEP_FILE})")
    if not tune_started(url):
        raise FileNotFoundError(f"the sweep at {url} never started (its {SWEEP_FILE} is there, Tune's saved state is not): "
                                f"nothing to resume; the same command without --resume starts it")
    stored = json.loads(raw)
    differ = SweepSpec.from_dict(stored["spec"]).differences(spec)
    flags = stored.get("sweep", {})  # (absent in sweeps started before it was stored)
    differ += [f"--{k.replace('_', '-')} {flags[k]} -> {getattr(sweep, k)}" for k in STORED_SWEEP_FLAGS
               if k in flags and flags[k] != getattr(sweep, k)]
    old_base = stored_config(stored["base"])
    differ += config_diff(old_base, base) + _settings_diff(old_base, base)
    if differ:
        raise ValueError(f"--resume: the sweep at {url} was started with other settings ({'; '.join(differ)}"
                         f"{predates_hint(old_base, base)}): resume it with the command that started it")


# what a resumed sweep may change: the driver's own settings, not its trials' (Tune restores those as stored)
_DRIVER_SETTINGS = frozenset({"train.resume", "train.name", "train.out", "dist.address"})


def _settings_diff(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """The trials' settings outside a run's identity that differ (loader workers, checkpoint
    interval, resources per worker...): Tune restores a sweep's trials with the stored ones, so
    a resume given others would quietly not apply them. ``dist.use_gpu`` left to the default
    (None: decided when the sweep starts) matches the stored decision."""
    a, b = (json.loads(json.dumps(_flat(c))) for c in (old, new))
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in _DRIVER_SETTINGS and a.get(k) != b.get(k) and not (k == "dist.use_gpu" and b.get(k) is None)]


def _flat(cfg: ExperimentConfig) -> dict[str, object]:
    return {f"{section}.{k}": v for section, fields in cfg.to_dict().items() for k, v in fields.items()}


def trial_resources() -> dict[str, float]:
    """What a trial's actor asks for (call after ``ray.init``). A trial only waits for its Train
    run, whose controller Ray places on the trial's node: on a node that a spot reclaim takes,
    the trial dies with it (no preemption notice reaches it, and each loss counts against
    --max-failures). So trials live on the node offering `TRIAL_RESOURCE` (the head of the
    clusters in cluster/, on-demand and without CPUs for training). On a cluster without one,
    anywhere, asking for `TRIAL_MEMORY` only: Tune needs some resource, and a sliver of a CPU
    would come out of the CPUs the trials at once are counted from (`trials_at_once`), so N
    trials of 1-CPU workers on N CPUs would leave the last worker group unplaced."""
    import ray

    if any(n.get("Alive") and n.get("Resources", {}).get(TRIAL_RESOURCE) for n in ray.nodes()):
        return {TRIAL_RESOURCE: 1}
    return {"memory": TRIAL_MEMORY}


def check_new(base: ExperimentConfig, sweep: SweepConfig) -> str | None:
    """A new sweep does not start over one that is there: FileExistsError naming it. A
    ``sweep.json`` without Tune's state is a start that failed before Tune began (earlier
    versions wrote it first): nothing to resume, so it is started anew, and the note returned
    says so for the log."""
    from mtl.storage import exists

    url = sweep_url(base, sweep)
    if not exists(f"{url}/{SWEEP_FILE}"):
        return None
    if tune_started(url):
        raise FileExistsError(f"a sweep is already at {url}: --resume continues it, or choose another --sweep-name")
    return f"the sweep at {url} never started (its {SWEEP_FILE} is there, Tune's saved state is not): starting it anew"


def tune_started(url: str) -> bool:
    """Tune saved the state of the sweep at ``url``, which ``--resume`` restores: its
    ``tuner.pkl`` (written when the Tuner is made) and an experiment state (written once
    ``fit`` runs; what fails before it, e.g. an MLflow server that cannot be reached, leaves
    none, and Tune then refuses to restore)."""
    from ray.tune.execution.tune_controller import TuneController

    from mtl.storage import storage_errors, url_to_fs

    with storage_errors(url):
        fs, path = url_to_fs(url)
        return fs.exists(f"{path}/{TUNER_FILE}") and bool(fs.glob(f"{path}/{TuneController.CKPT_FILE_TMPL.format('*')}"))


def run_sweep(base: ExperimentConfig, sweep: SweepConfig, spec: SweepSpec, resume: bool = False):
    """Run (or, with ``resume``, continue) the sweep; returns Tune's ResultGrid. A new sweep's
    ``sweep.json`` is written after everything that can refuse or fail on the way and after
    Tune's own state (the Tuner writes ``tuner.pkl``): a sweep.json always has a sweep that
    ``--resume`` can continue. A resume continues unfinished and failed trials alike, with
    their trial ids, hence names and run folders (Tune's ``restart_errored`` would give a failed
    trial a new id: a new run folder, from epoch 1)."""
    from ray import tune

    from mtl.distributed.ray_train import connect, plan
    from mtl.storage import write_bytes_atomic

    url = sweep_url(base, sweep)
    workers = plan(base, connect(base))  # the GPU decision, once for every trial; fails fast if never placeable
    if resume:
        check_same_devices(url, workers.use_gpu)
    base = dataclasses.replace(base, dist=dataclasses.replace(base.dist, use_gpu=workers.use_gpu))
    trainable = tune.with_resources(_trial, trial_resources())  # the trial itself only waits; Train workers hold the resources
    if resume:
        if not tune.Tuner.can_restore(url):
            raise FileNotFoundError(f"no sweep to resume at {url}")
        return tune.Tuner.restore(url, trainable=trainable, resume_unfinished=True, resume_errored=True).fit()
    tuner = _new_tuner(base, sweep, spec, trainable, trials_at_once(base, sweep, spec, workers.bundle))
    stored = {"spec": spec.to_dict(), "sweep": {k: getattr(sweep, k) for k in STORED_SWEEP_FLAGS}, "base": base.to_dict()}
    write_bytes_atomic(f"{url}/{SWEEP_FILE}", json.dumps(stored, indent=1).encode())
    return tuner.fit()


def check_same_devices(url: str, use_gpu: bool) -> None:
    """A resumed sweep's trials train on the devices the sweep started with (Tune restores them
    with that decision): a resume that would decide otherwise, e.g. run without RAY_ADDRESS on a
    machine without GPUs, so on a Ray instance of its own, is refused instead of leaving its
    trials waiting for GPUs that never come."""
    from mtl.runs import stored_config
    from mtl.storage import read_bytes

    raw = read_bytes(f"{url}/{SWEEP_FILE}")
    stored = stored_config(json.loads(raw)["base"]).dist.use_gpu if raw is not None else None
    if stored is not None and stored != use_gpu:
        kind = lambda gpu: "GPUs" if gpu else "CPUs"  # noqa: E731
        raise ValueError(f"--resume: the sweep at {url} trains on {kind(stored)}, and this Ray cluster would give its trials "
                         f"{kind(use_gpu)}: resume it on the cluster it started on (ray job submit --working-dir . -- python "
                         f"jobs/tune.py ... --resume), or give {'--use-gpu if GPUs will join this one' if stored else '--no-use-gpu'}")


def _new_tuner(base: ExperimentConfig, sweep: SweepConfig, spec: SweepSpec, trainable, concurrent: int):  # noqa: ANN001
    """Tune's Tuner for a new sweep of ``concurrent`` trials at once (making it writes Tune's
    state, ``tuner.pkl``, into the sweep's folder)."""
    from ray import tune

    from mtl.runs import out_root

    url = sweep_url(base, sweep)
    callbacks = [LeaderboardCallback(spec)]
    mlflow = mlflow_callback(sweep.sweep_name, spec)
    if mlflow is not None:
        callbacks.append(mlflow)
    arch, space = base.model.arch, spec.space
    if spec.pbt:  # the values change as the trial goes: the name says which trial, the report which values
        name = lambda t: f"{arch}_pbt_{t.trial_id}"  # noqa: E731
    else:
        name = lambda t: trial_name(arch, space, t.config, t.trial_id)  # noqa: E731
    return tune.Tuner(
        trainable,
        param_space={**param_space(space), "base": base.to_dict(), "trials_url": f"{url}/{TRIALS_DIR}", "sweep": spec.to_dict()},
        tune_config=tune.TuneConfig(
            metric=spec.key, mode=spec.mode, num_samples=sweep.num_samples, search_alg=_search_alg(sweep, concurrent),
            scheduler=_scheduler(spec, base.train.epochs), max_concurrent_trials=None if sweep.search == "random" else concurrent,
            trial_name_creator=name, trial_dirname_creator=name,
        ),
        run_config=tune.RunConfig(name=sweep.sweep_name, storage_path=out_root(base.train.out), callbacks=callbacks,
                                  # PBT: a weak trial copies a strong one's last perturbation checkpoint; keep a few
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=4) if spec.pbt else None,
                                  # a trial's own actor and Train controller live on the head (`trial_resources`),
                                  # else on a worker node: losing that node fails the trial itself, which Train's
                                  # own --max-failures cannot restart; Tune restarts it, continuing its run folder
                                  failure_config=tune.FailureConfig(max_failures=base.dist.max_failures)),
    )


class LeaderboardCallback(Callback):
    """Prints the leaderboard whenever a trial finishes (the terminal view during the sweep).
    It keeps no state across ``--resume``: what it knew of a trial before (its best epoch,
    whether it diverged) is read again when it first meets the trial, from the trial's run
    folders (`trial_history`) and the last result Tune kept."""

    def __init__(self, spec: SweepSpec) -> None:
        self.key, self.sign = spec.key, 1.0 if spec.mode == "max" else -1.0
        self.best: dict[str, tuple[float, int]] = {}
        self.diverged: set[str] = set()
        self.known: set[str] = set()  # the trials whose earlier epochs are in ``best``

    def __setstate__(self, state: dict[str, Any]) -> None:  # (a sweep started by an earlier version pickled none)
        self.__dict__.update({"known": set(), "diverged": set(), **state})

    def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
        self._catch_up(trial)
        self._note(trial.trial_id, result)

    def _note(self, trial_id: str, result: dict[str, Any]) -> None:
        if result.get(DIVERGED_KEY):
            self.diverged.add(trial_id)
        v = result.get(self.key)
        if isinstance(v, (int, float)) and v == v and (trial_id not in self.best or self.sign * v > self.sign * self.best[trial_id][0]):
            self.best[trial_id] = (v, int(result.get("epoch", 0)))

    def _catch_up(self, trial) -> None:  # noqa: ANN001 - a Tune Trial
        if trial.trial_id in self.known:
            return
        self.known.add(trial.trial_id)
        url = trial.config.get("trials_url")
        try:  # (the leaderboard is a view: a storage error leaves it with what Tune reports)
            history = trial_history(url, str(trial)) if url else []
        except (OSError, ValueError) as e:
            print(f"leaderboard: trial {trial}'s run folders could not be read ({e})")
            history = []
        for h in history:
            self._note(trial.trial_id, {**h.values, "epoch": h.epoch})
        self._note(trial.trial_id, {k: v for k, v in trial.run_metadata.last_result.items() if k in (DIVERGED_KEY, "epoch")})

    def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
        from rich.table import Table

        from mtl.progress import wide_console

        for x in trials:
            self._catch_up(x)
        t = Table(title=f"sweep leaderboard ({sum(1 for x in trials if x.status == 'TERMINATED')}/{len(trials)} trials done)")
        for c in ("trial", "status", f"best {self.key}", "at epoch"):
            t.add_column(c)
        ranked = sorted(trials, key=lambda x: self.sign * self.best.get(x.trial_id, (self.sign * float("-inf"),))[0], reverse=True)
        for x in ranked:
            v, ep = self.best.get(x.trial_id, (float("nan"), 0))
            t.add_row(str(x), "DIVERGED" if x.trial_id in self.diverged else x.status, f"{v:.2f}", str(ep))
        wide_console().print(t)
