"""A sweep on real Ray whose trial diverges (CPU only, one trial)."""

import csv

import pytest

pytestmark = pytest.mark.slow


def test_a_sweep_whose_trial_diverges_runs_it_once_and_exits_0(ray_cluster, tiny_root, tmp_path, in_process):
    """--lr around 1e30 diverges in the first epoch, again on every restart: the trial's Train run
    starts once although --max-failures 2 allows restarts (Ray Train's and Tune's), the report
    shows the trial as diverged, and the sweep exits 0."""
    from jobs.tune import main

    ray_cluster([1])
    r = in_process(main, ["--arch", "deeplabv3p", "--encoder", "resnet18", "--batch-size", "4", "--workers", "0", "--no-use-gpu",
                          "--epochs", "2", "--max-steps-per-epoch", "3", "--num-samples", "1", "--num-workers", "1",
                          "--max-failures", "2", "--start-timeout-s", "120", "--space", "lr=loguniform:1e29:1e30",
                          "--root", tiny_root, "--out", str(tmp_path), "--sweep-name", "hot"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 of 1 trials diverged" in r.stdout
    with open(tmp_path / "hot" / "results.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == "diverged"
    (log,) = (tmp_path / "hot" / "trials").glob("*/train.log")
    assert log.read_text().count("on cpu x1") == 1  # one attempt: neither Ray Train nor Tune restarted it
