"""The README's cluster workflow, for real: cluster/local.sh up, ray job submit (train and a
sweep with a space of its own and a fixed flag), a sweep whose driver dies and is resumed, a tiny
population-based sweep optimising Δm, cluster/local.sh down with nothing left over."""

import csv
import json
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


def sweep_flags(samples: int = 3, epochs: int = 3) -> tuple[str, ...]:
    return ("--arch", "deeplabv3p", *TINY, "--epochs", str(epochs), "--max-steps-per-epoch", "2", "--num-samples", str(samples),
            "--num-workers", "1", "--cpus-per-worker", "0.9", "--space", "lr=loguniform:1e-4:3e-3")


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
    summary = json.loads((tmp_path / "submitted/summary.json").read_text())
    assert summary["latest_checkpoint"] == f"{tmp_path}/submitted/checkpoints/epoch-0001" and summary["final_metrics"]["epoch"] == 1
    dist = json.loads((tmp_path / "submitted/config.json").read_text())["dist"]
    assert (dist["use_gpu"], dist["start_timeout_s"]) == (False, 900.0)  # the defaults resolved: what the run did


def test_job_submit_sweep_with_a_space_of_its_own_and_a_fixed_flag(local_cluster, tiny_root, tmp_path):
    """--space sweeps lr and scale_max; --semseg-weight (in the default space) and --batch-size
    are flags: every trial keeps them. ASHA stops weak trials early; the report has a column per
    swept field.

    Three trials, two at a time, are enough for ASHA to do both (rungs at epochs 1 and 2; a trial
    goes on if its grader is above the median of those that reached the rung before it). The
    seeded draws give trial 2 an LR of ~1e-4, like trial 1's, against trial 0's ~9e-4: trial 2
    starts when one of the first two has left, so it meets the rung after both, below their
    median (graders -78 against -78 and -65 when measured). The first trial to reach a rung always
    goes on, so one trial trains all three epochs."""
    r = submit(local_cluster, "python", "jobs/tune.py", *SWEEP, "--space", "scale_max=choice:1.0,1.25", "--semseg-weight", "0.6",
               "--root", tiny_root, "--out", str(tmp_path), "--sweep-name", "s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = read_results(tmp_path / "s/results.csv")
    assert len(rows) == 3
    assert list(rows[0]) == ["rank", "trial", "lr", "scale_max", "epochs", "best_epoch", "IoU", "SI-logRMSE", "grader", "status",
                             "best_model"]
    graders = [float(x["grader"]) for x in rows]
    assert graders == sorted(graders, reverse=True)  # best trial on top
    epochs = [int(x["epochs"]) for x in rows]
    assert max(epochs) == 3 and min(epochs) < 3  # ASHA (rungs at epochs 1 and 2) let some run to the end, stopped others early
    assert {x["status"] for x in rows} == {"completed", "stopped early"}
    for row in rows:  # what each trial trained: the swept values drawn, the flags as given
        assert row["trial"].startswith("deeplabv3p_lr")  # descriptive names, from the space
        cfg = json.loads((tmp_path / "s/trials" / row["trial"] / "config.json").read_text())
        assert (cfg["optim"]["semseg_weight"], cfg["train"]["batch_size"], cfg["model"]["encoder"]) == (0.6, 4, "resnet18")
        assert 1e-4 <= cfg["optim"]["lr"] <= 3e-3 and f"{cfg['optim']['lr']:.2e}" == row["lr"]
        assert cfg["data"]["scale_max"] in (1.0, 1.25) and f"{cfg['data']['scale_max']:g}" == row["scale_max"]
    md = (tmp_path / "s/results.md").read_text()
    assert rows[0]["trial"] in md.splitlines()[4]
    assert "\\begin{tabular}" in (tmp_path / "s/results.tex").read_text()
    assert (tmp_path / "s/scores.png").read_bytes()[:4] == b"\x89PNG"
    assert os.path.exists(rows[0]["best_model"]) and "best trial: " + rows[0]["trial"] in r.stdout
    # the trials and their Train controllers waited on the head (its custom resource), the workers trained elsewhere
    from ray.util.state import list_actors, list_nodes

    address = f"http://127.0.0.1:{local_cluster['RAY_DASHBOARD_PORT']}"
    (head,) = [n.node_id for n in list_nodes(address=address) if n.is_head_node]
    where = {}
    for a in list_actors(address=address, detail=True, limit=10_000, raise_on_missing_output=False):
        where.setdefault(a.class_name, set()).add(a.node_id == head)
    assert where["ImplicitFunc"] == where["TrainController"] == {True} and where["RayTrainWorker"] == {False}, where


def test_sweep_resumes_after_the_driver_dies(local_cluster, tiny_root, tmp_path):
    # the driver saves the sweep's state every second (default: 10 s or more)
    env = {**local_cluster, "RAY_ADDRESS": f"127.0.0.1:{local_cluster['RAY_PORT']}", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    # one trial at a time, so the kill surely lands mid-sweep, after the first trial finished; 2 trials
    # of 1 epoch (the ASHA test above runs the full sweep)
    cmd = [sys.executable, "jobs/tune.py", *sweep_flags(samples=2, epochs=1), "--max-concurrent", "1", "--root", tiny_root, "--out", str(tmp_path),
           "--sweep-name", "r"]
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    trials = tmp_path / "r/trials"
    deadline = time.time() + 300
    finished = []
    while time.time() < deadline and not finished:
        finished = sorted(trials.glob("*/metrics/epoch-0001.json")) if trials.exists() else []  # its last epoch
        time.sleep(0.5)
    assert finished, "no trial finished before the deadline"
    time.sleep(5)  # let Tune record that trial as done in its experiment state
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (tmp_path / "r/results.csv").exists()
    # what each finished trial trained: its per-epoch metrics files
    done_before = {f: f.stat().st_mtime for p in trials.glob("*/metrics/epoch-0001.json") for f in p.parent.glob("epoch-*.json")}
    assert len(done_before) >= 1

    r = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = read_results(tmp_path / "r/results.csv")
    assert len(rows) == 2 and all(x["status"] in ("completed", "stopped early") for x in rows)
    for f, mtime in done_before.items():  # no epoch of a finished trial was trained again
        assert f.stat().st_mtime == mtime, f
    assert len(list(trials.glob("*/metrics"))) == 2


def _baseline(root, name: str, tasks: list[str], metrics: dict, data: str) -> str:
    """A finished single-task run's folder as training leaves it (config.json, metrics/, the
    pointer to its checkpoint): a run
    on the Miniscapes folder ``data``."""
    from mtl.config import DataConfig, ExperimentConfig, OptimConfig

    os.makedirs(root / name / "metrics")
    (root / name / "config.json").write_text(ExperimentConfig(data=DataConfig(root=data), optim=OptimConfig(tasks=tuple(tasks))).to_json())
    (root / name / "metrics" / "epoch-0001.json").write_text(json.dumps(metrics))
    os.makedirs(root / name / "checkpoints")
    (root / name / "checkpoints" / "latest.json").write_text(json.dumps({"latest": "epoch-0001", "history": ["epoch-0001"]}))
    return str(root / name)


def test_population_based_sweep_copies_the_stronger_trials_weights_and_minimises_delta_m(local_cluster, tiny_root, tmp_path):
    """Two trials, PBT at epoch 2 of 3 (synchronous: both have reached it): the weaker trial goes
    on from the stronger one's epoch-2 checkpoint, with a perturbed LR, in a run folder of its own,
    and trains epoch 3 there. The sweep minimises Δm against two single-task baselines."""
    import torch

    from mtl.checkpoint import load_checkpoint

    seg = _baseline(tmp_path, "seg-only", ["semseg"], {"miou": 20.0}, tiny_root)
    dep = _baseline(tmp_path, "depth-only", ["depth"], {"si_log_rmse": 70.0, "abs_rel": 0.9, "rmse": 25.0, "delta1": 25.0}, tiny_root)
    env = {**local_cluster, "RAY_ADDRESS": f"127.0.0.1:{local_cluster['RAY_PORT']}"}
    cmd = [sys.executable, "jobs/tune.py", *sweep_flags(samples=2, epochs=3), "--scheduler", "pbt", "--perturbation-interval", "2",
           "--pbt-sync", "--metric", "delta_m", "--baselines", seg, dep, "--root", tiny_root, "--out", str(tmp_path), "--sweep-name", "p"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = read_results(tmp_path / "p/results.csv")
    assert [x["status"] for x in rows] == ["completed", "completed"] and list(rows[0])[-3:] == ["delta_m", "status", "best_model"]
    assert float(rows[0]["delta_m"]) <= float(rows[1]["delta_m"])  # Δm: lower is better
    trials = tmp_path / "p/trials"
    seeded = sorted(trials.glob("*-p1"))
    assert len(seeded) == 1, sorted(p.name for p in trials.iterdir())  # exactly one trial exploited the other
    origin = json.loads((seeded[0] / "pbt-origin.json").read_text())["from"]
    donor = origin["run"]
    assert origin["tag"] == "epoch-0002" and os.path.basename(donor) != seeded[0].name.removesuffix("-p1")
    ours, theirs = load_checkpoint(f"{seeded[0]}/checkpoints/epoch-0002"), load_checkpoint(f"{donor}/checkpoints/epoch-0002")
    assert all(torch.equal(ours["model"][k], v) for k, v in theirs["model"].items())  # the stronger trial's weights
    assert ours["train_state"]["step"] == theirs["train_state"]["step"] == 4
    assert sorted(p.name for p in (seeded[0] / "metrics").iterdir()) == ["epoch-0003.json"]  # trained on from there
    lr = json.loads((seeded[0] / "config.json").read_text())["optim"]["lr"]
    assert 1e-4 <= lr <= 3e-3 and lr != theirs["config"]["optim"]["lr"]  # with a perturbed LR
    assert {int(x["epochs"]) for x in rows} == {3}

