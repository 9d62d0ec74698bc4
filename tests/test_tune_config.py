"""Sweep settings are checked before Ray or any trial starts; the search space is one table of
knobs from which Tune's space, each trial's config and name, and the report's columns follow."""

import csv
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from mtl.config import ExperimentConfig
from mtl.distributed.sweep_report import COLUMNS, rows_from_results, write_reports
from mtl.distributed.sweep_space import KNOBS, SweepConfig, check_space, space, trial_config, trial_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HP = {"lr": 3.2e-4, "optimizer": "adam", "semseg_weight": 0.58, "scale_max": 1.25, "hflip": True, "batch_size": 16}


@pytest.mark.parametrize("args, message", [
    (["--lr-min=-1e-4"], "--lr-min: --lr must be positive, got -0.0001"),
    (["--lr-min", "1e-2", "--lr-max", "1e-3"], "need --lr-min <= --lr-max, got 0.01, 0.001"),
    (["--semseg-weight-max", "1.5"], "--semseg-weight-max: --semseg-weight must lie in [0, 1], got 1.5"),
    (["--semseg-weight-min", "-0.1"], "--semseg-weight-min: --semseg-weight must lie in [0, 1]"),
    (["--optimizers", "rmsprop"], "--optimizers must be one of adam, sgd; got 'rmsprop'"),
    (["--scale-max-choices", "0.5"], "--scale-max-choices: --scale-min/--scale-max: need 0 < min <= max, got 1.0, 0.5"),
    (["--hflip-choices", "maybe"], "--hflip-choices must be one of True, False; got 'maybe'"),
    (["--batch-sizes"], "--batch-sizes needs at least one value"),
    (["--reduction-factor", "1"], "--reduction-factor >= 2"),
])
def test_bad_search_space_fails_before_any_trial(args, message):
    t0 = time.time()
    r = subprocess.run([sys.executable, "jobs/tune.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Started a local Ray instance" not in r.stderr + r.stdout  # Ray was never started
    assert time.time() - t0 < 60


def test_trial_names_are_descriptive():
    assert trial_name("branched", HP, "3f2a1_00004") == "branched_adam-lr3.2e-04_w0.58_s1.25_flip_bs16_3f2a1_00004"
    assert SweepConfig().validate().semseg_weight_min <= 0.58 <= SweepConfig().semseg_weight_max  # the report's ratio is in range


def test_the_knob_table_drives_the_space_and_the_trial_config():
    knobs = space(SweepConfig(optimizers=("adam", "sgd"), lr_min=1e-4))
    assert {k.path: v for k, v in knobs.items()}["optim.lr"] == (1e-4, 1e-3)
    assert {k.name for k in knobs} == set(HP) and all(k.name in COLUMNS for k in KNOBS)
    check_space(knobs, ExperimentConfig())
    drawn = {**HP, "lr": np.float64(2e-4), "batch_size": np.int64(8), "hflip": np.bool_(False)}  # what a search library hands over
    cfg = trial_config(ExperimentConfig(), drawn, "t1", "/sweeps/s/trials", resume=True)
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.data.hflip, cfg.data.scale_max, cfg.optim.semseg_weight) == (2e-4, 8, False, 1.25, 0.58)
    assert type(cfg.train.batch_size) is int and type(cfg.data.hflip) is bool and type(cfg.optim.lr) is float
    assert (cfg.train.out, cfg.train.name, cfg.train.resume) == ("/sweeps/s/trials", "t1", True)
    with pytest.raises(ValueError, match="--batch-sizes: --epochs, --batch-size and --grad-accum must be >= 1"):
        check_space(space(SweepConfig(batch_sizes=(16, 0))), ExperimentConfig())


class _Frame(dict):
    """The two things rows_from_results reads of a pandas DataFrame: ``in`` and columns."""

    class _Col(list):
        @property
        def iloc(self):
            return self

        def tolist(self):
            return list(self)

    def __getitem__(self, key):
        return self._Col(dict.__getitem__(self, key))


class _Result:
    def __init__(self, name, hp, graders, error=None):
        self.config = {**hp, "trials_url": "/sweeps/s/trials"}
        self.path = f"/sweeps/s/{name}"
        self.error = error
        self.metrics_dataframe = _Frame(grader=graders, miou=[g + 50 for g in graders], si_log_rmse=[50.0] * len(graders)) if graders else None


def test_the_report_has_a_column_per_knob_and_the_best_trial_first(tmp_path):
    results = [_Result("weak", {**HP, "lr": 1e-5}, [10.0]), _Result("strong", HP, [20.0, 30.0, 25.0]),
               _Result("broken", HP, [], error=RuntimeError("x"))]
    rows = rows_from_results(results, max_epochs=3)
    assert [r.name for r in rows] == ["strong", "weak", "broken"]
    assert (rows[0].best_epoch, rows[0].grader, rows[0].status, rows[1].status, rows[2].status) == (2, 30.0, "completed", "stopped early", "error")
    assert rows[0].best_model == "/sweeps/s/trials/strong/best.pt"
    paths = write_reports(rows, str(tmp_path), "sweep s")
    with open(paths["csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == [*COLUMNS, "best_model"]
    assert (table[0]["trial"], table[0]["lr"], table[0]["semseg_weight"], table[0]["scale_max"], table[0]["hflip"]) == \
        ("strong", "3.20e-04", "0.58", "1.25", "True")
    assert "| 1 | strong | adam | 3.20e-04 |" in (tmp_path / "results.md").read_text()
    assert r"semseg\_weight" in (tmp_path / "results.tex").read_text()
    assert (tmp_path / "scores.png").read_bytes()[:4] == b"\x89PNG"
