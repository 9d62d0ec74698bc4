"""Shared fixtures: a small synthetic Miniscapes set generated once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from data_prep.synthesize import synthesize

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["STREETMTL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    # (DeepSpeed's JIT-built ops: none on the CPU, `without_cpu_shm_op`; any other is kept for the session)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions"))
    # (a driver's lease on its run folder, `mtl.lease`: 24 s instead of 120, so that a driver's
    # start reads its lease back after 0.2 s instead of 1; test_lease times its own. Not less: a
    # driver whose renewals stall for 3/4 of it ends its process, the test session when in it)
    os.environ.setdefault("STREETMTL_LEASE_TTL_S", "24")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """64x128 synthetic Miniscapes: 96 train / 24 val / 16 test."""
    root = synthesize(str(tmp_path_factory.mktemp("data") / "miniscapes"), {"train": 96, "val": 24, "test": 16}, (64, 128), seed=1, workers=2)
    os.environ["STREETMTL_TINY_ROOT"] = root
    return root


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A function returning a free TCP port on loopback."""
    return _free_port


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on loopback (moto server), exported through the standard AWS variables
    so that boto3, s3fs, the aws CLI and subprocesses (Ray workers included) all use it."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="streetmtl")
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def unreachable_s3(monkeypatch) -> str:
    """S3 pointed at a closed port on loopback (one attempt): its endpoint. s3fs's cached
    filesystems are dropped before and after, so neither side sees the other's endpoint."""
    import s3fs

    endpoint = "http://127.0.0.1:9"
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "1", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_prefix(s3_endpoint, request) -> str:
    """A fresh s3:// prefix per test."""
    import uuid

    return f"s3://streetmtl/{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def s3_shards(tiny_root, s3_endpoint) -> str:
    """The tiny set sharded onto S3 through the CLI, 8 samples per shard (12 train shards)."""
    import subprocess
    import sys

    url = "s3://streetmtl/tiny-shards"
    r = subprocess.run([sys.executable, "-m", "data_prep.shard", "--src", tiny_root, "--dst", url, "--shard-size", "8",
                        "--workers", "2"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"manifest: {url}/manifest.json" in r.stdout
    return url


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The GCS declares a node dead after health_check_failure_threshold missed checks, one every
# health_check_period_ms: ~15-30 s by default. A test that kills a node waits for that; these
# settings make it ~4 s and still leave a raylet slowed by a busy 2-core machine 4 s to answer.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 4}


class RayCluster:
    """Several Ray nodes on this machine (ray.cluster_utils.Cluster), connected; shut down after."""

    def __init__(self, worker_cpus: list[int], head_cpus: int = 0, system_config: dict | None = None) -> None:
        import ray
        from ray.cluster_utils import Cluster

        head = {"num_cpus": head_cpus, "include_dashboard": True, **({"_system_config": system_config} if system_config else {})}
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        self.nodes = [self.cluster.add_node(num_cpus=c) for c in worker_cpus]
        ray.init(address=self.cluster.address)

    def close(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture
def ray_cluster():
    """Factory: ``ray_cluster([1, 1])`` starts a head (0 CPUs) plus two 1-CPU nodes
    (``fast_node_death``: a killed node is declared dead in seconds, `FAST_NODE_DEATH`)."""
    made = []

    def make(worker_cpus: list[int], head_cpus: int = 0, fast_node_death: bool = False) -> RayCluster:
        c = RayCluster(worker_cpus, head_cpus, FAST_NODE_DEATH if fast_node_death else None)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def check_run_layout(run_url: str, epochs: int, sharded: bool = False) -> list[str]:
    """The one run-folder layout every mode writes (`mtl.checkpoint`): config.json, train.log,
    metrics/epoch-NNNN.json per epoch, best.pt, checkpoints/latest.json pointing at the last
    epoch's checkpoints/epoch-NNNN/state.pt (+ shards/ under DeepSpeed), and nothing of the
    earlier layouts. Returns the run folder's listing."""
    import json

    import fsspec

    fs, path = fsspec.core.url_to_fs(run_url)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    assert {"config.json", "train.log", "metrics", "best.pt", "checkpoints"} <= set(names), names
    assert not [n for n in names if n.startswith("epoch-") or n == "final.pt"], names
    last = f"epoch-{epochs:04d}"
    assert json.loads(fs.cat_file(f"{path}/checkpoints/latest.json"))["latest"] == last
    assert fs.exists(f"{path}/checkpoints/{last}/state.pt")
    assert bool(fs.glob(f"{path}/checkpoints/{last}/shards/**/*optim_states.pt")) == sharded
    assert fs.exists(f"{path}/metrics/{last}.json")
    return names


@pytest.fixture
def worker_start(monkeypatch):
    """``worker_start("fork" | "forkserver")``: how this test's loader workers start
    (`mtl.data.loader.worker_start_kwargs`: from a fork server where Ray is loaded in the process)."""
    from mtl.data import loader

    def use(start: str) -> None:
        monkeypatch.setattr(loader, "from_fork_server", lambda: start == "forkserver")

    return use


def run_main(main, args: list[str]):
    """A command's ``main(args)`` in this process, as a shell would run it (no interpreter start,
    no imports again: seconds a call): its exit code (the flag parser's refusals exit) and its
    output, captured, as a ``subprocess.CompletedProcess``."""
    import contextlib
    import io
    import subprocess

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def in_process():
    """`run_main` as a fixture."""
    return run_main


@pytest.fixture(scope="session")
def run_layout():
    """`check_run_layout` as a fixture."""
    return check_run_layout


def on_ray(nodeid: str) -> bool:
    """Whether a test starts Ray processes on this machine: those live in ``test_*_on_ray.py``."""
    return nodeid.split("::", 1)[0].endswith("_on_ray.py")


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # (before xdist's own; a GPU machine may lack xdist)
def pytest_xdist_make_scheduler(config, log):
    """Under ``-n``: the tests of the ``*_on_ray.py`` files one after another on one test process
    (two Ray clusters on one machine share /tmp/ray, `ray stop` ends both, and each test checks
    that its cluster left nothing behind), first, since they take the longest; every other test is
    dealt on its own to whichever process is free. xdist's --dist loadgroup would do this from a
    mark, but it renames the tests' nodeids in a way pytest 9.2 no longer takes."""
    if config.getvalue("dist") != "load":  # (-n's default; another --dist given is kept)
        return None
    from xdist.scheduler import LoadScopeScheduling

    class RayTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "ray" if on_ray(nodeid) else nodeid

    return RayTestsTogether(config, log)


@pytest.hookimpl(tryfirst=True)  # (before -m deselects by the marks)
def pytest_collection_modifyitems(config, items):
    """The tests of the ``*_on_ray.py`` files are marked `ray` (``-m "not ray"`` leaves them out).
    GPU tests are skipped, visibly, where there is no CUDA device: never passed vacuously."""
    import torch

    for item in items:
        if on_ray(item.nodeid):
            item.add_marker(pytest.mark.ray)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _ray_only_on_ray(request):
    """A test outside the ``*_on_ray.py`` files would run beside the Ray tests: one that asks
    for `ray_cluster` fails before it starts any, one that leaves Ray started in this process
    after it; both say where it belongs."""
    import sys

    if on_ray(request.node.nodeid):
        yield
        return
    where = "move it into a tests/test_*_on_ray.py file"
    if "ray_cluster" in request.fixturenames:
        pytest.fail(f"this test starts Ray (ray_cluster): {where}")
    yield
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        pytest.fail(f"this test started Ray in the test process: {where}")


@pytest.fixture
def disk_events(monkeypatch, tmp_path_factory):
    """A function that returns ("fsync", path) and ("rename", destination) of this process and
    of the processes it forks from now on, in the order they happened (the real calls,
    recorded in a file that each process appends to): what a power loss could leave is decided
    by their order."""
    log, fsync, replace, rename = str(tmp_path_factory.mktemp("disk-events") / "events"), os.fsync, os.replace, os.rename

    def record(what: str, path: str) -> None:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{what}\t{path}\n".encode())
        finally:
            os.close(fd)

    def recorded_fsync(fd):
        record("fsync", os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    def recorded(move):
        def moved(src, dst, *args, **kwargs):
            out = move(src, dst, *args, **kwargs)
            record("rename", os.path.realpath(dst))
            return out
        return moved

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded(replace))
    monkeypatch.setattr(os, "rename", recorded(rename))
    return lambda: [tuple(line.split("\t")) for line in open(log).read().splitlines()] if os.path.exists(log) else []
