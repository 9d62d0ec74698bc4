"""A sweep resumed with --resume after its driver died: Tune restores its trials and their
results only as of its last saved state, saves no scheduler state, and (with a new driver) keeps
in a trial's result file only what it received since. ASHA, the terminal leaderboard and the
report still judge every trial by all the epochs it trained, read from its run folders. Ray's
scheduler and Tune's trials run for real, without Ray started; training is a stand-in that
leaves run folders as it does."""

import json
import math
import os

import pytest

from mtl.config import ExperimentConfig
from mtl.distributed.sweep_report import SweepReport
from mtl.distributed.sweep_space import SweepSpec, parse_space
from tune_fakes import Frame

SPEC = SweepSpec(parse_space(["lr=loguniform:1e-5:1e-3"]), grace_period=1, reduction_factor=2)


def _trained(trials, name, graders, start=1, config=None, seed=None, commit=True):
    """Run folder ``trials/name`` as training leaves it: each epoch's metrics (from epoch
    ``start``), the last one's checkpoint committed (unless not ``commit``), its config, and
    where a PBT exploit seeded it from (``seed``: a tag)."""
    from mtl.checkpoint import CheckpointIndex

    folder = trials / name
    os.makedirs(folder / "metrics", exist_ok=True)
    for epoch, g in enumerate(graders, start):
        (folder / "metrics" / f"epoch-{epoch:04d}.json").write_text(
            json.dumps({"epoch": epoch, "grader": g, "miou": g + 50, "si_log_rmse": 50.0, "score": g}))
    if commit and graders:
        tag = f"epoch-{start + len(graders) - 1:04d}"
        os.makedirs(folder / "checkpoints" / tag, exist_ok=True)
        CheckpointIndex(str(folder)).commit(tag)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if seed is not None:
        (folder / "pbt-origin.json").write_text(json.dumps({"from": {"run": "elsewhere", "tag": seed}, "values": {}}))


def _trial(name, trials, status="PENDING", last=None):
    """A trial as Tune restores it: its name, config, status and the last result Tune kept."""
    from ray.tune.experiment import Trial

    t = Trial("trial", config={"lr": 1e-4, "trials_url": str(trials)}, stub=True, trial_name_creator=lambda t: name)
    t.set_status(status)
    t.run_metadata.last_result = dict(last or {})
    return t


def test_asha_after_a_resume_judges_each_trial_at_the_rungs_own_epochs(tmp_path):
    """Rungs at epochs 1, 2, 4 (grace 1, factor 2). Before the driver died, trial A had trained
    5 epochs (Tune had saved its results up to epoch 3), D had finished all 8, and E's metrics
    of epochs 4-5 are gone. After --resume A and E first report epoch 6; C, then B start. C's
    epoch 4 (30) is below the median of A's (26) and finished D's (40) there: C is stopped. B's
    (34) beats A's epoch 4 and stays above the rung's median (30): B goes on, though A's epoch 6
    (45) is better. (Ray files a result under the highest rung passed: A's and E's epoch 6
    would be in the epoch-4 rung, and B stopped.)"""
    from ray.tune.schedulers import TrialScheduler

    from mtl.distributed.tune import _scheduler

    trials = tmp_path / "trials"
    _trained(trials, "A", [10.0, 20.0, 25.0, 26.0, 35.0])
    _trained(trials, "D", [5.0, 10.0, 20.0, 40.0, 55.0, 60.0, 60.0, 60.0])
    _trained(trials, "E", [10.0, 20.0, 25.0])
    asha = _scheduler(SPEC, 8)
    asha.set_search_properties("grader", "max")
    a = _trial("A", trials, last={"epoch": 3, "grader": 25.0})
    d = _trial("D", trials, status="TERMINATED", last={"epoch": 8, "grader": 60.0, "done": True})
    e = _trial("E", trials, last={"epoch": 3, "grader": 25.0})
    b, c = _trial("B", trials), _trial("C", trials)
    for t in (a, d, e, b, c):
        asha.on_trial_add(None, t)  # (what Tune's restore does: finished trials included)
    continue_, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert asha.on_trial_result(None, a, {"epoch": 6, "grader": 45.0}) == continue_
    assert asha.on_trial_result(None, e, {"epoch": 6, "grader": 100.0}) == continue_
    for t in (c, b):
        for epoch in (1, 2, 3):
            assert asha.on_trial_result(None, t, {"epoch": epoch, "grader": 30.0}) == continue_
    assert asha.on_trial_result(None, c, {"epoch": 4, "grader": 30.0}) == stop  # below the median of 26 and 40
    assert asha.on_trial_result(None, b, {"epoch": 4, "grader": 34.0}) == continue_  # median of 26, 40, 30


