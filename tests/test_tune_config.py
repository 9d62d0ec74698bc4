"""Sweeps are checked before Ray or any trial starts. The search space is given on the command line
(``--space FIELD=KIND:ARGS``) for any config field; flags given for fields the space does not
sweep fix them for every trial; the space alone gives Tune's space, each trial's config and name,
PBT's mutations and the report's columns. PBT trials continue from another trial's checkpoint in
a run folder of their own. No test here starts Ray."""

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mtl.config import ExperimentConfig, OptimConfig, TrainConfig
from mtl.distributed.sweep_report import SweepReport
from mtl.distributed.sweep_space import (DEFAULT_SPACE, SweepConfig, SweepSpec, check_space, choose_space, explicit_fields,
                                         parse_dim, parse_space, plan_sweep, trial_config, trial_name)
from tune_fakes import Frame

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACE = parse_space(["lr=loguniform:1e-5:1e-3", "--semseg-weight=uniform:0.3:0.7", "data.scale_max=choice:1.0,1.25",
                     "hflip=choice:true,false", "encoder=choice:resnet18,resnet34"])
HP = {"lr": 3.2e-4, "semseg_weight": 0.58, "scale_max": 1.25, "hflip": True, "encoder": "resnet18"}


@pytest.mark.parametrize("args, message", [
    (["--space", "lr=loguniform:1e-2:1e-3"], "--space lr=loguniform:1e-2:1e-3: need LOW <= HIGH, got 0.01 and 0.001"),
    (["--space", "semseg_weight=uniform:0.3:1.5"], "--space optim.semseg_weight=uniform:0.3:1.5: --semseg-weight must lie in [0, 1], got 1.5"),
    (["--space", "encoder=choice:resnet18,resnet99"], "--space encoder=choice:resnet18,resnet99: --encoder must be one of resnet18, resnet34, resnet50; got 'resnet99'"),
    (["--space", "lr=loguniform:1e-5:1e-3", "--lr", "3e-4"], "--lr is given and --space optim.lr=loguniform:1e-05:0.001 sweeps it"),
    (["--scheduler", "pbt", "--space", "batch_size=choice:8,16"], "--scheduler pbt cannot sweep batch_size"),
    (["--metric", "delta_m", "--baselines", "/nonexistent/run"], "error: /nonexistent/run is not a run folder (no config.json)"),
    (["--root", "data/miniscapes"], "error: --root data/miniscapes is a relative path, which the Ray workers cannot resolve"),
    # a crop no zoom of the (synthetic, 128x256) images fills fails its trials: refused before Ray
    (["--crop", "128x288", "--space", "scale_max=choice:1.0,1.25"], "error: --space: a trial may draw scale_max=1.0: --crop 128x288 is "
                                                                    "larger than the 128x256 images zoomed by at most --scale-max 1 (128x256)"),
    (["--space", "root=choice:/data/a,data/b"], "error: --space data.root=choice:/data/a,data/b: --root data/b is a relative path, which"),
    (["--reduction-factor", "1"], "--reduction-factor >= 2"),
    (["--search-seed", "-1"], "--search-seed must be >= 0, got -1"),
    (["--space", "momentum=uniform:0.8:0.95"], "--space optim.momentum=uniform:0.8:0.95: momentum changes nothing in these trials: "
                                               "it is SGD's (--optimizer sgd): sweep something else"),
    (["--momentum", "0.5"], "--momentum 0.5 changes nothing in any trial: it is SGD's (--optimizer sgd)"),  # (every trial: Adam)
    (["--momentum", "0.5", "--space", "task_weighting=choice:fixed,dwa"], "--momentum 0.5 changes nothing in any trial"),
    # the other scheduler's flags would be ignored without a word
    (["--scheduler", "pbt", "--grace-period", "3", "--num-samples", "4"],
     "--grace-period is for --scheduler asha; this sweep runs --scheduler pbt: leave it out"),
    (["--perturbation-interval=3", "--pbt-sync"], "--perturbation-interval, --pbt-sync are for --scheduler pbt; this sweep runs"),
    (["--space", "lr=loguniform:1e-5:inf"], "--space lr=loguniform:1e-5:inf: the bounds must be finite numbers"),
    (["--space", "grad_clip=uniform:-1:1"], "--grad-clip must be >= 0 and finite"),
    (["--space", "synthetic_counts=choice:100+20,400+80+80"], "--synthetic-counts takes 3 values joined with +, got '100+20'"),
    (["--task-weighting", "famo", "--space", "semseg_weight=choice:0.0,0.5"], "--task-weighting famo starts from --semseg-weight, which must lie strictly between 0 and 1 (got 0.0)"),
    # the schedulers' intervals against --epochs (Ray's ASHA asserts only once Ray has started; equal: never acts)
    (["--grace-period", "10", "--epochs", "8"], "error: --grace-period 10 with --epochs 8: ASHA stops trials early only after the grace period"),
    (["--grace-period", "8", "--epochs", "8"], "error: --grace-period 8 with --epochs 8:"),
    (["--scheduler", "pbt", "--perturbation-interval", "8", "--epochs", "8"], "error: --perturbation-interval 8 with --epochs 8: PBT would never perturb"),
    # a single-task run weighs no losses: sweeping the weight would vary nothing
    (["--tasks", "semseg", "--metric", "score", "--space", "semseg_weight=uniform:0.3:0.7"],
     "error: --space optim.semseg_weight=uniform:0.3:0.7: semseg_weight weighs the two tasks' losses, and these trials train --tasks semseg only"),
    (["--sweep-name", "../x"], "error: --sweep-name '../x' must be a folder name"),
    # what only the resolved model refuses is refused before Ray too (else every such trial fails in Tune)
    (["--space", "batch_size=choice:1,4"], "error: --space train.batch_size=choice:1,4: --batch-size 1: the aspp context module"),
    (["--space", "baselines=choice:runs/a"], "error: --space baselines=choice:runs/a: --baselines judge every trial by Δm"),
    (["--max-concurrent", "0"], "error: --max-concurrent must be >= 1"),
    (["--sweep-name", "s*"], "error: --sweep-name 's*': '*' cannot be in the path of a run's files"),
    # each trial's run is named after the trial: a --name would be ignored
    (["--name", "x"], "error: --name: every trial's run is named after the trial (<out>/<sweep-name>/trials/<trial>): name the sweep with --sweep-name"),
    # data a trial would not find: every trial would fail on it inside Tune (and be retried)
    (["--root", "/nonexistent/a"], "error: Miniscapes folder missing: /nonexistent/a/train/rgb"),
    (["--space", "shards=choice:/nonexistent/s"], "error: no shard manifest at /nonexistent/s/manifest.json"),
    (["--resume", "--data-moved"], "error: --data-moved continues one run (jobs/train.py --resume --name <run> --data-moved); a sweep cannot"),
])
def test_bad_sweep_fails_before_any_trial(args, message, in_process):
    """jobs/tune.py's main in this process (the shell's exit code and Ray's absence: below)."""
    import ray

    from jobs.tune import main

    r = in_process(main, args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not ray.is_initialized()  # Ray was never started


def test_a_sweep_from_a_trials_config_does_not_land_among_that_sweeps_trials(tmp_path, in_process):
    """A trial's config.json as --config (refining around the best trial) carries that trial's
    --out, the old sweep's trials folder: refused, naming a place for the new sweep."""
    import ray

    from jobs.tune import check_sweep_out, main
    from mtl.distributed.tune import SWEEP_FILE

    trials = tmp_path / "sweeps" / "old" / "trials"
    os.makedirs(trials / "t1")
    (tmp_path / "sweeps" / "old" / SWEEP_FILE).write_text("{}")
    trial = ExperimentConfig().with_values({"train.out": str(trials), "train.name": "t1"})
    (trials / "t1" / "config.json").write_text(trial.to_json())
    r = in_process(main, ["--config", str(trials / "t1" / "config.json"), "--sweep-name", "refine"])
    assert r.returncode == 2, r.stdout + r.stderr
    assert (f"error: --out {trials} is the trials folder of the sweep at {tmp_path}/sweeps/old (a trial's config.json as "
            f"--config names it): give the new sweep's --out, e.g. --out {tmp_path}/sweeps") in r.stderr
    assert not ray.is_initialized() and sorted(os.listdir(tmp_path / "sweeps")) == ["old"]
    check_sweep_out(trial.with_values({"train.out": str(tmp_path / "sweeps")}))  # --out given: the sweep goes there


def test_a_bad_sweep_from_the_shell_exits_2_before_ray_starts():
    t0 = time.time()
    r = subprocess.run([sys.executable, "jobs/tune.py", "--space", "lr=loguniform:1e-2:1e-3"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "need LOW <= HIGH, got 0.01 and 0.001" in r.stderr, r.stderr
    assert "Started a local Ray instance" not in r.stderr + r.stdout  # Ray was never started
    assert time.time() - t0 < 60


def test_a_space_names_any_field_and_reads_values_with_its_type():
    by_path = {d.path: d for d in SPACE}
    assert list(by_path) == ["optim.lr", "optim.semseg_weight", "data.scale_max", "data.hflip", "model.encoder"]
    assert by_path["optim.lr"].values == (1e-5, 1e-3) and by_path["data.hflip"].values == (True, False)
    tw = parse_dim("--task-weighting=choice:fixed,uncertainty,dwa,famo")
    assert (tw.path, tw.values) == ("optim.task_weighting", ("fixed", "uncertainty", "dwa", "famo"))
    assert parse_dim("output_stride=choice:8,16").values == (8, 16)  # Literal[8, 16, 32] | None
    assert parse_dim("aspp_rates=choice:6+12+18,12+24+36").values == ((6, 12, 18), (12, 24, 36))
    assert parse_dim("crop=choice:224x448,none").values == ((224, 448), None)
    assert parse_dim("batch_size=choice:8,16").values == (8, 16)
    for d in (*SPACE, tw, parse_dim("crop=choice:224x448,none"), parse_dim("aspp_rates=choice:6+12+18")):
        assert parse_dim(d.text) == d  # the canonical text (sweep.json, the log) reads back the same
    for text, message in [("lr=log:1:2", "expected FIELD=loguniform:LOW:HIGH"), ("nope=choice:1", "'nope' is not a config field"),
                          ("batch_size=uniform:8:16", "--batch-size is an integer: give its values with choice"),
                          ("encoder=uniform:1:2", "--encoder is not a number"), ("lr=loguniform:0:1e-3", "loguniform needs LOW > 0"),
                          ("hflip=choice:maybe", "--hflip is true or false"), ("workers=choice:1,2", "--workers says how a run executes"),
                          ("tasks=choice:semseg", "the trials of a sweep train the same tasks"), ("epochs=choice:4,8", "every trial trains --epochs")]:
        with pytest.raises(ValueError, match=f"--space {text}: .*{message}" if "expected" not in message else message):
            parse_dim(text)
    with pytest.raises(ValueError, match="--space sweeps lr twice"):
        parse_space(["lr=loguniform:1e-5:1e-3", "optim.lr=uniform:1e-4:1e-3"])
    # values are checked together: a trial could draw scale_min above scale_max
    with pytest.raises(ValueError, match="a trial may draw scale_min=1.5, scale_max=1.25"):
        check_space(parse_space(["scale_min=choice:1.0,1.5", "scale_max=choice:1.25,2.0"]), ExperimentConfig().with_values({"data.scale_max": 2.0}))
    with pytest.raises(ValueError, match="--checkpoint-every-min: sweeps checkpoint at epoch ends only"):
        check_space(SPACE, ExperimentConfig(train=TrainConfig(checkpoint_every=5)))


def test_flags_fix_the_fields_the_space_does_not_sweep():
    argv = ["--lr", "3e-4", "--no-hflip", "--batch-size=4", "--space", "semseg_weight=uniform:0.4:0.6", "--out", "x"]
    given = explicit_fields(argv)
    assert given == {"optim.lr", "data.hflip", "train.batch_size", "train.out"}
    # the parser takes underscores too: a flag so spelled is as given (never swept over)
    assert explicit_fields(["--semseg_weight", "0.58", "--no_hflip", "--batch_size=4"]) == {
        "optim.semseg_weight", "data.hflip", "train.batch_size"}
    space, notes = choose_space(["semseg_weight=uniform:0.4:0.6"], given)
    assert [d.name for d in space] == ["semseg_weight"] and notes == []
    base = ExperimentConfig().with_values({"optim.lr": 3e-4, "data.hflip": False, "train.batch_size": 4})
    cfg = trial_config(base, space, {"semseg_weight": np.float64(0.45)}, "t1", "/sweeps/s/trials")
    assert (cfg.optim.lr, cfg.data.hflip, cfg.train.batch_size, cfg.optim.semseg_weight) == (3e-4, False, 4, 0.45)
    assert type(cfg.optim.semseg_weight) is float and (cfg.train.out, cfg.train.name, cfg.train.resume) == ("/sweeps/s/trials", "t1", False)
    # a flag for a swept field is an error naming both, never an override
    with pytest.raises(ValueError, match=r"--lr is given and --space optim.lr=loguniform:1e-05:0.001 sweeps it: give one"):
        choose_space(["lr=loguniform:1e-5:1e-3"], given)
    # the default space leaves out what the flags fix, and says so
    space, notes = choose_space([], given)
    assert [d.text for d in space] == [t for t in DEFAULT_SPACE if not t.startswith(("optim.lr", "data.hflip"))]
    assert notes == ["the default space leaves out lr, hflip: fixed by --lr, --hflip"]
    assert [d.name for d in choose_space([], set())[0]] == ["lr", "semseg_weight", "scale_max", "hflip"]
    with pytest.raises(ValueError, match="every field of the default space is fixed by a flag"):
        choose_space([], {"optim.lr", "optim.semseg_weight", "data.scale_max", "data.hflip"})
    # what a search library hands over becomes the field's own type
    drawn = {**HP, "lr": np.float64(2e-4), "hflip": np.bool_(False), "encoder": np.str_("resnet34")}
    cfg = trial_config(ExperimentConfig(), SPACE, drawn, "t2", "/t", resume=True)
    assert (cfg.optim.lr, cfg.data.hflip, cfg.model.encoder, cfg.train.resume) == (2e-4, False, "resnet34", True)
    assert type(cfg.data.hflip) is bool and type(cfg.optim.lr) is float


def test_trial_names_come_from_the_space():
    assert trial_name("branched", SPACE, HP, "3f2a1_00004") == "branched_lr3.2e-04_w0.58_s1.25_flip_resnet18_3f2a1_00004"
    space = parse_space(["task_weighting=choice:fixed,famo", "aspp_rates=choice:6+12+18", "crop=choice:224x448"])
    assert trial_name("b", space, {"task_weighting": "famo", "aspp_rates": [6, 12, 18], "crop": (224, 448)}, "x") == \
        "b_famo_aspp-rates6+12+18_crop224x448_x"


def test_objectives_and_schedulers_are_checked_with_the_training_config():
    base = ExperimentConfig()
    judged = ExperimentConfig(train=TrainConfig(baselines=("a", "b")))  # --baselines: the training flag
    spec = plan_sweep(SweepConfig(space=("lr=loguniform:1e-5:1e-3",), metric="delta_m"), judged, set())
    assert (spec.key, spec.mode, spec.baselines) == ("delta_m", "min", ("a", "b"))
    with pytest.raises(ValueError, match="--baselines judges every trial by Δm .* --metric delta_m"):  # best.pt by Δm
        plan_sweep(SweepConfig(space=("lr=loguniform:1e-5:1e-3",)), judged, set())
    assert SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    single = ExperimentConfig(optim=OptimConfig(tasks=("semseg",)))
    with pytest.raises(ValueError, match="--metric grader judges a multi-task run; .* use --metric score"):
        plan_sweep(SweepConfig(), single, set())
    assert plan_sweep(SweepConfig(metric="score"), single, set()).mode == "max"
    with pytest.raises(ValueError, match="--metric delta_m needs --baselines"):
        plan_sweep(SweepConfig(metric="delta_m"), base, set())
    with pytest.raises(ValueError, match="leave out --search optuna"):
        plan_sweep(SweepConfig(scheduler="pbt", search="optuna"), base, set())
    # PBT changes values mid-trial: only fields that can change there
    pbt = plan_sweep(SweepConfig(scheduler="pbt", space=("lr=loguniform:1e-4:1e-2", "hflip=choice:true,false")), base, set())
    mutations = pbt.pbt_mutations()
    assert mutations["hflip"] == [True, False] and mutations["lr"].lower == 1e-4
    assert pbt.clip({"lr": 0.05, "hflip": True}) == {"lr": 1e-2, "hflip": True}  # a perturbed value stays in its range
    for text in ("encoder=choice:resnet18,resnet34", "optimizer=choice:adam,sgd", "task_weighting=choice:fixed,dwa"):
        with pytest.raises(ValueError, match="--scheduler pbt cannot sweep .* cannot change there"):
            plan_sweep(SweepConfig(scheduler="pbt", space=(text,)), base, set())
    with pytest.raises(ValueError, match="semseg_weight, which weighs the losses only with --task-weighting fixed"):
        plan_sweep(SweepConfig(scheduler="pbt"), ExperimentConfig(optim=OptimConfig(task_weighting="famo")), set())


def test_a_single_task_sweep_leaves_the_loss_weight_out_of_its_default_space():
    """--tasks semseg trains with its loss weight fixed at 1: the default space would vary
    semseg_weight for nothing (trials that differ in name only), so it leaves it out and says so."""
    single = ExperimentConfig(optim=OptimConfig(tasks=("depth",)))
    spec = plan_sweep(SweepConfig(metric="score"), single, set())
    assert [d.name for d in spec.space] == ["lr", "scale_max", "hflip"]
    assert ("the default space leaves out semseg_weight: it weighs the two tasks' losses, and these trials train --tasks "
            "depth only") in spec.notes
    assert [d.name for d in plan_sweep(SweepConfig(), ExperimentConfig(), set()).space] == ["lr", "semseg_weight", "scale_max", "hflip"]
    # likewise the augmentation's settings under --no-augment, unless the space sweeps the augmentation itself
    plain = ExperimentConfig().with_values({"data.augment": False})
    spec = plan_sweep(SweepConfig(), plain, {"data.augment"})
    assert [d.name for d in spec.space] == ["lr", "semseg_weight"]
    assert ("the default space leaves out hflip: it belongs to the augmentation, which --no-augment turns off for these "
            "trials") in spec.notes
    with pytest.raises(ValueError, match=r"--space data.scale_max=uniform:1.0:1.5: scale_max belongs to the augmentation, which "
                                         r"--no-augment turns off for these trials: sweep something else"):
        plan_sweep(SweepConfig(space=("scale_max=uniform:1:1.5",)), plain, {"data.augment"})
    both = ("augment=choice:true,false", "scale_max=uniform:1:1.5")
    assert [d.name for d in plan_sweep(SweepConfig(space=both), plain, set()).space] == ["augment", "scale_max"]
    # --crop is the augmentation's: refused for a new sweep without it (not when the space sweeps augment, nor on --resume)
    cropped = plain.with_values({"data.crop": (48, 96)})
    with pytest.raises(ValueError, match="--crop 48x96 is the augmentation's random crop, which --no-augment turns off"):
        plan_sweep(SweepConfig(space=("lr=loguniform:1e-5:1e-3",)), cropped, {"data.augment", "data.crop"})
    assert plan_sweep(SweepConfig(space=both), cropped, {"data.crop"}).space
    resumed = cropped.with_values({"train.resume": True})
    assert plan_sweep(SweepConfig(space=("lr=loguniform:1e-5:1e-3",)), resumed, {"data.augment", "data.crop"}).space
    # a one-epoch sweep: ASHA judges after the first epoch, so it stops nothing early; the log says so
    one = plan_sweep(SweepConfig(), ExperimentConfig().with_values({"train.epochs": 1}), set())
    assert any("--epochs 1: ASHA stops no trial early" in n for n in one.notes)


def test_mlflow_logs_the_trials_when_its_uri_is_set(monkeypatch, tmp_path):
    """Tune's MLflow callback, one MLflow experiment per sweep; mlflow missing: one line before Ray starts."""
    import importlib.util

    from mtl.distributed.tune import mlflow_callback

    spec = SweepSpec(parse_space(["lr=loguniform:1e-5:1e-3"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_callback("my-sweep", spec) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    if importlib.util.find_spec("mlflow") is not None:
        callback = mlflow_callback("my-sweep", spec)
        assert (callback.experiment_name, callback.tracking_uri) == ("my-sweep", "http://127.0.0.1:1")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # not installed
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI is set .* mlflow package is not installed"):
        mlflow_callback("my-sweep", spec)
    r = subprocess.run([sys.executable, "jobs/tune.py", "--sweep-name", "m"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:1", "PYTHONPATH": _no_mlflow(tmp_path)})
    assert r.returncode == 2 and "mlflow package is not installed" in r.stderr, r.stderr
    assert "Started a local Ray instance" not in r.stderr + r.stdout


def _no_mlflow(root) -> str:
    """A folder that, first on PYTHONPATH, makes ``import mlflow`` fail as if it were not installed."""
    os.makedirs(root / "mlflow")
    (root / "mlflow" / "__init__.py").write_text("raise ImportError('mlflow is not installed (test)')\n")
    return str(root)


def test_concurrent_trials_are_sized_from_the_clusters_gpus(monkeypatch):
    from mtl.distributed import capacity, tune
    from mtl.distributed.capacity import Autoscaling, Capacity, NodeType

    gpu_nodes = Capacity([{"CPU": 8, "GPU": 0}], Autoscaling([NodeType("g5", {"CPU": 48, "GPU": 4}, 3)]), "test")
    monkeypatch.setattr(capacity, "read_capacity", lambda: gpu_nodes)
    base = ExperimentConfig().with_values({"dist.num_workers": 2})
    assert tune.max_concurrent_trials(base, SweepConfig(num_samples=32), {"CPU": 10, "GPU": 1}) == 6  # 12 GPUs / 2
    assert tune.max_concurrent_trials(base, SweepConfig(num_samples=4), {"CPU": 10, "GPU": 1}) == 4
    assert tune.max_concurrent_trials(base, SweepConfig(num_samples=32, max_concurrent=3), {"CPU": 10, "GPU": 1}) == 3
    # the random search is seeded (--search-seed) and holds the limit itself (Tune's own applies to searchers only)
    assert tune._search_alg(SweepConfig(), 3).max_concurrent == 3


def _run_folder(root, name, tasks, epochs):
    """A run folder as training leaves it: config.json, metrics/epoch-NNNN.json and the pointer
    to the last epoch's checkpoint."""
    cfg = ExperimentConfig(optim=OptimConfig(tasks=tasks))
    os.makedirs(root / name / "metrics")
    (root / name / "config.json").write_text(cfg.to_json())
    for i, m in enumerate(epochs, 1):
        (root / name / "metrics" / f"epoch-{i:04d}.json").write_text(json.dumps(m))
    os.makedirs(root / name / "checkpoints")
    last = f"epoch-{len(epochs):04d}"
    (root / name / "checkpoints" / "latest.json").write_text(json.dumps({"latest": last, "history": [last]}))
    return str(root / name)


def test_baselines_are_single_task_runs_of_both_tasks(tmp_path):
    from mtl.distributed.tune import trial_result
    from mtl.multitask import load_baselines as read_baselines
    from mtl.multitask import task_metrics

    depth = {"si_log_rmse": 20.0, "abs_rel": 0.2, "rmse": 8.0, "delta1": 0.8}
    seg = _run_folder(tmp_path, "seg", ("semseg",), [{"miou": 40.0}, {"miou": 50.0}])
    dep = _run_folder(tmp_path, "dep", ("depth",), [depth])
    both = _run_folder(tmp_path, "both", ("semseg", "depth"), [{"miou": 50.0, **depth}])
    baselines = read_baselines((seg, dep))
    assert baselines["semseg"]["miou"] == 50.0 and baselines["depth"]["rmse"] == 8.0  # each at its best epoch
    with pytest.raises(ValueError, match="a Δm baseline is a single-task run"):
        read_baselines((seg, both))
    with pytest.raises(ValueError, match=r"--baselines: Δm needs a single-task run of each task; .* trained depth"):
        read_baselines((seg,))
    with pytest.raises(ValueError, match="the depth run's best epoch has no rmse"):
        read_baselines((seg, _run_folder(tmp_path, "dep2", ("depth",), [{"si_log_rmse": 20.0, "abs_rel": 0.2, "delta1": 0.8}])))
    with pytest.raises(ValueError, match="the depth baseline's delta1 is 0.0"):
        read_baselines((seg, _run_folder(tmp_path, "dep3", ("depth",), [{**depth, "delta1": 0.0}])))
    # with baselines, training reports Δm every epoch (as good as the baselines: 0) and is judged by it
    both_tasks = ("semseg", "depth")
    assert task_metrics({"miou": 50.0, "grader": 30.0, **depth}, both_tasks)["score"] == 30.0  # else by the grader
    judged = task_metrics({"miou": 55.0, "grader": 35.0, **depth}, both_tasks, baselines)
    assert judged["delta_m"] == pytest.approx(-5.0) and judged["score"] == pytest.approx(5.0)  # mIoU +10 %: Δm -10 / 2 tasks
    # every epoch a trial reports carries its score, Δm as training gave it, its values and run folder
    result = trial_result({"epoch": 3, "miou": 50.0, "grader": 30.0, "score": 1.5, "delta_m": -1.5, **depth}, both_tasks,
                          {"lr": 1e-4, "crop": (8, 8)}, "t-p1")
    assert result["score"] == 1.5 and result["delta_m"] == -1.5
    assert (result["hp/lr"], result["hp/crop"], result["run"]) == (1e-4, "8+8", "t-p1")
    crop = parse_dim("crop=choice:8x8,16x16")
    assert crop.show(result["hp/crop"]) == crop.show((8, 8)) == "8x8"  # reports write sizes as --space does
    assert trial_result({"epoch": 1, "miou": 55.0, "score": 55.0}, ("semseg",), {}, "t")["score"] == 55.0
    with pytest.raises(ValueError, match="--baselines: Δm compares a multi-task run with single-task ones; this run trains "
                                         "--tasks semseg only"):
        ExperimentConfig(optim=OptimConfig(tasks=("semseg",)), train=TrainConfig(baselines=(seg, dep))).validate()


class _Result:
    def __init__(self, name, hp, graders, error=None, last=None, **columns):
        self.config = {**hp, "trials_url": "/sweeps/s/trials"}
        self.path = f"/sweeps/s/{name}"
        self.error = error
        self.metrics = {"done": True} if last is None else last  # the last result (done: Tune saw the trial end)
        n = len(graders)
        self.metrics_dataframe = Frame(grader=graders, miou=[g + 50 for g in graders], si_log_rmse=[50.0] * n,
                                        epoch=list(range(1, n + 1)), **columns) if graders else None


def test_the_report_has_a_column_per_swept_field_and_the_best_trial_first(tmp_path):
    spec = SweepSpec(parse_space(["lr=loguniform:1e-5:1e-3", "scale_max=choice:1.0,1.25"]))
    report = SweepReport(spec, ("semseg", "depth"))
    assert report.columns == ("rank", "trial", "lr", "scale_max", "epochs", "best_epoch", "IoU", "SI-logRMSE", "grader", "status")
    hp = {"lr": 3.2e-4, "scale_max": 1.25}
    results = [_Result("weak", {**hp, "lr": 1e-5}, [10.0]), _Result("strong", hp, [20.0, 30.0, 25.0]),
               _Result("broken", hp, [], error=RuntimeError("x"))]
    rows = report.rows(results, max_epochs=3)
    assert [r.name for r in rows] == ["strong", "weak", "broken"]
    assert (rows[0].best_epoch, rows[0].objective, rows[0].status, rows[1].status, rows[2].status) == (2, 30.0, "completed", "stopped early", "error")
    assert rows[0].best_model == "/sweeps/s/trials/strong/best.pt"
    paths = report.write(rows, str(tmp_path), "sweep s")
    with open(paths["csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == [*report.columns, "best_model"]
    assert (table[0]["trial"], table[0]["lr"], table[0]["scale_max"], table[0]["grader"]) == ("strong", "3.20e-04", "1.25", "30.00")
    assert "| 1 | strong | 3.20e-04 | 1.25 | 3 | 2 |" in (tmp_path / "results.md").read_text()
    assert r"scale\_max" in (tmp_path / "results.tex").read_text()
    assert (tmp_path / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_a_sweep_with_a_failed_trial_reports_the_others_and_exits_1(tiny_root, tmp_path, monkeypatch, capsys):
    """A pipeline must not take a sweep that lost trials for a whole one: the report of the others,
    a line naming the failed ones, exit status 1."""
    from jobs import tune as tune_cli
    from mtl.distributed import tune

    hp = {"lr": 3.2e-4}
    failure = RuntimeError("s3://bucket/shards: cannot reach it")  # (before training: no train.log says it)
    monkeypatch.setattr(tune, "run_sweep", lambda *a, **k: [_Result("strong", hp, [20.0, 30.0]), _Result("broken", hp, [], failure)])
    rc = tune_cli.main(["--root", tiny_root, "--out", str(tmp_path), "--sweep-name", "s", "--epochs", "2",
                        "--space", "lr=loguniform:1e-5:1e-3"])
    out, err = capsys.readouterr()
    assert rc == 1 and "best trial: strong" in out and "error: 1 of 2 trials failed (broken)" in err, out + err
    assert "  broken: s3://bucket/shards: cannot reach it" in err
    assert len((tmp_path / "s" / "results.csv").read_text().splitlines()) == 3


def test_a_delta_m_sweep_ranks_lowest_first_with_the_values_and_run_of_the_best_epoch():
    spec = SweepSpec(parse_space(["lr=loguniform:1e-5:1e-3"]), metric="delta_m", baselines=("a", "b"), scheduler="pbt")
    report = SweepReport(spec, ("semseg", "depth"))
    assert report.columns[-3:] == ("grader", "delta_m", "status")
    # a PBT trial: its values changed at epoch 2, when it continued another trial's weights in run t1-p1
    pbt = _Result("t1", {"lr": 4e-4}, [1.0, 2.0, 3.0], delta_m=[5.0, -2.0, 1.0], **{"hp/lr": [1e-4, 4e-4, 4e-4]},
                  run=["t1", "t1-p1", "t1-p1"])
    other = _Result("t2", {"lr": 1e-5}, [9.0, 9.0, 9.0], delta_m=[3.0, 2.0, 0.5], **{"hp/lr": [1e-5] * 3}, run=["t2"] * 3)
    rows = report.rows([other, pbt], max_epochs=3)
    assert [r.name for r in rows] == ["t1", "t2"]  # Δm: lower is better
    assert (rows[0].best_epoch, rows[0].objective, rows[0].hp["lr"], rows[0].best_model) == (2, -2.0, 4e-4, "/sweeps/s/trials/t1-p1/best.pt")
    assert report.cells(0, rows[0])[-2:] == ["-2.00", "completed"]
    single = SweepReport(SweepSpec(spec.space, metric="score"), ("depth",))
    assert single.columns[-3:] == ("SI-logRMSE", "score", "status")


class _TuneCheckpoint:
    """What start_run reads of a Tune checkpoint."""

    def __init__(self, path):
        self.path = path

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(self.path)


def test_a_pbt_exploit_continues_the_other_trials_checkpoint_in_a_run_folder_of_its_own(tmp_path):
    from mtl.checkpoint import STATE_FILE, CheckpointIndex, FolderStorage, checkpoint_bytes, load_checkpoint
    from mtl.distributed.tune import SEED_FILE, finished, pack_checkpoint, start_run, trial_folders
    from mtl.runs import check_same_training, run_url

    trials = str(tmp_path / "trials")
    spec = SweepSpec(parse_space(["lr=loguniform:1e-5:1e-3"]), scheduler="pbt")
    base = ExperimentConfig().with_values({"train.epochs": 4})
    # the donor trial "a" has trained two epochs (a checkpoint as training writes it)
    donor = start_run(base, spec, {"lr": 1e-4}, trials, "a")
    assert (donor.train.name, donor.train.resume) == ("a", False)
    weights = {"w": torch.arange(6.0)}
    state = {"config": donor.to_dict(), "metrics": {"epoch": 2}, "model": weights, "optimizer": {"state": {}, "param_groups": []},
             "train_state": {"epoch": 2, "step": 20, "epochs": 4, "total_steps": 40, "best": 31.5}, "rng": {}}
    os.makedirs(tmp_path / "ck")
    (tmp_path / "ck" / STATE_FILE).write_bytes(checkpoint_bytes(state))
    FolderStorage(run_url(donor)).publish(str(tmp_path / "ck"), "epoch-0002", {})
    CheckpointIndex(run_url(donor)).commit("epoch-0002")
    # what "a" hands Tune at a perturbation epoch, and what Tune hands trial "b" that exploits it
    pack_checkpoint(run_url(donor), "epoch-0002", str(tmp_path / "tune-ck"))
    os.makedirs(tmp_path / "trials" / "b")  # b trained in its own folder before
    cfg = start_run(base, spec, {"lr": 1.2e-4}, trials, "b", _TuneCheckpoint(str(tmp_path / "tune-ck")))
    assert (cfg.train.name, cfg.train.resume, cfg.optim.lr) == ("b-p1", True, 1.2e-4)
    seeded = load_checkpoint(f"{trials}/b-p1")
    assert torch.equal(seeded["model"]["w"], weights["w"]) and seeded["train_state"]["step"] == 20  # a's weights, a's progress
    assert seeded["train_state"]["best"] == -math.inf  # best.pt of b-p1 is its own best epoch
    check_same_training(ExperimentConfig.from_dict(seeded["config"]), cfg, "seeded")  # the resume accepts b's new values
    assert json.loads((tmp_path / "trials" / "b-p1" / SEED_FILE).read_text())["from"]["run"] == run_url(donor)
    assert trial_folders(trials, "b") == ["b", "b-p1"] and not finished(cfg)
    # b restarted with its own latest checkpoint (the sweep resumed; PBT paused it): the same folder goes on
    pack_checkpoint(f"{trials}/b-p1", "epoch-0002", str(tmp_path / "own-ck"))
    again = start_run(base, spec, {"lr": 1.2e-4}, trials, "b", _TuneCheckpoint(str(tmp_path / "own-ck")))
    assert (again.train.name, again.train.resume) == ("b-p1", True) and trial_folders(trials, "b") == ["b", "b-p1"]
    # b restarted before it reported a checkpoint of its own: Tune hands it a's again, and b-p1 goes on
    again = start_run(base, spec, {"lr": 1.2e-4}, trials, "b", _TuneCheckpoint(str(tmp_path / "tune-ck")))
    assert (again.train.name, again.train.resume) == ("b-p1", True) and trial_folders(trials, "b") == ["b", "b-p1"]
    # ...and a second exploit (other values) opens the next folder
    third = start_run(base, spec, {"lr": 2e-4}, trials, "b", _TuneCheckpoint(str(tmp_path / "tune-ck")))
    assert third.train.name == "b-p2" and trial_folders(trials, "b") == ["b", "b-p1", "b-p2"]
    CheckpointIndex(run_url(third)).commit("epoch-0004")
    assert finished(third)  # its last epoch is done: a restart trains nothing


def test_a_resumed_sweep_must_ask_for_what_it_started_with(tmp_path):
    from mtl.distributed.tune import SWEEP_FILE, TUNER_FILE, check_resume

    base = ExperimentConfig().with_values({"train.out": str(tmp_path)})
    sweep = SweepConfig(sweep_name="s", space=("lr=loguniform:1e-5:1e-3",))
    spec = plan_sweep(sweep, base, set())
    with pytest.raises(FileNotFoundError, match="no sweep to resume at"):
        check_resume(base, sweep, spec)
    os.makedirs(tmp_path / "s")
    (tmp_path / "s" / SWEEP_FILE).write_text(json.dumps({"spec": spec.to_dict(), "base": base.to_dict()}))
    (tmp_path / "s" / TUNER_FILE).write_bytes(b"")  # Tune's state: the sweep started
    (tmp_path / "s" / "experiment_state-2026-11-29_00-00-00.json").write_text("{}")
    check_resume(base.with_values({"train.resume": True, "dist.address": "10.0.0.1:6379"}), sweep, spec)  # the driver's own
    # the trials' other settings too: Tune restores its trials as stored, so new ones would silently not apply
    with pytest.raises(ValueError, match=r"data.workers None -> 2; dist.cpus_per_worker 1.0 -> 4.0"):
        check_resume(base.with_values({"data.workers": 2, "dist.cpus_per_worker": 4.0}), sweep, spec)
    other = plan_sweep(SweepConfig(sweep_name="s", space=("lr=loguniform:1e-4:1e-3",)), base, set())
    with pytest.raises(ValueError, match=r"--resume: the sweep at .* was started with other settings \(space"):
        check_resume(base, sweep, other)
    with pytest.raises(ValueError, match="optim.semseg_weight 0.5 -> 0.6"):
        check_resume(base.with_values({"optim.semseg_weight": 0.6}), sweep, spec)
    # Tune keeps the number and draw of trials it started with: asking for others is refused, not ignored
    (tmp_path / "s" / SWEEP_FILE).write_text(json.dumps({"spec": spec.to_dict(), "base": base.to_dict(),
                                                          "sweep": {"num_samples": 16, "search": "random", "search_seed": 0}}))
    more = dataclasses.replace(sweep, num_samples=64, search_seed=7)
    with pytest.raises(ValueError, match=r"--num-samples 16 -> 64; --search-seed 0 -> 7"):
        check_resume(base, more, spec)
    # a sweep started before the encoder's dilation setting: its stored base predates it, and the refusal says how to go on
    old = base.to_dict()
    del old["model"]["dilated_convs"]
    (tmp_path / "s" / SWEEP_FILE).write_text(json.dumps({"spec": spec.to_dict(), "base": old}))
    with pytest.raises(ValueError, match=r"model.dilated_convs 'all' -> 'second'. It predates today's default there: "
                                         r"--dilated-convs all continues it\)"):
        check_resume(base, sweep, spec)
    check_resume(base.with_values({"model.dilated_convs": "all"}), sweep, spec)
    # a resume whose Ray cluster would decide other devices (run without RAY_ADDRESS, say) is refused, not left waiting
    from mtl.distributed.tune import check_same_devices

    (tmp_path / "s" / SWEEP_FILE).write_text(json.dumps({"spec": spec.to_dict(), "base": base.with_values({"dist.use_gpu": True}).to_dict()}))
    check_same_devices(str(tmp_path / "s"), True)
    with pytest.raises(ValueError, match=r"--resume: the sweep at .*/s trains on GPUs, and this Ray cluster would give its trials "
                                         r"CPUs: resume it on the cluster it started on \(ray job submit"):
        check_same_devices(str(tmp_path / "s"), False)
    from mtl.distributed.tune import check_new

    with pytest.raises(FileExistsError, match=r"a sweep is already at .*/s: --resume continues it, or choose another --sweep-name"):
        check_new(base, sweep)
    check_new(base, dataclasses.replace(sweep, sweep_name="t"))


# ------------------------------------------------------------ starting and resuming (no Ray started)

def _no_cluster(monkeypatch, cpus: float = 2.0):
    """run_sweep without Ray: a fixed cluster of one node with ``cpus`` CPUs; 1-CPU workers."""
    from mtl.distributed import capacity, ray_train, tune
    from mtl.distributed.capacity import Autoscaling, Capacity, WorkerPlan

    monkeypatch.setattr(ray_train, "connect", lambda cfg: False)
    monkeypatch.setattr(ray_train, "plan", lambda cfg, joined: WorkerPlan(False, {"CPU": 1.0}, True, "test"))
    monkeypatch.setattr(capacity, "read_capacity", lambda: Capacity([{"CPU": cpus, "GPU": 0.0}], Autoscaling([]), "test"))
    monkeypatch.setattr(tune, "trial_resources", lambda: {"memory": tune.TRIAL_MEMORY})


def test_a_sweep_json_is_written_only_for_a_sweep_that_resume_can_continue(tmp_path, monkeypatch):
    """sweep.json (what a resume must match, and what refuses a second start) comes after
    everything that can fail and after Tune's own state: a start that fails never wedges the
    name. One an earlier version left without Tune's state is started anew, saying so."""
    from ray.tune.impl.tuner_internal import _TUNER_PKL

    from mtl.distributed import tune

    assert tune.TUNER_FILE == _TUNER_PKL
    _no_cluster(monkeypatch)
    base = ExperimentConfig().with_values({"train.out": str(tmp_path)})
    sweep = SweepConfig(sweep_name="s", space=("lr=loguniform:1e-5:1e-3",))
    spec = plan_sweep(sweep, base, set())
    folder = tmp_path / "s"

    def broken(*a, **k):
        raise ValueError("the search could not be built")

    monkeypatch.setattr(tune, "_search_alg", broken)
    with pytest.raises(ValueError, match="the search could not be built"):
        tune.run_sweep(base, sweep, spec)
    assert not (folder / tune.SWEEP_FILE).exists()
    assert tune.check_new(base, sweep) is None  # the same command starts it
    monkeypatch.undo()
    _no_cluster(monkeypatch)
    import ray.tune

    def fails_at_its_start(self):  # (e.g. an MLflow server that cannot be reached: before Tune saves any state)
        raise ConnectionError("MLflow server unreachable")

    monkeypatch.setattr(ray.tune.Tuner, "fit", fails_at_its_start)
    with pytest.raises(ConnectionError):
        tune.run_sweep(base, sweep, spec)
    assert (folder / tune.SWEEP_FILE).exists() and (folder / tune.TUNER_FILE).exists()
    never = f"the sweep at {folder} never started (its sweep.json is there, Tune's saved state is not)"
    assert tune.check_new(base, sweep) == f"{never}: starting it anew"
    with pytest.raises(FileNotFoundError, match="never started .* the same command without --resume starts it"):
        tune.check_resume(base, sweep, spec)

    def saves_its_state(self):
        (folder / "experiment_state-2026-11-29_00-00-00.json").write_text("{}")
        return "results"

    monkeypatch.setattr(ray.tune.Tuner, "fit", saves_its_state)
    assert tune.run_sweep(base, sweep, spec) == "results"
    with pytest.raises(FileExistsError, match="a sweep is already at"):
        tune.check_new(base, sweep)
    # what earlier versions left after a failed start: sweep.json alone
    (folder / tune.TUNER_FILE).unlink()
    assert tune.check_new(base, sweep) == f"{never}: starting it anew"


def test_a_missing_search_package_is_one_line_before_ray(monkeypatch):
    """Ray's Optuna/HyperOpt searchers without their package raise a bare AssertionError."""
    from mtl.distributed import tune

    monkeypatch.setitem(sys.modules, "optuna", None)  # not installed
    with pytest.raises(ValueError, match="--search optuna needs the optuna package, which is not installed: pip install optuna"):
        plan_sweep(SweepConfig(search="optuna"), ExperimentConfig(), set())
    with pytest.raises(ValueError, match="needs the optuna package"):
        tune._search_alg(SweepConfig(search="optuna"), 2)


def test_resume_continues_failed_trials_under_their_own_ids(tmp_path, monkeypatch):
    """What run_sweep asks Tune for on --resume, run through Tune's own requeueing: a failed
    trial keeps its id, so its name and run folder (restart_errored would make a new trial:
    a new id, a new folder, epoch 1)."""
    import ray.tune
    import ray.tune.tuner
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    from mtl.distributed import tune

    _no_cluster(monkeypatch)
    asked = {}

    class Restored:
        def __init__(self, **kwargs):
            asked.update(kwargs)

        def fit(self):
            return "results"

    monkeypatch.setattr(ray.tune.Tuner, "can_restore", classmethod(lambda cls, path, **k: True))
    monkeypatch.setattr(ray.tune.tuner, "TunerInternal", Restored)
    base = ExperimentConfig().with_values({"train.out": str(tmp_path), "train.resume": True})
    sweep = SweepConfig(sweep_name="s", space=("lr=loguniform:1e-5:1e-3",))
    assert tune.run_sweep(base, sweep, plan_sweep(sweep, base, set()), resume=True) == "results"
    from ray.tune.registry import register_trainable

    register_trainable("streetmtl_test_trial", lambda config: None)  # (kept in this process until Ray starts)
    failed = Trial("streetmtl_test_trial", config={"lr": 1e-4}, trial_name_creator=lambda t: f"deeplabv3p_pbt_{t.trial_id}")
    failed.set_status(Trial.ERROR)
    requeued = []
    controller = type("Controller", (), {"add_trial": lambda self, t: requeued.append(t)})()
    TuneController._requeue_restored_trials(controller, [failed], asked["resume_config"])
    (again,) = requeued
    assert (again.trial_id, str(again), again.status) == (failed.trial_id, f"deeplabv3p_pbt_{failed.trial_id}", Trial.PENDING)


def test_trial_actors_take_none_of_the_cpus_the_trials_at_once_are_counted_from(monkeypatch):
    """A driver-started Ray (or any cluster without the trials' custom resource): N trials of
    1-CPU workers on N CPUs all fit, their actors included (a sliver of a CPU each would leave
    the last worker group waiting --start-timeout-s, then failing)."""
    import ray

    from mtl.distributed import tune
    from mtl.distributed.capacity import Autoscaling, Capacity, fits, max_concurrent

    node = {"CPU": 4.0, "GPU": 0.0, "memory": 8e9}
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": node}])
    actor = tune.trial_resources()
    at_once = max_concurrent(1, {"CPU": 1.0}, Capacity([{"CPU": 4.0, "GPU": 0.0}], Autoscaling([]), "test"), 8)
    assert at_once == 4
    left = {k: v - at_once * actor.get(k, 0) for k, v in node.items()}  # the actors placed first (Tune starts them)
    assert all(v >= 0 for v in left.values()) and fits([left], {"CPU": 1.0}) == at_once * 1, (actor, left)
    head = {**node, tune.TRIAL_RESOURCE: 1000.0}  # the clusters in cluster/: trials on the head's custom resource
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": head}])
    assert tune.trial_resources() == {tune.TRIAL_RESOURCE: 1}


def test_a_pbt_population_is_the_trials_that_run_at_once(monkeypatch):
    """Tune starts no new trial while --max-concurrent (or what the cluster holds) are live,
    PBT's paused ones included, and PBT ranks live trials only: more trials than that, or one at
    a time, is refused with the numbers; ASHA takes any number."""
    from mtl.distributed import tune

    base = ExperimentConfig()
    space = ("lr=loguniform:1e-5:1e-3",)
    with pytest.raises(ValueError, match=r"its population is the trials that run at once, 2 here \(--max-concurrent 2\); "
                                         r"--num-samples 4 would start the other 2 only as those finish.* Lower --num-samples to 2"):
        plan_sweep(SweepConfig(scheduler="pbt", space=space, num_samples=4, max_concurrent=2), base, set())
    with pytest.raises(ValueError, match=r"only 1 runs at once \(--max-concurrent 1\): PBT would never perturb.*raise --max-concurrent"):
        plan_sweep(SweepConfig(scheduler="pbt", space=space, num_samples=4, max_concurrent=1), base, set())
    with pytest.raises(ValueError, match="--num-samples 1 gives it none to compare"):
        plan_sweep(SweepConfig(scheduler="pbt", space=space, num_samples=1), base, set())
    plan_sweep(SweepConfig(space=space, num_samples=4, max_concurrent=1), base, set())  # ASHA
    # without --max-concurrent: what the cluster holds, once Ray is connected
    _no_cluster(monkeypatch, cpus=2.0)
    one_cpu = {"CPU": 1.0}
    pbt = plan_sweep(SweepConfig(scheduler="pbt", space=space, num_samples=2), base, set())
    assert tune.trials_at_once(base, SweepConfig(scheduler="pbt", num_samples=2), pbt, one_cpu) == 2
    with pytest.raises(ValueError, match=r"2 here \(the cluster holds 2 trial\(s\) of 1 worker\(s\) x \{CPU 1\}\); "
                                         r"--num-samples 3 .* Lower --num-samples to 2, or make room for 3 at once \(more nodes"):
        tune.trials_at_once(base, SweepConfig(scheduler="pbt", num_samples=3), pbt, one_cpu)
    with pytest.raises(ValueError, match=r"only 1 runs at once .*--num-workers, --cpus-per-worker"):
        tune.trials_at_once(base, SweepConfig(scheduler="pbt", num_samples=2), pbt, {"CPU": 2.0})
    assert tune.trials_at_once(base, SweepConfig(num_samples=3), plan_sweep(SweepConfig(space=space), base, set()), one_cpu) == 2


class _Controller:
    """What PBT asks of Tune's controller here: the trials; a save request (none: no checkpoint)."""

    search_alg = None

    def __init__(self, trials):
        self.trials = trials

    def get_trials(self):
        return self.trials

    def get_live_trials(self):
        return self.trials

    def _schedule_trial_save(self, trial, result=None):
        return None


def _pbt(trials, sync: bool, epochs: int | None = None):
    from ray.tune import loguniform
    from ray.tune.experiment import Trial

    from mtl.distributed.tune import AlignedPBT

    pbt = AlignedPBT(epochs=epochs, time_attr="epoch", metric="score", mode="max", perturbation_interval=2,
                     hyperparam_mutations={"lr": loguniform(1e-5, 1e-3)}, synch=sync)
    population = [Trial("trial", config={"lr": 1e-4}, stub=True) for _ in range(trials)]
    controller = _Controller(population)
    for t in population:
        pbt.on_trial_add(controller, t)
        t.set_status(Trial.RUNNING)
    return pbt, controller, population


def test_pbt_perturbs_at_multiples_of_the_interval_after_a_resume_too():
    """Tune saves no scheduler state: after --resume PBT meets its trials mid-run (epoch 5, say).
    It perturbs at epochs that are multiples of the interval, where trials hand Tune a
    checkpoint, as a fresh sweep does: not at 5, at 6, then 8."""
    from ray.tune.schedulers import TrialScheduler

    from mtl.distributed import tune

    spec = plan_sweep(SweepConfig(scheduler="pbt", space=("lr=loguniform:1e-5:1e-3",)), ExperimentConfig(), set())
    assert isinstance(tune._scheduler(spec, 8), tune.AlignedPBT)  # what a PBT sweep runs
    pbt, controller, (fresh,) = _pbt(1, sync=False)
    state = pbt._trial_state[fresh]
    assert pbt.on_trial_result(controller, fresh, {"epoch": 1, "score": 1.0}) == TrialScheduler.CONTINUE
    pbt.on_trial_result(controller, fresh, {"epoch": 2, "score": 1.0})
    assert state.last_perturbation_time == 2  # a fresh trial as PBT has it
    pbt, controller, (resumed,) = _pbt(1, sync=False)
    state = pbt._trial_state[resumed]
    for epoch, perturbed in [(5, 4), (6, 6), (7, 6), (8, 8)]:
        assert pbt.on_trial_result(controller, resumed, {"epoch": epoch, "score": 1.0}) == TrialScheduler.CONTINUE
        assert state.last_perturbation_time == perturbed, epoch
    pbt, controller, (late,) = _pbt(1, sync=False)
    pbt.on_trial_result(controller, late, {"epoch": 6, "score": 1.0})  # first seen at a multiple: perturbed there
    assert pbt._trial_state[late].last_perturbation_time == 6


def test_pbt_leaves_a_trials_last_epoch_alone_and_aligns_a_retried_trial_again():
    """At the run's last epoch there is nothing left to train: an exploit there would throw the
    finished run away and train its last epochs again from another trial's checkpoint. A trial
    Tune adds again (its retry after a lost node: PBT's record of it starts afresh) perturbs at
    multiples of the interval again, where it has checkpoints."""
    from ray.tune.schedulers import TrialScheduler

    pbt, controller, population = _pbt(4, sync=False, epochs=4)
    for t, score in zip(population, (40, 30, 20, 10)):
        for epoch in (1, 2, 3):
            pbt.on_trial_result(controller, t, {"epoch": epoch, "score": score})
    weak = population[-1]
    assert pbt.on_trial_result(controller, weak, {"epoch": 4, "score": 10}) == TrialScheduler.CONTINUE
    assert pbt._trial_state[weak].last_perturbation_time == 2  # (not perturbed at the end)
    pbt, controller, (retried,) = _pbt(1, sync=False)
    for epoch in (5, 6):
        pbt.on_trial_result(controller, retried, {"epoch": epoch, "score": 1.0})
    pbt.on_trial_add(controller, retried)  # Tune's retry: PBT's record of the trial starts afresh
    perturbed = []
    for epoch in (7, 8, 9, 10):
        pbt.on_trial_result(controller, retried, {"epoch": epoch, "score": 1.0})
        perturbed.append(pbt._trial_state[retried].last_perturbation_time)
    assert perturbed == [6, 8, 8, 10]


def test_synchronous_pbt_waits_for_every_trial_at_the_same_multiples_after_a_resume():
    from ray.tune.schedulers import TrialScheduler

    pbt, controller, (a, b) = _pbt(2, sync=True)
    result = lambda epoch, score: {"epoch": epoch, "score": score}  # noqa: E731
    assert pbt.on_trial_result(controller, a, result(5, 1.0)) == TrialScheduler.CONTINUE  # not a perturbation epoch
    assert pbt.on_trial_result(controller, a, result(6, 1.0)) == TrialScheduler.PAUSE  # waits for b
    assert pbt.on_trial_result(controller, b, result(5, 2.0)) == TrialScheduler.CONTINUE
    assert pbt.on_trial_result(controller, b, result(6, 2.0)) == TrialScheduler.PAUSE  # both at 6: perturbed together
    assert [pbt._trial_state[t].last_perturbation_time for t in (a, b)] == [6, 6] and pbt._next_perturbation_sync == 8
    pbt.on_trial_result(controller, a, result(7, 1.0))
    assert pbt.on_trial_result(controller, a, result(8, 1.0)) == TrialScheduler.PAUSE  # waits for b again
    assert pbt._trial_state[a].last_perturbation_time == 6  # not perturbed alone


def test_a_space_field_given_as_a_flag_goes_inside_the_same_argument():
    """As --help says: --space=--lr=... (a separate argument starting with -- is the next flag)."""
    from jobs.tune import TuneCommand
    from mtl.cli import parse_experiment

    cmd = parse_experiment(TuneCommand, ["--space=--lr=loguniform:1e-5:1e-3", "--space", "semseg-weight=uniform:0.3:0.7"])
    assert [d.path for d in parse_space(cmd.sweep.space)] == ["optim.lr", "optim.semseg_weight"]
    with pytest.raises(SystemExit):
        parse_experiment(TuneCommand, ["--space", "--lr=loguniform:1e-5:1e-3"])


def test_a_trials_epochs_whose_checkpoint_never_committed_are_not_reported(tmp_path):
    """An epoch's metrics are written before its checkpoint commits: a trial killed in between
    (an interrupted sweep, a trial that errs there) holds numbers of a model no checkpoint or
    best.pt holds. The report ranks by committed epochs only (it took the uncommitted one's)."""
    from mtl.checkpoint import CheckpointIndex
    from mtl.distributed.sweep_report import trial_history

    trials = tmp_path / "trials"
    (trials / "t/metrics").mkdir(parents=True)
    for epoch, grader in ((1, 10.0), (2, 60.0)):
        (trials / f"t/metrics/epoch-{epoch:04d}.json").write_text(json.dumps({"grader": grader, "miou": 50.0 + grader}))
    assert trial_history(str(trials), "t") == []  # (no checkpoint committed yet)
    (trials / "t/checkpoints/epoch-0001").mkdir(parents=True)
    CheckpointIndex(str(trials / "t")).commit("epoch-0001")
    assert [(h.epoch, h.run, h.values["grader"]) for h in trial_history(str(trials), "t")] == [(1, "t", 10.0)]


def test_a_setting_swept_beside_the_method_that_uses_it_counts():
    """SGD's momentum swept while every trial trains with Adam changes nothing (refused), but
    beside a swept optimizer it counts in the SGD trials."""
    from mtl.distributed.sweep_space import choose_space

    base = ExperimentConfig()
    space, _ = choose_space(["optimizer=choice:adam,sgd", "momentum=uniform:0.8:0.95"], set(), base=base)
    assert [d.name for d in space] == ["optimizer", "momentum"]
    with pytest.raises(ValueError, match="momentum changes nothing in these trials: it is SGD's"):
        choose_space(["optimizer=choice:adam", "momentum=uniform:0.8:0.95"], set(), base=base)
    resumed = base.with_values({"train.resume": True})  # (a sweep an earlier version started so still resumes)
    assert [d.name for d in choose_space(["momentum=uniform:0.8:0.95"], set(), base=resumed)[0]] == ["momentum"]
