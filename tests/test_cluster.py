"""The README's cluster workflow, for real: cluster/local.sh up, ray job submit, down."""

import os
import socket
import subprocess

import pytest

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_cluster():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_PORT": str(_port()), "RAY_DASHBOARD_PORT": str(_port())}
    up = subprocess.run(["cluster/local.sh", "up", "--workers", "2", "--cpus-per-node", "1"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    env["RAY_ADDRESS"] = f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}"
    yield env
    down = subprocess.run(["cluster/local.sh", "down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    left = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"leftover Ray processes: {left.stdout}"


def submit(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", "job", "submit", "--working-dir", ".", "--", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_job_submit_trains_distillation_on_the_local_cluster(local_cluster, tiny_root, tmp_path):
    r = submit(local_cluster, "python", "jobs/train.py", "--arch", "distillation", "--encoder", "resnet18", "--root", tiny_root,
               "--epochs", "1", "--batch-size", "4", "--max-steps-per-epoch", "2", "--workers", "0", "--num-workers", "2",
               "--out", str(tmp_path), "--name", "submitted")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout + r.stderr
    assert "done: mIoU" in r.stdout
    for f in ("best.pt", "final.pt", "summary.json", "epoch-0001/state.pt"):
        assert (tmp_path / "submitted" / f).exists(), f
