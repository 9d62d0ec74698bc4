"""How runs and trials end, without Ray: a divergence is an outcome (a training run on Ray
fails once with it; a sweep's trial ends as diverged and the sweep goes on), an interrupted
sweep says so and exits 1, and MLflow takes a trial that PBT restarts with new values. Ray's
and Tune's own pieces (schedulers, MLflow callback, the result check) run for real; the Train
run is a stand-in that restarts a failed attempt as Ray Train does."""

import math
import os

import pytest
import torch

from mtl.config import ExperimentConfig
from mtl.distributed.sweep_report import SweepReport
from mtl.distributed.sweep_space import SweepSpec, parse_space
from tune_fakes import Frame

MESSAGE = "training diverged: the loss is nan by step 3 of epoch 2 (LR 1e+30): lower --lr, or clip with --grad-clip"


class _TrainResult:
    """What a Ray Train run's fit() returns (V2): rank 0's return value among the rest."""

    def __init__(self, return_value):
        self.return_value, self.error, self.checkpoint, self.metrics = return_value, None, None, None


class _Trainer:
    """A TorchTrainer of one worker, restarting a failed attempt up to --max-failures times as
    Ray Train does, then raising what the worker raised (`ray.train.WorkerGroupError`)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def fit(self):
        import ray.train

        from mtl.distributed.ray_train import train_worker

        for _ in range(self.cfg.dist.max_failures + 1):
            try:
                return _TrainResult(train_worker({"config": self.cfg.to_dict(), "track_mlflow": False}))
            except Exception as e:  # noqa: BLE001 - Ray Train catches a worker's every error
                failure = e
        raise ray.train.WorkerGroupError(str(failure), {0: failure})


@pytest.fixture
def diverging_training(monkeypatch):
    """Ray Train without Ray: one CPU worker of rank 0 whose training diverges in epoch 2; the
    attempts it makes are counted."""
    import ray.train

    from mtl.distributed import ray_train
    from mtl.distributed.capacity import WorkerPlan
    from mtl.engine import TrainingDiverged

    attempts = []

    def fit(cfg, rt):
        attempts.append(rt.rank)
        raise TrainingDiverged(MESSAGE, epoch=2, step=3)

    context = type("Context", (), {"get_world_rank": lambda self: 0, "get_world_size": lambda self: 1})()
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    monkeypatch.setattr(ray_train, "_worker_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray_train, "fit", fit)
    monkeypatch.setattr(ray_train, "connect", lambda cfg: False)
    monkeypatch.setattr(ray_train, "plan", lambda cfg, joined: WorkerPlan(False, {"CPU": 1.0}, True, "test"))
    monkeypatch.setattr(ray_train, "make_trainer", lambda cfg, bundle, **k: _Trainer(cfg))
    return attempts


def test_a_training_run_on_ray_that_diverges_fails_once_with_its_message(diverging_training, tmp_path, in_process):
    """A too high LR diverges again on every restart from the last checkpoint: jobs/train.py on
    Ray stops at the first divergence with the engine's message (exit 2, as local mode), not
    after --max-failures restarts that would only repeat it."""
    from jobs.train import main

    r = in_process(main, ["--root", str(tmp_path / "data"), "--out", str(tmp_path / "runs"), "--name", "hot", "--epochs", "4",
                          "--lr", "1e30", "--max-failures", "2", "--no-use-gpu"])
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == f"error: {MESSAGE}"
    assert diverging_training == [0]  # one attempt: Ray restarted nothing


def test_a_diverged_trial_ends_normally_as_diverged(diverging_training, tmp_path, monkeypatch):
    """A trial's Train run that diverges is not retried by Ray Train (its workers return the
    divergence), and the trial reports it to Tune and ends normally: Tune restarts nothing, and
    the result it gets is one Tune, the schedulers and the report all take."""
    import ray.tune

    from mtl.distributed import ray_train, tune
    from mtl.distributed.ray_train import run_ray
    from mtl.engine import TrainingDiverged

    cfg = ExperimentConfig().with_values({"train.out": str(tmp_path), "train.name": "t1", "dist.max_failures": 2})
    with pytest.raises(TrainingDiverged, match="training diverged: the loss is nan by step 3 of epoch 2"):
        run_ray(cfg, log=lambda *a: None)
    assert diverging_training == [0]
    spec = SweepSpec(parse_space(["lr=loguniform:1e-5:1e-3"]))
    reported = []
    monkeypatch.setattr(ray.tune, "report", lambda result, **k: reported.append(result))
    outcome = {"result": _Trainer(cfg).fit()}
    assert diverging_training == [0, 0]  # the trial's Train run: one attempt too
    tune.end_trial(outcome, spec, {"lr": 1e30}, "t1", "trial-1")  # no error: the trial ends normally
    (result,) = reported
    assert result["diverged"] == 1 and result["epoch"] == 2 and math.isnan(result["grader"])
    assert (result["hp/lr"], result["run"]) == (1e30, "t1")
    _tune_accepts(result, spec)
    # a failure is still one: Tune restarts the trial (--max-failures), then counts it failed
    with pytest.raises(RuntimeError, match="node lost"):
        tune.end_trial({"error": RuntimeError("node lost")}, spec, {}, "t1", "trial-1")
    assert ray_train.diverged(_TrainResult(None)) is None


def _tune_accepts(result, spec):
    """Tune's strict check that every result has the objective; ASHA files the NaN under no
    cutoff (a weak trial is still stopped); PBT passes over the result (neither ranks nor copies it)."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from mtl.distributed.tune import AlignedPBT, _scheduler

    searcher = type("Searcher", (), {"metric": spec.key})()
    controller = type("Controller", (), {"_metric": spec.key, "_scheduler_alg": searcher, "_search_alg": searcher})()
    TuneController._validate_result_metrics(controller, result)  # (raises when the objective is missing)
    asha = _scheduler(spec, 8)
    assert isinstance(asha, ASHAScheduler)
    asha.set_search_properties(spec.key, spec.mode)
    strong, hot, weak = (Trial("trial", config={}, stub=True) for _ in range(3))
    for t in (strong, hot, weak):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, strong, {"epoch": 1, spec.key: 30.0}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, hot, {**result, "epoch": 1}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, weak, {"epoch": 1, spec.key: 10.0}) == TrialScheduler.STOP  # the cutoff is strong's
    pbt = AlignedPBT(time_attr="epoch", metric=spec.key, mode=spec.mode, perturbation_interval=2,
                     hyperparam_mutations={"lr": [1e-4, 1e-3]})
    controller = type("Controller", (), {"search_alg": None})()
    pbt.on_trial_add(controller, hot)
    assert pbt.on_trial_result(controller, hot, result) == TrialScheduler.CONTINUE  # epoch 2, an interval: passed over
    assert pbt._trial_state[hot].last_score is None


