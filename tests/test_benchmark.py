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
