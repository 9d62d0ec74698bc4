"""The README's cluster workflow, for real: cluster/local.sh up, ray job submit (train and a
sweep), a sweep whose driver dies and is resumed, cluster/local.sh down with nothing left over."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def local_cluster(free_port):
    """cluster/local.sh up: a head (0 CPUs) and two 1-CPU worker nodes; down (checked) at the end."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_PORT": str(free_port()), "RAY_DASHBOARD_PORT": str(free_port())}
    up = subprocess.run(["cluster/local.sh", "up", "--workers", "2", "--cpus-per-node", "1"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    yield env
    down = subprocess.run(["cluster/local.sh", "down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    left = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"leftover Ray processes: {left.stdout}"


def submit(env: dict, *args: str) -> subprocess.CompletedProcess:
    env = {**env, "RAY_ADDRESS": f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}"}
    return subprocess.run(["ray", "job", "submit", "--working-dir", ".", "--", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


TINY = ("--encoder", "resnet18", "--batch-size", "4", "--workers", "0", "--no-use-gpu")  # this cluster has CPUs only


def sweep_flags(samples: int = 6, epochs: int = 4) -> tuple[str, ...]:
    return ("--arch", "deeplabv3p", *TINY, "--epochs", str(epochs), "--max-steps-per-epoch", "2", "--batch-sizes", "4",
            "--num-samples", str(samples), "--num-workers", "1", "--cpus-per-worker", "0.9", "--lr-min", "1e-4", "--lr-max", "3e-3")


SWEEP = sweep_flags()


def read_results(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_job_submit_trains_distillation(local_cluster, tiny_root, tmp_path, run_layout):
    r = submit(local_cluster, "python", "jobs/train.py", "--arch", "distillation", *TINY, "--root", tiny_root, "--epochs", "1",
               "--max-steps-per-epoch", "2", "--num-workers", "2", "--out", str(tmp_path), "--name", "submitted")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout + r.stderr and "done: mIoU" in r.stdout
    assert "summary.json" in run_layout(str(tmp_path / "submitted"), epochs=1)


def test_job_submit_sweep_with_asha_writes_the_report(local_cluster, tiny_root, tmp_path):
    r = submit(local_cluster, "python", "jobs/tune.py", *SWEEP, "--root", tiny_root, "--out", str(tmp_path), "--sweep-name", "s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = read_results(tmp_path / "s/results.csv")
    assert len(rows) == 6
    graders = [float(x["grader"]) for x in rows]
    assert graders == sorted(graders, reverse=True)  # best trial on top
    epochs = [int(x["epochs"]) for x in rows]
    assert max(epochs) == 4 and min(epochs) < 4  # ASHA let some run to the end and stopped others early
    assert {x["status"] for x in rows} == {"completed", "stopped early"}
    assert all(x["trial"].startswith("deeplabv3p_adam-lr") for x in rows)  # descriptive names
    md = (tmp_path / "s/results.md").read_text()
    assert rows[0]["trial"] in md.splitlines()[4]
    assert "\\begin{tabular}" in (tmp_path / "s/results.tex").read_text()
    assert (tmp_path / "s/scores.png").read_bytes()[:4] == b"\x89PNG"
    assert os.path.exists(rows[0]["best_model"]) and "best trial: " + rows[0]["trial"] in r.stdout


def test_sweep_resumes_after_the_driver_dies(local_cluster, tiny_root, tmp_path):
    env = {**local_cluster, "RAY_ADDRESS": f"127.0.0.1:{local_cluster['RAY_PORT']}"}
    # one trial at a time, so the kill surely lands mid-sweep, after the first trial finished; 3 trials
    # of 2 epochs (the ASHA test above runs the full sweep)
    cmd = [sys.executable, "jobs/tune.py", *sweep_flags(samples=3, epochs=2), "--max-concurrent", "1", "--root", tiny_root, "--out", str(tmp_path),
           "--sweep-name", "r"]
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    trials = tmp_path / "r/trials"
    deadline = time.time() + 300
    finished = []
    while time.time() < deadline and not finished:
        finished = sorted(trials.glob("*/metrics/epoch-0002.json")) if trials.exists() else []  # its last epoch
        time.sleep(0.5)
    assert finished, "no trial finished before the deadline"
    time.sleep(12)  # Tune snapshots its experiment state every >= 10 s: let it record that trial as done
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (tmp_path / "r/results.csv").exists()
    # what each finished trial trained: its per-epoch metrics files
    done_before = {f: f.stat().st_mtime for p in trials.glob("*/metrics/epoch-0002.json") for f in p.parent.glob("epoch-*.json")}
    assert len(done_before) >= 2

    r = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = read_results(tmp_path / "r/results.csv")
    assert len(rows) == 3 and all(x["status"] in ("completed", "stopped early") for x in rows)
    for f, mtime in done_before.items():  # no epoch of a finished trial was trained again
        assert f.stat().st_mtime == mtime, f
    assert len(list(trials.glob("*/metrics"))) == 3
