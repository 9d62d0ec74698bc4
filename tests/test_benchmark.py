"""The benchmarks run (tiny sizes, CPU): a smoke test, not a timing."""

import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps >= 1"), (["--archs"], "at least one of --archs"), (["--batch-sizes", "1"], "--batch-sizes must be 2 or more"),
    (["--workers", "-1"], "--workers must be >= 0"),
])
def test_a_bad_benchmark_flag_is_a_usage_error(flags, message, capsys):
    from jobs import benchmark

    with pytest.raises(SystemExit) as e:
        benchmark.main(["train", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_benchmark_refuses_what_it_would_fail_on_after_measuring(tmp_path, capsys):
    """Caught before any measurement: a --json whose folder is not there, too few loader samples;
    an error while measuring (unreachable storage, missing shards) is one line, exit 2."""
    from jobs import benchmark

    for argv, message in ((["loader", "--json", str(tmp_path / "nope" / "x.json")], "--json .*/nope/x.json: its folder does not exist"),
                          (["loader", "--samples", "8"], "--samples must be at least 16"),
                          (["loader", "--scaling", "1", "--scaling-batches", "0"], "--scaling-batches and --per-worker must be >= 1"),
                          (["loader", "--s3", str(tmp_path / "here")], "must be an s3:// prefix"),  # (it wrote shards there)
                          (["train", "--intra-op-threads", "-1"], "--intra-op-threads must be >= 1"),
                          (["train", "--peak-tflops", "-5"], "--peak-tflops > 0")):
        with pytest.raises(SystemExit) as e:
            benchmark.main(argv)
        assert e.value.code == 2
        assert re.search(message, capsys.readouterr().err)
    assert benchmark.main(["train", "--shards", str(tmp_path / "no-shards"), "--archs", "deeplabv3p", "--encoder", "resnet18",
                           "--batch-sizes", "2", "--size", "32x64", "--steps", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-shards" in err and "Traceback" not in err, err


def test_a_bad_background_flag_is_a_usage_error(capsys):
    from jobs import benchmark

    with pytest.raises(SystemExit) as e:
        benchmark.main(["background", "--ops", "0"])
    assert e.value.code == 2 and "--ops, --state-mb and --repeats must be >= 1" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_a_background_job_that_fails_is_a_row_that_says_so():
    """(Not a hang: the steps are timed until the job ends, however it ends.)"""
    from jobs import benchmark

    def broken() -> None:
        raise OSError("no space left")

    row = benchmark._beside(benchmark.BackgroundBench(ops=2, gpu_ms=0.5), broken)
    assert row["error"] == "OSError: no space left" and row["steps"] >= 1 and math.isnan(row["job_s"])


def test_a_capture_that_fails_is_its_rows_finding_and_stops_the_rows_only_when_the_allocator_is_stuck(monkeypatch, tmp_path):
    """The one GPU run measures every row it can: a failed capture is recorded in its row; only
    one that leaves the allocator capturing (torch without pytorch#180395) ends the rows, after
    they are saved."""
    import mtl.cuda_graph
    from jobs import benchmark

    row = {"arch": "distillation", "batch": 64}
    benchmark._graph_failed(row, RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore"))
    assert row == {"arch": "distillation", "batch": 64,
                   "graph_error": "RuntimeError: CUDA error: operation not permitted when stream is capturing"}
    monkeypatch.setattr(mtl.cuda_graph, "allocator_left_capturing", lambda: "captures_underway.empty()")
    stuck = {"arch": "branched", "batch": 64}
    benchmark._graph_failed(stuck, RuntimeError("x"))
    assert stuck["stop"] and stuck["graph_error"] == "RuntimeError: x; the allocator was left capturing (captures_underway.empty())"
    made = iter([{"arch": "branched", "batch": 16}, {"arch": "branched", "batch": 64, "graph_error": "x", "stop": True}])
    monkeypatch.setattr(benchmark, "_bench_one", lambda *a: next(made))
    saved = []
    a = benchmark.TrainBench(archs=("branched",), batch_sizes=(16, 64, 128), device="cpu", strategy="plain", peak_tflops=1.0)
    with pytest.raises(RuntimeError, match="branched batch 64: x: no more rows can be measured"):
        benchmark.bench_train(a, lambda rows: saved.append([dict(r) for r in rows]))
    assert saved[-1] == [{"arch": "branched", "batch": 16}, {"arch": "branched", "batch": 64, "graph_error": "x"}]


def test_gpu_check_script_runs_its_phases(tmp_path):
    """`jobs/gpu_check.sh`, the one command a GPU session runs, at tiny sizes on the CPU: its
    phases run the benchmarks (`jobs/benchmark.py`) as a GPU session would, and their figures are
    checked here."""
    out = tmp_path / "gpu-check"
    env = {**os.environ, "PYTHON": sys.executable, "PHASES": "env tests eager plain loader threads background", "SIZE": "64x128", "BATCHES": "2",
           "COMPILE_BATCHES": "2", "ARCHS": "deeplabv3p distillation", "ENCODER": "resnet18", "STEPS": "2", "WARMUP": "1", "SAMPLES": "16", "WORKERS": "1",
           "LOADER_SAMPLES": "32", "SCALING": "1", "SCALING_BATCHES": "4 8", "PER_WORKER": "8", "T_LOADER": "300",
           "THREADS_BATCHES": "2", "T_THREADS": "300", "BACKGROUND_FLAGS": "--state-mb 4 --repeats 1", "T_BACKGROUND": "300",
           "BUNDLE": "",  # this venv's packages, not a .gpu-bundle/ made for the GPU machine's Python
           # the default limits are the GPU machine's (one 600 s call); a shared 2-core CPU needs more
           "T_TESTS": "300", "T_EAGER": "300", "T_PLAIN": "300", "DEADLINE": "1000", "EXPECT_DEVICE": "cpu",
           "CUDA_VISIBLE_DEVICES": ""}  # (the CPU run on a GPU machine too: its figures and skips are checked as CPU ones)
    env.pop("OUT", None)
    r = subprocess.run(["bash", "jobs/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    phases = (out / "phases.txt").read_text().splitlines()
    assert [p.split(":")[0] for p in phases] == ["== tests", "== eager", "== plain", "== loader", "== threads",
                                                        "== background"]
    assert all("exit 0" in p for p in phases)
    assert "torch" in (out / "env.txt").read_text()
    assert "skipped" in (out / "pytest-gpu.txt").read_text()  # no GPU here: skipped, never passed
    _check_train_rows(json.loads((out / "bench-eager.json").read_text())["rows"])
    threads = json.loads((out / "bench-threads.json").read_text())["rows"]  # branched, the training process on 1 CPU thread
    assert [(x["arch"], x["batch"], x["intra_op_threads"]) for x in threads] == [("branched", 2, 1)]
    plain = json.loads((out / "bench-plain.json").read_text())["rows"]
    assert [(x["arch"], x["strategy"]) for x in plain] == [("branched", "plain")]
    _check_loader_rows(json.loads((out / "bench-loader.json").read_text()))
    _check_background_rows(json.loads((out / "bench-background.json").read_text())["rows"])


def _check_train_rows(rows: list[dict]) -> None:
    """The eager phase's rows (`jobs/benchmark.py train`): pure and full path, the model's cost, and
    over the timed steps the training process's CPU and its one loader worker's (read from /proc)."""
    assert [(x["arch"], x["batch"], x["host_syncs"], x["strategy"]) for x in rows] == [("deeplabv3p", 2, 0, "ddp"),
                                                                                    ("distillation", 2, 0, "ddp")]
    for x in rows:
        assert x["pure_img_s"] > 0 and x["full_img_s"] > 0 and x["gflop_per_img"] > 0 and x["data_wait_ms"] >= 0
        assert x["main_cpu_ms_per_step"] > 0 and x["main_cores"] > 0 and x["workers"] == 1
        assert 0 <= x["workers_busy"] <= 1.2 and x["workers_cpu_ms_per_img"] >= 0
    assert rows[1]["gflop_per_img"] > rows[0]["gflop_per_img"]  # distillation costs more than the single branch


def _check_loader_rows(got: dict) -> None:
    """The loader phase's figures: bare decoding, the shard loader, and the folder loader by worker
    count and batch, each scaling row with what it cost the main process and the workers."""
    res = got["results"]
    assert res["bare read + decode"] > 0 and res["local shards loader + augmentation"] > 0
    rows = [f"folder loader + augmentation, 1 workers, batch {b} (total img/s after the first batch)" for b in (4, 8)]
    assert [k for k in res if k.startswith("folder loader + augmentation, 1 workers")] == rows
    assert all(res[r] > 0 for r in rows)
    assert list(got["cpu"]) == rows
    # (the workers' figure is read from /proc in clock ticks: 0 is possible for this tiny run)
    assert all(got["cpu"][r]["main_ms_per_img"] > 0 and got["cpu"][r]["workers_ms_per_img"] >= 0 for r in rows)


def _check_background_rows(rows: dict) -> None:
    """The background phase: what other threads' work costs the training thread's step queueing,
    a row per job."""
    assert list(rows) == ["nothing", "torch.save of 4 MB (a background checkpoint)", "PNG encoding of 10 validation pictures (tracker)",
                          "curves.png drawn by matplotlib in a thread", "curves.png drawn by a child process (mtl.curves)"]
    assert all(x["steps"] >= 1 and 0 < x["host_ms_median"] <= x["host_ms_p95"] for x in rows.values())
    assert all(x["job_s"] > 0 for name, x in rows.items() if name != "nothing")
    assert not any("error" in x for x in rows.values())


def _fake_ray_wheel(root):
    """An unpacked Ray wheel in miniature: the parts the slimming removes and the parts it keeps."""
    files = ["ray/__init__.py", "ray/_raylet.so", "ray/jars/ray_dist.jar", "ray/rllib/__init__.py", "ray/serve/__init__.py",
             "ray/llm/__init__.py", "ray/train/__init__.py", "ray/train/torch/__init__.py", "ray/tune/__init__.py",
             "ray/data/__init__.py", "ray/dashboard/dashboard.py", "ray/dashboard/client/build/index.html",
             "ray/dashboard/client/build/static/js/main.1234.js", "ray/dashboard/client/build/static/js/main.1234.js.map",
             "ray/dashboard/client/build/static/css/main.css.map", "ray/core/src/ray/raylet/raylet",
             "ray/__pycache__/__init__.cpython-311.pyc", "ray-2.60.0.dist-info/METADATA", "ray-2.60.0.dist-info/RECORD", "stray.txt"]
    for f in files:
        p = root / f
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"# {f}\n")
    (root / "ray/core/src/ray/raylet/raylet").chmod(0o755)


def test_the_minimal_gpu_bundle_holds_what_the_gpu_tests_import(tmp_path):
    """`gpu_bundle.sh min`: the wheels the GPU tests and benchmarks need beyond the machine's
    torch, tensorboardX included (their runs write TensorBoard events); nothing of Ray's."""
    full, small = tmp_path / "full", tmp_path / "min"
    (full / "wheels").mkdir(parents=True)
    (full / "PYTHON").write_text("3.12\n")
    names = ["webdataset-1.0.2", "braceexpand-0.1.7", "tyro-1.0.17", "docstring_parser-0.18.0", "typeguard-4.6.1",
             "typing_extensions-4.16.0", "tensorboardx-2.6.5", "pydantic-2.14.4", "deepspeed-0.19.7"]
    for n in names:
        (full / "wheels" / f"{n}-py3-none-any.whl").write_bytes(b"PK")
    r = subprocess.run(["bash", "jobs/gpu_bundle.sh", "min", str(full), str(small)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name.split("-")[0] for p in (small / "wheels").iterdir()) == sorted(n.split("-")[0] for n in names[:7])
    assert (small / "PYTHON").read_text() == "3.12\n"


def test_gpu_bundle_slims_ray(tmp_path):
    """`jobs/gpu_bundle.sh slim ROOT OUT`, the step that makes Ray's wheel fit a device call, on a
    copy of a fake unpacked wheel: what is removed, what is kept, executables stay executable."""
    fake, work, out = tmp_path / "fake", tmp_path / "work", tmp_path / "ray-slim.tar.xz"
    _fake_ray_wheel(fake)
    shutil.copytree(fake, work)
    r = subprocess.run(["bash", "jobs/gpu_bundle.sh", "slim", str(work), str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (fake / "ray/jars/ray_dist.jar").exists()  # only the copy it was given changed
    with tarfile.open(out) as tar:  # an xz archive
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
    assert set(members) == {"ray/__init__.py", "ray/_raylet.so", "ray/train/__init__.py", "ray/train/torch/__init__.py",
                            "ray/tune/__init__.py", "ray/data/__init__.py", "ray/dashboard/dashboard.py",
                            "ray/dashboard/client/build/index.html", "ray/dashboard/client/build/static/js/main.1234.js",
                            "ray/core/src/ray/raylet/raylet", "ray-2.60.0.dist-info/METADATA", "ray-2.60.0.dist-info/RECORD"}
    assert members["ray/core/src/ray/raylet/raylet"].mode & stat.S_IXUSR
    assert not (work / "ray/jars").exists() and not (work / "ray/dashboard/client/build/static/js/main.1234.js.map").exists()

    # a folder that is not an unpacked Ray wheel: refused, nothing written
    r = subprocess.run(["bash", "jobs/gpu_bundle.sh", "slim", str(tmp_path / "fake" / "ray"), str(tmp_path / "x.tar.xz")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no ray/ package folder" in r.stderr
    assert not (tmp_path / "x.tar.xz").exists()


def test_gpu_check_installs_a_bundle_for_its_python_only(tmp_path):
    """gpu_check.sh untars the slimmed Ray of a bundle into SITE (no phases run); a bundle made
    for another Python is refused before anything is installed."""
    bundle, site = tmp_path / "bundle", tmp_path / "site"
    _fake_ray_wheel(tmp_path / "wheel")
    bundle.mkdir()
    r = subprocess.run(["bash", "jobs/gpu_bundle.sh", "slim", str(tmp_path / "wheel"), str(bundle / "ray-2.60.0-cp3x-slim.tar.xz")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHON": sys.executable, "PHASES": " ", "BUNDLE": str(bundle), "SITE": str(site)}
    env.pop("OUT", None)

    (bundle / "PYTHON").write_text("2.7\n")
    r = subprocess.run(["bash", "jobs/gpu_check.sh", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "made for Python 2.7" in r.stderr and not site.exists()

    (bundle / "PYTHON").write_text("%d.%d\n" % sys.version_info[:2])
    r = subprocess.run(["bash", "jobs/gpu_check.sh", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (site / "ray/train/torch/__init__.py").exists() and (site / "ray-2.60.0.dist-info/METADATA").exists()
    assert "== bundle installed after" in (tmp_path / "out" / "bundle.txt").read_text()


def test_a_loader_benchmark_cut_short_keeps_what_it_measured(tmp_path):
    """The GPU check's loader phase runs under a time limit: every measurement is saved as it
    comes, so a run that ends early (here: the shard rows fail) leaves the rows before it."""
    out = tmp_path / "loader.json"
    code = ("import sys; from jobs import benchmark\n"
            "def cut(*a): raise RuntimeError('cut short')\n"
            "benchmark._shard_sources = cut\n"
            f"benchmark.main(['loader', '--size', '32x64', '--samples', '32', '--scaling', '1', '--scaling-batches', '8',"
            f" '--per-worker', '8', '--json', {str(out)!r}])")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "cut short" in r.stderr
    res = json.loads(out.read_text())["results"]
    assert {"bare read + decode", "folder loader + augmentation",
            "folder loader + augmentation, 1 workers, batch 8 (total img/s after the first batch)"} <= set(res)
    assert not any("shards" in k for k in res)


@pytest.mark.parametrize("on_sigint", ["dies", "exits 0"])
def test_a_train_phase_cut_by_its_limit_still_reports(tmp_path, on_sigint):
    """The phase limit interrupts the whole process group of a train phase: the run dies, the
    phase's shell goes on and its checks still write ray.json (here the run is a stand-in that
    never ends; the phase is cut after 3 s). Ray Train's driver may exit 0 on the SIGINT (its own
    handler): the resume must not start then, in the seconds before the SIGKILL."""
    fake = tmp_path / "python"
    trap = "trap 'exit 0' INT; " if on_sigint == "exits 0" else ""
    fake.write_text(f'#!/usr/bin/env bash\n[ "$1" = jobs/train.py ] && {{ {trap}echo "training..."; sleep 60; exit 0; }}\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "gpu-check"
    logs = tmp_path / "rt" / "ray" / "session_latest" / "logs"  # (what Ray's own processes would have left)
    logs.mkdir(parents=True)
    (logs / "raylet.err").write_text("x" * 30000 + "the raylet's last words\n")
    env = {**os.environ, "PYTHON": str(fake), "PHASES": "ray", "BUNDLE": "", "T_RAY": "3", "RUNS": str(tmp_path / "runs"),
           "RAY_TMPDIR": str(tmp_path / "rt")}
    env.pop("OUT", None)
    r = subprocess.run(["bash", "jobs/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # the phase failed ...
    assert "-- ray: interrupted by the phase limit" in r.stdout
    res = json.loads((out / "ray.json").read_text())  # ... and said how
    code = "0" if on_sigint == "exits 0" else "130"
    assert not res["ok"] and res["problems"][0] == f"cut by the phase limit (run 1 exited {code}): raise T_RAY", res
    assert "no resume" in (out / "ray" / "run2.log").read_text()
    kept = (out / "ray" / "ray-logs" / "raylet.err").read_text()  # the end of Ray's logs comes back with a failed phase
    assert kept.endswith("the raylet's last words\n") and len(kept) == 20000
    assert (out / "phases.txt").read_text().startswith("== ray: exit 124 after ")  # (timeout's code for a command it cut)


def test_the_gpu_check_without_a_bundle_or_the_projects_packages_stops_at_once(tmp_path):
    """The device machine lacks tyro, Ray and DeepSpeed: without the bundle every phase would
    fail after its start, so the script stops before the first, naming what to do."""
    fake = tmp_path / "python"  # a Python without the project's packages
    fake.write_text(f'#!/usr/bin/env bash\ncase "$*" in *"import tyro"*) exit 1;; esac\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "gpu-check"
    env = {**os.environ, "PYTHON": str(fake), "PHASES": "env", "BUNDLE": str(tmp_path / "no-such-bundle")}
    env.pop("OUT", None)
    r = subprocess.run(["bash", "jobs/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "lacks this project's packages (tyro, webdataset)" in r.stderr, r.stdout + r.stderr
    assert "no-such-bundle" in (out / "bundle.txt").read_text() and not (out / "env.txt").exists()