def test_the_leaderboard_after_a_resume_shows_what_the_trials_trained_before(tmp_path, monkeypatch):
    """The terminal leaderboard's callback starts empty after --resume: a trial that finished
    before shows its best epoch, a resumed one its best over all its epochs, a diverged one as
    diverged."""
    import pickle

    from mtl.distributed import tune

    trials = tmp_path / "trials"
    _trained(trials, "done", [10.0, 40.0, 30.0])
    _trained(trials, "resumed", [20.0, 35.0])
    _trained(trials, "hot", [5.0])
    done = _trial("done", trials, status="TERMINATED", last={"epoch": 3, "grader": 30.0})
    resumed = _trial("resumed", trials, status="RUNNING", last={"epoch": 1, "grader": 20.0})
    hot = _trial("hot", trials, status="TERMINATED", last={"epoch": 2, "grader": math.nan, "diverged": 1})
    board = pickle.loads(pickle.dumps(tune.LeaderboardCallback(SPEC)))  # (Tune keeps it pickled in tuner.pkl)
    board.on_trial_result(0, [done, resumed, hot], resumed, {"epoch": 3, "grader": 25.0})
    printed = []
    monkeypatch.setattr("mtl.progress.wide_console", lambda: type("Console", (), {"print": lambda self, t: printed.append(t)})())
    board.on_trial_complete(0, [done, resumed, hot], resumed)
    assert board.best == {done.trial_id: (40.0, 2), resumed.trial_id: (35.0, 2), hot.trial_id: (5.0, 1)}
    assert board.diverged == {hot.trial_id} and len(printed) == 1


class _Result:
    """One trial of Tune's ResultGrid after a resume with a new driver: its result file holds
    only the epochs the new driver received."""

    def __init__(self, name, trials, epochs, graders, last, **columns):
        self.config, self.path, self.error, self.metrics = {"lr": 1e-4, "trials_url": str(trials)}, f"/s/{name}", None, last
        self.metrics_dataframe = Frame(epoch=list(epochs), grader=graders, miou=[g + 50 for g in graders],
                                        si_log_rmse=[50.0] * len(graders), **columns)


def test_the_report_of_a_resumed_sweep_ranks_each_trial_by_all_its_epochs(tmp_path):
    """Trial t trained epochs 1-6, its best at epoch 2; Tune's results after the resume hold
    epochs 4-6 only. The report says best epoch 2, with its score and its run folder's best.pt;
    and t ranks above u, whose best (25) beats t's epochs 4-6 but not t's epoch 2."""
    trials = tmp_path / "trials"
    _trained(trials, "t", [20.0, 40.0, 30.0, 22.0, 21.0, 23.0])
    _trained(trials, "u", [25.0, 24.0])
    t = _Result("t", trials, [4, 5, 6], [22.0, 21.0, 23.0], {"epoch": 6, "done": True}, run=["t"] * 3, **{"hp/lr": [1e-4] * 3})
    u = _Result("u", trials, [1, 2], [25.0, 24.0], {"epoch": 2, "done": True})
    rows = SweepReport(SPEC, ("semseg", "depth")).rows([u, t], max_epochs=6)
    assert [(r.name, r.best_epoch, r.objective, r.epochs, r.status) for r in rows] == [
        ("t", 2, 40.0, 6, "completed"), ("u", 1, 25.0, 2, "stopped early")]
    assert rows[0].values["miou"] == 90.0 and rows[0].best_model == f"{trials}/t/best.pt"
    assert rows[0].history == [(1, 20.0), (2, 40.0), (3, 30.0), (4, 22.0), (5, 21.0), (6, 23.0)]


