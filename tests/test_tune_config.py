"""Sweep settings are checked before Ray or any trial starts."""

import os
import subprocess
import sys
import time

import pytest

from mtl.distributed.tune import SweepConfig, trial_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("args, message", [
    (["--lr-min=-1e-4"], "0 < --lr-min <= --lr-max"),
    (["--lr-min", "1e-2", "--lr-max", "1e-3"], "0 < --lr-min <= --lr-max"),
    (["--semseg-weight-max", "1.5"], "--semseg-weight-max <= 1"),
    (["--semseg-weight-min", "-0.1"], "0 <= --semseg-weight-min"),
    (["--optimizers", "rmsprop"], "--optimizers must be adam and/or sgd"),
    (["--scale-max-choices", "0.5"], "zoom factors >= 1"),
    (["--hflip-choices", "maybe"], "expected true/false"),
])
def test_bad_search_space_fails_before_any_trial(args, message):
    t0 = time.time()
    r = subprocess.run([sys.executable, "jobs/tune.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Started a local Ray instance" not in r.stderr + r.stdout  # Ray was never started
    assert time.time() - t0 < 60


def test_trial_names_are_descriptive():
    hp = {"lr": 3.2e-4, "optimizer": "adam", "semseg_weight": 0.58, "scale_max": 1.25, "hflip": True, "batch_size": 16}
    assert trial_name("branched", hp, "3f2a1_00004") == "branched_adam-lr3.2e-04_w0.58_s1.25_flip_bs16_3f2a1_00004"
    assert SweepConfig().validate().semseg_weight_min <= 0.58 <= SweepConfig().semseg_weight_max  # the report's ratio is in range