class _Result:
    """What the report reads of one trial of Tune's ResultGrid; ``last``: its last result."""

    def __init__(self, name, graders, last, **columns):
        n = len(graders)
        self.config, self.path, self.error, self.metrics = {"lr": 1e-4, "trials_url": "/s/trials"}, f"/s/{name}", None, last
        self.metrics_dataframe = Frame(grader=graders, miou=[g + 50 for g in graders], si_log_rmse=[50.0] * n,
                                        epoch=list(range(1, n + 1)), **columns)


SPEC = SweepSpec(parse_space(["lr=loguniform:1e-5:1e-3"]))


def _sweep(monkeypatch, tmp_path, results, root):
    from jobs import tune as tune_cli
    from mtl.distributed import tune

    monkeypatch.setattr(tune, "run_sweep", lambda *a, **k: results)
    return tune_cli.main(["--root", root, "--out", str(tmp_path), "--sweep-name", "s", "--epochs", "3",
                          "--space", "lr=loguniform:1e-5:1e-3"])


def test_a_sweep_with_a_diverged_trial_reports_it_and_exits_0(tmp_path, monkeypatch, capsys, tiny_root):
    """Values that make training diverge are a finding of the sweep, not a failure: the trial
    shows as diverged (ranked by the epochs it finished), the sweep exits 0."""
    nan = float("nan")
    results = [_Result("good", [20.0, 30.0, 35.0], {"done": True, "epoch": 3}),
               _Result("hot", [25.0, nan], {"done": True, "diverged": 1, "epoch": 2}, diverged=[nan, 1]),
               _Result("hotter", [nan], {"done": True, "diverged": 1, "epoch": 1}, diverged=[1])]
    rows = SweepReport(SPEC, ("semseg", "depth")).rows(results, max_epochs=3)
    assert [(r.name, r.status, r.epochs, r.best_epoch) for r in rows] == [("good", "completed", 3, 3), ("hot", "diverged", 1, 1),
                                                                           ("hotter", "diverged", 0, 0)]
    rc = _sweep(monkeypatch, tmp_path, results, tiny_root)
    out, err = capsys.readouterr()
    assert rc == 0 and not err, err
    assert "2 of 3 trials diverged (hot, hotter)" in out and "best trial: good" in out
    assert (tmp_path / "s" / "results.csv").read_text().count(",diverged,") == 2


def test_an_interrupted_sweep_lists_its_unfinished_trials_and_exits_1(tiny_root, tmp_path, monkeypatch, capsys):
    """Ctrl-C stops Tune's loop and its trials; Tune returns their results as if they had ended.
    Their last result is not 'done' (Tune never saw them end): they are unfinished, not stopped
    early by ASHA, and the sweep exits 1 pointing at --resume."""
    results = [_Result("asha-stopped", [10.0], {"done": True, "epoch": 1}), _Result("running", [20.0, 25.0], {"epoch": 2}),
               _Result("pending", [], {}),
               _Result("trained-all", [20.0, 25.0, 30.0], {"epoch": 3})]  # (restored by --resume: 'done' may be lost)
    rows = {r.name: r.status for r in SweepReport(SPEC, ("semseg", "depth")).rows(results, max_epochs=3)}
    assert rows == {"asha-stopped": "stopped early", "running": "unfinished", "pending": "unfinished", "trained-all": "completed"}
    rc = _sweep(monkeypatch, tmp_path, results, tiny_root)
    _, err = capsys.readouterr()
    assert rc == 1
    assert ("error: the sweep was interrupted: 2 of 4 trials are unfinished (running, pending); the same command with --resume "
            "continues it") in err