@pytest.mark.parametrize("committed, status", [("epoch-0002", "unfinished"), ("epoch-0003", "completed")])
def test_a_trial_interrupted_before_its_last_checkpoint_is_unfinished(tmp_path, committed, status):
    """An epoch's metrics are written before its checkpoint: a sweep stopped in between has the
    last epoch's results, but the trial's checkpoint is the epoch before, and --resume trains
    the epoch again. Tune never saw the trial end (its last result is not done): unfinished,
    unless its pointer names the last epoch."""
    from mtl.checkpoint import CheckpointIndex

    trials = tmp_path / "trials"
    _trained(trials, "t", [10.0, 20.0, 30.0], commit=False)
    for tag in ("epoch-0002", "epoch-0003")[: 1 + (committed == "epoch-0003")]:
        os.makedirs(trials / "t" / "checkpoints" / tag)
        CheckpointIndex(str(trials / "t")).commit(tag)
    t = _Result("t", trials, [1, 2, 3], [10.0, 20.0, 30.0], {"epoch": 3})
    (row,) = SweepReport(SPEC, ("semseg", "depth")).rows([t], max_epochs=3)
    assert (row.epochs, row.status) == (3, status)


def test_a_resumed_pbt_trial_takes_each_epoch_from_the_folder_that_trained_it(tmp_path):
    """PBT trial p had trained epochs 1-4 in p/ when it copied trial q's epoch-2 checkpoint (q
    was behind) and went on in p-p1/ with lr 4e-4; it had trained epoch 3 again there when the
    sweep was interrupted. Tune's results, after an earlier resume, hold that epoch 3 only. Its
    epochs: 1-2 from p/, 3 from p-p1/ (p/'s epochs 3-4 are the branch it left); its best (epoch
    3) shows p-p1's values, read from the folder, and its best.pt."""
    trials = tmp_path / "trials"
    base = ExperimentConfig().to_dict()
    _trained(trials, "p", [10.0, 20.0, 50.0, 60.0], config=base)
    _trained(trials, "p-p1", [30.0], start=3, config={**base, "optim": {**base["optim"], "lr": 4e-4}}, seed="epoch-0002")
    p = _Result("p", trials, [3], [30.0], {"epoch": 3}, run=["p-p1"])
    (row,) = SweepReport(SweepSpec(SPEC.space, scheduler="pbt"), ("semseg", "depth")).rows([p], max_epochs=5)
    assert (row.best_epoch, row.objective, row.hp["lr"], row.best_model) == (3, 30.0, 4e-4, f"{trials}/p-p1/best.pt")
    assert (row.history, row.epochs, row.status) == ([(1, 10.0), (2, 20.0), (3, 30.0)], 3, "unfinished")


@pytest.fixture
def finished_run(tmp_path):
    """Trial t's run folder after it trained its last (second) epoch: committed checkpoint and
    metrics; the trial's config as Tune hands it."""
    from mtl.checkpoint import STATE_FILE, CheckpointIndex, FolderStorage, checkpoint_bytes
    from mtl.distributed.tune import start_run
    from mtl.runs import run_url

    trials = str(tmp_path / "trials")
    base = ExperimentConfig().with_values({"train.epochs": 2})
    cfg = start_run(base, SPEC, {"lr": 1e-4}, trials, "t")
    _trained(tmp_path / "trials", "t", [30.0, 35.0], config=cfg.to_dict())
    os.makedirs(tmp_path / "ck")
    (tmp_path / "ck" / STATE_FILE).write_bytes(checkpoint_bytes({"config": cfg.to_dict(), "metrics": {"epoch": 2}}))
    FolderStorage(run_url(cfg)).publish(str(tmp_path / "ck"), "epoch-0002", {})
    CheckpointIndex(run_url(cfg)).commit("epoch-0002")
    return {"lr": 1e-4, "base": base.to_dict(), "trials_url": trials, "sweep": SPEC.to_dict()}


