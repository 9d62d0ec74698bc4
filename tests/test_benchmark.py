"""The benchmarks run (tiny sizes, CPU): a smoke test, not a timing."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_benchmark_smoke(tmp_path):
    out = tmp_path / "train.json"
    r = subprocess.run([sys.executable, "jobs/benchmark.py", "train", "--archs", "deeplabv3p", "distillation", "--encoder", "resnet18",
                        "--batch-sizes", "2", "--size", "64x128", "--steps", "2", "--warmup", "1", "--samples", "16",
                        "--workers", "0", "--json", str(out)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [x["arch"] for x in rows] == ["deeplabv3p", "distillation"]
    for x in rows:
        assert x["pure_img_s"] > 0 and x["full_img_s"] > 0 and x["gflop_per_img"] > 0 and x["data_wait_ms"] >= 0
    assert rows[1]["gflop_per_img"] > rows[0]["gflop_per_img"]  # distillation costs more than the single branch


def test_loader_benchmark_smoke(tmp_path):
    out = tmp_path / "loader.json"
    r = subprocess.run([sys.executable, "jobs/benchmark.py", "loader", "--size", "32x64", "--samples", "64", "--workers", "1",
                        "--json", str(out)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())["results"]
    assert res["bare read + decode"] > 0 and res["local shards loader + augmentation"] > 0


def test_gpu_check_script_runs_its_phases(tmp_path):
    """`jobs/gpu_check.sh`, the one command a GPU session runs, at tiny sizes on the CPU."""
    out = tmp_path / "gpu-check"
    env = {**os.environ, "PYTHON": sys.executable, "PHASES": "env tests eager plain", "SIZE": "64x128", "BATCHES": "2", "COMPILE_BATCHES": "2",
           "ARCHS": "branched", "ENCODER": "resnet18", "STEPS": "2", "WARMUP": "1", "SAMPLES": "16", "WORKERS": "1"}
    r = subprocess.run(["bash", "jobs/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    phases = (out / "phases.txt").read_text().splitlines()
    assert [p.split(":")[0] for p in phases] == ["== tests", "== eager", "== plain"] and all("exit 0" in p for p in phases)
    assert "torch" in (out / "env.txt").read_text()
    assert "skipped" in (out / "pytest-gpu.txt").read_text()  # no GPU here: skipped, never passed
    rows = json.loads((out / "bench-eager.json").read_text())["rows"]
    assert [(x["arch"], x["batch"], x["host_syncs"], x["strategy"]) for x in rows] == [("branched", 2, 0, "ddp")]
    plain = json.loads((out / "bench-plain.json").read_text())["rows"]
    assert [(x["arch"], x["strategy"]) for x in plain] == [("branched", "plain")]