def test_mlflow_takes_a_trial_that_pbt_restarts_with_new_values(tmp_path, monkeypatch):
    """PBT's exploit sets a trial's perturbed lr and restarts it; Tune then calls the MLflow
    callback's trial start again. MLflow refuses to change a logged parameter, so the trial's
    fixed settings are its parameters (once) and the swept values its metrics (hp/lr, each
    epoch); metrics are logged at their epoch, though Tune's iteration count starts again."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from ray.tune.experiment import Trial

    from mtl.distributed.tune import mlflow_callback, trial_result

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{os.path.join(tmp_path, 'mlruns')}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    spec = SweepSpec(parse_space(["lr=loguniform:1e-5:1e-3"]), scheduler="pbt")
    callback = mlflow_callback("pbt-sweep", spec)
    callback.setup()
    base = ExperimentConfig().to_dict()
    trial = Trial("trial", config={"lr": 1e-4, "base": base, "trials_url": "/s/trials", "sweep": spec.to_dict()}, stub=True)
    callback.log_trial_start(trial)
    callback.log_trial_result(1, trial, {**trial_result({"epoch": 2, "score": 1.0}, (), {"lr": 1e-4}, "t"), "training_iteration": 2})
    trial.set_config({**trial.config, "lr": 1.2e-4})  # PBT's exploit: perturbed, restarted without a Tune checkpoint
    callback.log_trial_start(trial)
    callback.log_trial_result(3, trial, {**trial_result({"epoch": 3, "score": 2.0}, (), {"lr": 1.2e-4}, "t-p1"), "training_iteration": 1})
    callback.log_trial_end(trial)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pbt-sweep").experiment_id])
    params = run.data.params
    assert "lr" not in params and "base/optim/lr" not in params  # swept: not a parameter
    assert params["base/optim/weight_decay"] == str(base["optim"]["weight_decay"]) and params["trials_url"] == "/s/trials"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "hp/lr")] == [(2, 1e-4), (3, 1.2e-4)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "score")] == [2, 3]  # the epochs


def test_mlflow_continues_a_trials_run_when_the_sweep_is_resumed(tmp_path, monkeypatch):
    """`jobs/tune.py --resume` after the driver died: Tune restores the callback as it was pickled
    before any trial began, so it knows no runs. A trial it continues logs to the run the first
    driver started for it (one run per trial, finished at the end), not to a second one. Swept
    values that are no numbers are the run's tags."""
    pytest.importorskip("mlflow")
    import ray.cloudpickle as pickle
    from mlflow.tracking import MlflowClient
    from ray.tune.experiment import Trial

    from mtl.distributed.tune import mlflow_callback, trial_result

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{os.path.join(tmp_path, 'mlruns')}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    spec = SweepSpec(parse_space(["lr=loguniform:1e-5:1e-3", "task_weighting=choice:fixed,dwa"]))
    first = mlflow_callback("resumed-sweep", spec)
    pickled = pickle.dumps(first)  # (tuner.pkl: written as the Tuner is made)
    config = {"lr": 1e-4, "base": ExperimentConfig().to_dict(), "trials_url": "/s/trials", "sweep": spec.to_dict()}

    def log(callback, trial_id: str, epoch: int) -> Trial:
        trial = Trial("trial", config=dict(config), stub=True, trial_id=trial_id)
        callback.log_trial_start(trial)
        result = trial_result({"epoch": epoch, "score": float(epoch)}, (), {"lr": 1e-4, "task_weighting": "dwa"}, "t")
        callback.log_trial_result(1, trial, {**result, "training_iteration": 1})
        return trial

    first.setup()
    log(first, "abcde_00000", 1)
    log(first, "abcde_00001", 1)
    second = pickle.loads(pickled)  # the driver died; --resume
    second.setup()
    second.log_trial_end(log(second, "abcde_00000", 2))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("resumed-sweep").experiment_id])
    by_trial = {r.data.tags["trial_id"]: r for r in runs}
    assert sorted(by_trial) == ["abcde_00000", "abcde_00001"]  # one run each
    continued = by_trial["abcde_00000"]
    assert continued.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(continued.info.run_id, "score")] == [(1, 1.0), (2, 2.0)]
    assert by_trial["abcde_00001"].info.status == "RUNNING"  # (not continued yet)
    # a swept value that is no number: a tag (MLflow's metrics are numbers), not a parameter
    assert continued.data.tags["hp/task_weighting"] == "dwa" and "hp/task_weighting" not in continued.data.metrics