def test_a_trial_restarted_before_its_pointer_moved_resumes_from_rays_record(tmp_path):
    """A foreground checkpoint's report reaches Ray before rank 0 moves latest.json: a trial
    restarted in between finds Ray's record and no pointer, and must resume (from Ray's
    checkpoint), not fail for good with "pass --resume"."""
    from mtl.distributed.tune import start_run
    from mtl.runs import RAY_SNAPSHOT, run_url

    trials, base = str(tmp_path / "trials"), ExperimentConfig().with_values({"train.epochs": 2})
    run = run_url(start_run(base, SPEC, {"lr": 1e-4}, trials, "t"))
    os.makedirs(f"{run}/checkpoints/epoch-0001")
    with open(f"{run}/{RAY_SNAPSHOT}", "w") as fh:
        json.dump({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoints/epoch-0001"}}, fh)
    assert start_run(base, SPEC, {"lr": 1e-4}, trials, "t").train.resume


def test_a_trial_restarted_after_its_last_epoch_reports_that_epoch_again(finished_run, monkeypatch):
    """The driver died just after trial t's last epoch (Tune had not saved that result). After
    --resume t restarts, trains nothing, and reports its last epoch: Tune, ASHA and the report
    see it completed, not stopped early at the epoch Tune had saved."""
    import ray.tune

    from mtl.distributed import tune

    reported = []
    context = type("Context", (), {"get_trial_name": lambda self: "t"})()
    monkeypatch.setattr(ray.tune, "get_context", lambda: context)
    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.tune, "report", lambda result, **k: reported.append(result))
    monkeypatch.setattr("mtl.distributed.ray_train.make_trainer", lambda *a, **k: pytest.fail("a finished run trains nothing"))
    tune._trial(finished_run)
    (result,) = reported
    assert (result["epoch"], result["grader"], result["hp/lr"], result["run"]) == (2, 35.0, 1e-4, "t")


def test_run_folders_that_cannot_be_read_leave_the_sweep_on_what_tune_reports(tmp_path, monkeypatch, capsys):
    """A storage error while reading a trial's run folders (an endpoint briefly down, a file cut
    short) must not stop the sweep's driver nor cost its report: ASHA and the leaderboard go on
    with what Tune reports, the report's row shows Tune's results. And a folder Tune's results
    name that a stale listing misses is taken from Tune's rows."""
    from mtl.distributed import sweep_report, tune
    from mtl.storage import StorageError

    def unreachable(*a, **k):
        raise StorageError("cannot reach http://127.0.0.1:1 (s3://b/sweeps/s/trials)")

    trials = tmp_path / "trials"
    _trained(trials, "a", [10.0, 20.0, 25.0])
    monkeypatch.setattr(tune, "trial_history", unreachable)
    asha = tune._scheduler(SPEC, 8)
    asha.set_search_properties("grader", "max")
    a = _trial("a", trials, last={"epoch": 3, "grader": 25.0})
    asha.on_trial_add(None, a)
    assert asha.on_trial_result(None, a, {"epoch": 4, "grader": 30.0}) == "CONTINUE"
    board = tune.LeaderboardCallback(SPEC)
    board.on_trial_result(0, [a], a, {"epoch": 4, "grader": 30.0})
    assert board.best == {a.trial_id: (30.0, 4)} and "could not be read" in capsys.readouterr().out
    monkeypatch.setattr(sweep_report, "_folders", unreachable)
    (row,) = SweepReport(SPEC, ("semseg", "depth")).rows([_Result("a", trials, [3, 4], [25.0, 30.0], {"epoch": 4})], 8)
    assert (row.best_epoch, row.objective) == (4, 30.0) and "its row shows what Tune reported" in capsys.readouterr().err
    monkeypatch.undo()
    stale = _Result("a", trials, [3, 4], [25.0, 30.0], {"epoch": 4}, run=["a", "a-p1"])  # a-p1/ made since the listing
    (row,) = SweepReport(SPEC, ("semseg", "depth")).rows([stale], 8)
    assert (row.best_epoch, row.objective, row.history[-1]) == (4, 30.0, (4, 30.0))


def test_a_leaderboard_pickled_by_an_earlier_version_resumes(tmp_path):
    """Tune keeps the callback pickled in tuner.pkl: one from before the leaderboard knew of
    diverged trials and of catching up has neither set, and a resumed sweep must not fail on
    its first result."""
    import pickle

    from mtl.distributed import tune

    old = tune.LeaderboardCallback(SPEC)
    del old.__dict__["diverged"], old.__dict__["known"]
    board = pickle.loads(pickle.dumps(old))
    trial = _trial("t", tmp_path / "trials", status="RUNNING")
    board.on_trial_result(0, [trial], trial, {"epoch": 1, "grader": 5.0, "diverged": 1})
    assert board.diverged == {trial.trial_id} and board.best == {trial.trial_id: (5.0, 1)}
