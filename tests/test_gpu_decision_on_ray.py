"""GPU or CPU workers, wait or fail, on real Ray: a fixed cluster without GPUs, and an
autoscaling cluster (Ray's fake multi-node provider) whose autoscaler config has a GPU node type
but no GPU node yet."""

import os
import subprocess
import sys
import time

import pytest
import yaml

from mtl.distributed.capacity import InfeasibleCluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_a_fixed_ray_cluster_without_gpus_fails_at_once(ray_cluster, tiny_root, tmp_path, monkeypatch):
    from mtl.config import DataConfig, DistConfig, ExperimentConfig, ModelConfig, TrainConfig
    from mtl.distributed.ray_train import run_ray

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/ray_bootstrap_config.yaml here
    ray_cluster([1, 1])  # joined, as a submitted job would be
    cfg = ExperimentConfig(data=DataConfig(root=tiny_root), model=ModelConfig(encoder="resnet18"),
                           train=TrainConfig(out=str(tmp_path), name="gpu"), dist=DistConfig(start_timeout_s=900))
    t0 = time.time()
    with pytest.raises(InfeasibleCluster, match=r"nodes now: CPU 2, GPU 0; node types the autoscaler may add \(no autoscaler "
                                                 r"config found: a fixed cluster\): none.*--no-use-gpu"):
        run_ray(cfg)
    assert time.time() - t0 < 30


# --------------------------------------------------------------------------- a real autoscaler

def autoscaler_config(port: int, gpu_nodes: int) -> dict:
    """Ray's fake multi-node provider: the autoscaler launches 'nodes' as local raylets with the
    resources of their node type (a fake GPU is just a resource)."""
    return {
        "cluster_name": "fake", "max_workers": 4, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                                 "gpu_node": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                                              "max_workers": gpu_nodes}},
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.fixture
def autoscaling_cluster(tmp_path, free_port):
    """A head with an autoscaler (no GPU yet) and $HOME/ray_bootstrap_config.yaml, as `ray up`
    leaves them on a head node."""
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(autoscaler_config(port, 1)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(["ray", "start", "--head", f"--autoscaling-config={home / 'ray_bootstrap_config.yaml'}", "--num-cpus=0",
                    f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True)
    yield {**env, "HOME": str(home), "RAY_ADDRESS": f"127.0.0.1:{port}"}
    subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True)


@pytest.mark.slow
def test_a_submitted_run_waits_for_the_autoscalers_gpu_node(autoscaling_cluster, tiny_root, tmp_path):
    """No GPU in the cluster at submit time, a GPU node type in its config: the run asks for GPU
    workers (no --use-gpu given) and the autoscaler starts a GPU node for them. Its 'GPU' is a
    fake one, so the workers then fail to set up NCCL there, and the error says why."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "jobs/train.py", "--encoder", "resnet18", "--root", tiny_root, "--epochs", "1",
                        "--batch-size", "4", "--max-steps-per-epoch", "1", "--workers", "0", "--max-failures", "0",
                        "--start-timeout-s", "120", "--out", str(tmp_path / "runs"), "--name", "gpu"],
                       cwd=REPO, env=autoscaling_cluster, capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert "training workers on GPUs (the default on a cluster this run joins; --no-use-gpu trains on CPUs)" in out, out[-3000:]
    assert "not on the cluster now; the autoscaler can add them — waiting up to 120s" in out
    assert "~/ray_bootstrap_config.yaml): gpu_node x1 {CPU: 1, GPU: 1}" in out
    assert r.returncode == 2 and "error: the training workers failed to start: " in r.stderr, out[-3000:]
    assert "The workers were given GPUs, but torch sees none on their node" in r.stderr
    assert time.time() - t0 < 200
    print(f"worker placed on the autoscaled GPU node and stopped after {time.time() - t0:.0f}s")
