"""Ray Train on real Ray processes (several nodes on this machine), CPU only."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import fsspec
import pytest

from mtl.config import DataConfig, DistConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig
from mtl.schedule import PolyLR

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ray_cfg(out: str, name: str, *, root=None, shards=None, epochs=2, steps=3, workers=2, loader_workers=0, **dist) -> ExperimentConfig:
    return ExperimentConfig(
        data=DataConfig(root=root, shards=shards, workers=loader_workers),
        model=ModelConfig(arch="deeplabv3p", encoder="resnet18"),
        optim=OptimConfig(lr=1e-3),
        train=TrainConfig(epochs=epochs, batch_size=4, max_steps_per_epoch=steps, out=out, name=name, device="cpu"),
        dist=DistConfig(**{"num_workers": workers, "max_failures": 2, "start_timeout_s": 60, "use_gpu": False, **dist}),
    ).validate()


def read_metrics(run_url: str) -> list[dict]:
    fs, path = fsspec.core.url_to_fs(run_url)
    files = sorted(fs.glob(f"{path}/metrics/epoch-*.json"))
    return [json.loads(fs.cat_file(f)) for f in files]


def test_ddp_on_three_nodes_streams_s3_shards_and_checkpoints_to_s3(ray_cluster, s3_shards, tmp_path, monkeypatch, run_layout):
    """Also: the S3 keys in the environment of the nodes (as `ray start` after `export AWS_...`)
    are what the workers use; none is copied into Ray's actor metadata, which the dashboard and
    `ray list actors --detail` show to anyone who can reach them."""
    import uuid

    from mtl.distributed.ray_train import run_ray
    from mtl.runs import run_url

    secret = f"dummy-secret-{uuid.uuid4().hex}"  # moto takes any key
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(k, f"{secret}-{k}")
    c = ray_cluster([1, 1, 1])
    cfg = ray_cfg("s3://streetmtl/ray-runs", "ddp-s3", shards=s3_shards, workers=3)
    result, _ = run_ray(cfg)
    assert result.error is None
    assert result.checkpoint is not None and result.checkpoint.path.endswith("ddp-s3/checkpoints/epoch-0002")
    fs = fsspec.filesystem("s3")
    run_layout("s3://streetmtl/ray-runs/ddp-s3", epochs=2)
    metrics = read_metrics(run_url(cfg))
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["num_depth_images"] == 24 for m in metrics)  # val reduced across the 3 ranks: every image once
    # the run folder exports with the evaluation tool (its latest checkpoint), straight from S3
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "jobs/evaluate.py", "--checkpoint", "s3://streetmtl/ray-runs/ddp-s3",
                        "--data", os.environ["STREETMTL_TINY_ROOT"], "--split", "test", "--export", str(out), "--viz", "1"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "s3://streetmtl/ray-runs/ddp-s3/checkpoints/epoch-0002/state.pt" in r.stdout
    assert len(os.listdir(out / "depth")) == 16
    # no secret in Ray's metadata (a non-secret setting, AWS_REGION, is forwarded and shows) or the run folder
    r = subprocess.run(["ray", "list", "actors", "--detail", "--limit", "1000", "--address", c.cluster.address],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "RayTrainWorker" in r.stdout and os.environ["AWS_REGION"] in r.stdout
    assert secret not in r.stdout
    for f in fs.find("streetmtl/ray-runs/ddp-s3"):
        if f.endswith((".json", ".log", ".txt")):
            assert secret not in fs.cat_file(f).decode(errors="replace"), f


# the GPU check's train phases at tiny size on the CPU: 64x128 synthetic set of 8/4/2, one step per
# epoch, 1-CPU Ray workers without loader processes; failures not retried
TINY_RAY_FLAGS = ("--arch deeplabv3p --encoder resnet18 --synthetic-size 64x128 --synthetic-counts 8 4 2 --batch-size 2 "
                  "--max-steps-per-epoch 1 --cpus-per-worker 1 --workers 0 --no-use-gpu --max-failures 0 --start-timeout-s 120")


def test_deepspeed_zero2_trains_and_resumes(tmp_path, run_layout):
    """DeepSpeed ZeRO-2 on two Ray workers, as the GPU check's deepspeed phase runs it
    (`jobs/gpu_check.sh`, with the CPU as the expected device): two epochs, then --resume to a
    third, Ray started by each run. The same run-folder layout as every mode, every rank's ZeRO
    partition in shards/; the evaluation tool reads it like any other. The ray phase is the same
    shell function without the DeepSpeed flags (Ray Train's DDP path is tested above)."""
    import tarfile
    import tempfile

    out, packed, runs = tmp_path / "gpu-check", tmp_path / "packed", tmp_path / "runs"
    ray_tmp = tempfile.mkdtemp(prefix="gcr", dir="/tmp")  # short: Ray's socket paths live below it
    env = {**os.environ, "PYTHON": sys.executable, "PHASES": "data deepspeed", "BUNDLE": "", "EXPECT_DEVICE": "cpu",
           "RAY_FLAGS": TINY_RAY_FLAGS.replace("--max-steps-per-epoch 1", "--max-steps-per-epoch 2"),  # (a step checkpoint per epoch)
           "STEP_CHECKPOINTS": "1", "TRAIN_WORKERS": "2", "RUNS": str(runs), "RAY_TMPDIR": ray_tmp, "PACK_TO": str(packed),
           "T_DEEPSPEED": "600", "DEADLINE": "1300"}  # shared 2-core machines: generous limits
    for k in ("OUT", "RAY_ADDRESS"):
        env.pop(k, None)
    try:
        r = subprocess.run(["bash", "jobs/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1400)
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    phases = (out / "phases.txt").read_text().splitlines()
    assert [p.split(":")[0] for p in phases] == ["== data", "== deepspeed", "== deepspeed checks"], phases
    assert all("exit 0" in p for p in phases[:2]) and phases[2] == "== deepspeed checks: ok ==", phases  # (after the limit)
    assert "train data: " in (out / "data.txt").read_text()  # (made before Ray starts: the workers find it)
    res = json.loads((out / "deepspeed.json").read_text())
    assert res["ok"] and not res["problems"], res
    assert all("ds-gpu on cpu x2: " in line for line in res["start_lines"]), res["start_lines"]
    assert ": epoch 2, step 4/6" in res["resumed"]  # the resume continued after epoch 2 ...
    assert [e["epoch"] for e in res["epochs"]] == [1, 2, 3]
    assert [e["restarts"] for e in res["epochs"]] == [0, 0, 1]  # ... and trained epoch 3
    assert all(e["train_images_per_s"] > 0 and e["val_s"] > 0 for e in res["epochs"])
    assert res["zero_stage"] == 2  # DeepSpeed's own record in the checkpoint
    steps = res["step_checkpoints"]  # (after each of the epochs' 2 steps: the last one's too, before its validation)
    assert len(steps["stalled_s"]) == 6 and not any(steps["background"]) and steps["written_s"] == [None] * 6, steps  # (ZeRO shards: foreground)
    ends = res["epoch_checkpoints"]  # the same at epoch ends, and the run's last epoch's in the foreground anyway
    assert ends["tags"] == ["epoch-0001", "epoch-0002", "epoch-0003"] and not any(ends["background"]), ends
    run = runs / "deepspeed" / "ds-gpu"
    run_layout(str(run), epochs=3, sharded=True)
    assert len(list((run / "checkpoints/epoch-0003/shards").glob("zero/*optim_states.pt"))) == 2  # one per rank
    r = subprocess.run([sys.executable, "jobs/evaluate.py", "--checkpoint", str(run), "--split", "val"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "ds-gpu/checkpoints/epoch-0003/state.pt" in r.stdout, r.stdout + r.stderr
    # only small files came out: the run's metrics, summary and logs; checkpoints stay in RUNS
    kept = {p.relative_to(out / "deepspeed").as_posix() for p in (out / "deepspeed").rglob("*") if p.is_file()}
    assert {"run1.log", "run2.log", "summary.json", "metrics/epoch-0003.json"} <= kept, kept
    assert not any(k.endswith((".pt", ".ckpt")) or "checkpoint" in k for k in kept), kept
    # the device machine's copy: a few files, everything else in one archive
    names = sorted(p.name for p in packed.iterdir())
    assert names == ["bundle.txt", "deepspeed.json", "gpu-check.tar.gz", "phases.txt"], names
    assert (packed / "bundle.txt").read_text() == "no bundle: the installed packages\n"  # (BUNDLE= here)
    with tarfile.open(packed / "gpu-check.tar.gz") as tar:
        assert "gpu-check/deepspeed/metrics/epoch-0003.json" in tar.getnames()


def test_an_elastic_run_goes_on_without_the_lost_node_and_grows_back(ray_cluster, tiny_root, tmp_path):
    """--num-workers 2 --min-workers 1 on two 1-CPU nodes: one node is killed after the second
    epoch; training goes on with one worker without waiting for a replacement (an epoch ends
    with world 1 before any node is added), then a new node joins and the run grows back to two
    workers. Every step's LR follows the plan over samples seen (a step of one worker is half a
    planned step); Ray keeps the last two checkpoints."""
    from mtl.distributed.ray_train import run_ray
    from mtl.runs import run_url

    EPOCHS = 10  # room for Ray to notice the new node before the run ends
    c = ray_cluster([1, 1], fast_node_death=True)
    cfg = ray_cfg(str(tmp_path), "elastic", root=tiny_root, epochs=EPOCHS, steps=3, resize_interval_s=2.0,
                  start_timeout_s=10)  # (the restart's wait for the lost node; placing on a live node takes no time)
    cfg = cfg.with_values({"train.checkpoint_every": 2, "dist.min_workers": 1}).validate()
    holder = {}
    thread = threading.Thread(target=lambda: holder.update(result=run_ray(cfg)[0]))
    thread.start()

    def wait_for(what, ok, timeout=240):
        deadline = time.time() + timeout
        while not ok() and time.time() < deadline:
            time.sleep(0.2)
        assert ok(), what

    wait_for("training never checkpointed epoch 2", lambda: (tmp_path / "elastic/checkpoints/epoch-0002/state.pt").exists())
    killed_at = time.time()
    c.cluster.remove_node(c.nodes[1], allow_graceful=False)
    wait_for("no epoch ended with one worker", lambda: any(m["world"] == 1 for m in read_metrics(str(tmp_path / "elastic"))))
    alone_s = time.time() - killed_at
    c.cluster.add_node(num_cpus=1)  # a replacement node joins
    thread.join(timeout=400)
    assert not thread.is_alive()
    assert holder["result"].error is None
    metrics = read_metrics(run_url(cfg))
    assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1)) and metrics[-1]["restarts"] >= 2
    worlds = [m["world"] for m in metrics]
    # shrank, then grew back (epoch 2 itself is trained again by one worker when Ray had not yet
    # registered its checkpoint at the kill; Ray notices the new node within seconds to half a minute)
    assert worlds[0] == 2 and 1 in worlds and 2 in worlds[worlds.index(1):], worlds
    pointer = json.loads((tmp_path / "elastic/checkpoints/latest.json").read_text())
    assert pointer["latest"] == f"epoch-{EPOCHS:04d}" and len(pointer["history"]) == 2  # what Ray keeps (--keep-last 2)
    expected = PolyLR(1e-3, EPOCHS * 3, 0.9)
    for m in metrics:  # an epoch's last step at the plan's position in samples (taken by a world of 1 or 2 ranks: one
        # that resumed at the epoch's end trained none of it, and its steps before a resume were another world's)
        assert any(m["epoch_lrs"][-1] == pytest.approx(expected((m["samples"] - 4 * w) / 8)) for w in (1, 2)), m
    lrs = [lr for m in metrics for lr in m["epoch_lrs"]]
    assert len(lrs) >= EPOCHS * 3 and all(a > b for a, b in zip(lrs, lrs[1:]))  # (no warmup: down at every step)
    assert metrics[0]["samples"] == 3 * 8  # an epoch of 3 steps with the planned global batch
    log = (tmp_path / "elastic/train.log").read_text()
    assert "on cpu x1" in log and log.rindex("on cpu x2") > log.index("on cpu x1")
    print(f"one worker trained an epoch {alone_s:.1f}s after the node was killed; finished {time.time() - killed_at:.1f}s after")


def test_a_local_run_continues_on_ray_and_back(ray_cluster, tiny_root, tmp_path, run_layout, capsys):
    """One layout, one checkpointer: a run begun in local mode continues on a Ray worker (Ray has
    no record of it: the run folder's pointer is what it resumes from), local mode continues
    what Ray wrote, and Ray again what local mode wrote (which deleted a folder Ray had
    registered). On Ray with a loader worker: it starts from a fork server, never forked from
    the Ray worker's process (`mtl.data.loader.worker_start_kwargs`). Ctrl-C stops a run on Ray as
    it stops a local one."""
    from mtl.distributed.ray_train import run_ray
    from mtl.engine import fit, local_runtime
    from mtl.runs import run_url

    def cfg_for(epochs: int, resume: bool, loader_workers: int = 0) -> ExperimentConfig:
        cfg = ray_cfg(str(tmp_path), "moves", root=tiny_root, epochs=epochs, steps=2, workers=1, loader_workers=loader_workers)
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=resume))

    fit(cfg_for(1, False), local_runtime(cfg_for(1, False)))
    ray_cluster([1])
    from mtl.errors import WorkerFailed

    wrong = ray_cfg(str(tmp_path), "wrong", root=str(tmp_path / "nowhere"), epochs=1, steps=2, workers=1, max_failures=0)
    with pytest.raises(WorkerFailed, match=f"rank 0: Miniscapes folder missing: {tmp_path}/nowhere/train/rgb") as failed:
        run_ray(wrong)  # a worker's error: named as local mode names it, a user error (exit code 2 in jobs/train.py)
    assert failed.value.user_error
    _ctrl_c_aborts_the_run(ray_cfg(str(tmp_path), "stopped", root=tiny_root, epochs=100, steps=2, workers=1))
    orphan = tmp_path / "moves/checkpoints/epoch-0000-step-00000001"  # committed by a worker, never registered by Ray
    orphan.mkdir()
    (orphan / "state.pt").write_bytes(b"x")
    assert run_ray(cfg_for(3, True, loader_workers=1))[0].error is None
    run_layout(str(tmp_path / "moves"), epochs=3)
    assert "(1 loader worker, from a fork server)" in (tmp_path / "moves/train.log").read_text()
    # (Ray deletes what it registered past --keep-last; epoch-0001, local mode's, which Ray never registered,
    # goes at the commit whose pointer no longer lists it: `RayStorage.outside_ray`)
    assert sorted(p.name for p in (tmp_path / "moves/checkpoints").iterdir()) == ["epoch-0002", "epoch-0003", "latest.json"]
    fit(cfg_for(4, True), local_runtime(cfg_for(4, True)))  # --keep-last 2: deletes epoch-0002, which Ray registered
    capsys.readouterr()
    assert run_ray(cfg_for(5, True))[0].error is None  # (Ray refuses a record that names a folder which is gone)
    assert "deleted Ray's checkpoint record" in capsys.readouterr().out
    metrics = read_metrics(run_url(cfg_for(5, True)))
    assert [(m["epoch"], m["step"], m["restarts"]) for m in metrics] == [(1, 2, 0), (2, 4, 1), (3, 6, 1), (4, 8, 2), (5, 10, 3)]
    run_layout(str(tmp_path / "moves"), epochs=5)


def _ctrl_c_aborts_the_run(cfg: ExperimentConfig) -> None:
    """Ctrl-C in a driver training on Ray, once its first epoch is done: Ray aborts the run and
    `run_ray` raises KeyboardInterrupt (`jobs/train.py`: exit 130, "--resume continues"), not the
    SystemExit that Ray's own handler ends with; the handler before the run is back in place."""
    from mtl.distributed.ray_train import run_ray

    first, done = os.path.join(cfg.train.out, cfg.train.name, "metrics", "epoch-0001.json"), threading.Event()

    def ctrl_c() -> None:
        while not os.path.exists(first):
            if done.wait(0.2):
                return  # (ended some other way: no signal for the rest of the suite)
        os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    threading.Thread(target=ctrl_c, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt, match="Ray aborted the training run"):
            run_ray(cfg)
    finally:
        done.set()
    assert signal.getsignal(signal.SIGINT) is handler
    assert len(read_metrics(os.path.join(cfg.train.out, cfg.train.name))) < cfg.train.epochs


def test_a_snapshot_cut_short_by_a_killed_driver_does_not_block_the_resume(tmp_path):
    """Ray rewrites its checkpoint record at every report; a driver killed meanwhile leaves it cut
    short, and Ray (like a JSON reader) refuses it at every later start. It is dropped as a stale
    one is, saying so, and the run goes on from its latest.json. (No Ray started.)"""
    from mtl.checkpoint import CheckpointIndex
    from mtl.distributed.ray_train import drop_unreferenced_checkpoints
    from mtl.runs import RAY_SNAPSHOT

    run = tmp_path / "cut"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run / "checkpoints" / "epoch-0001" / "state.pt").write_bytes(b"x")
    CheckpointIndex(str(run)).commit("epoch-0001")
    (run / RAY_SNAPSHOT).write_text('{"checkpoint_results": [{"checkpoint_dir_name": "checkpoints/epo')
    said = []
    assert drop_unreferenced_checkpoints(str(run), said.append) == []
    assert not (run / RAY_SNAPSHOT).exists() and (run / "checkpoints" / "epoch-0001" / "state.pt").exists()
    assert said == [f"deleted Ray's checkpoint record {run}/{RAY_SNAPSHOT}: it cannot be read (cut short: its driver died "
                    f"while Ray wrote it); the run goes on from {run}/checkpoints/latest.json"]
    # cut short before the run's first pointer: Ray would refuse it all the same
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / RAY_SNAPSHOT).write_text("{")
    drop_unreferenced_checkpoints(str(fresh), said.append)
    assert not (fresh / RAY_SNAPSHOT).exists()


def test_too_few_resources_fails_fast_with_a_clear_message(ray_cluster, tiny_root, tmp_path):
    """A fixed cluster (no autoscaler config) that can never hold the group: an error at once,
    not a wait for --start-timeout-s (900 s by default)."""
    from mtl.distributed.capacity import InfeasibleCluster
    from mtl.distributed.ray_train import run_ray

    ray_cluster([1, 1])
    cfg = ray_cfg(str(tmp_path), "toobig", root=tiny_root, workers=3, start_timeout_s=900)
    t0 = time.time()
    with pytest.raises(InfeasibleCluster, match=r"can never hold 3 worker\(s\) x \{CPU: 1\}: nodes now: CPU 2, GPU 0.*"
                                                 r"a fixed cluster.*Lower --num-workers"):
        run_ray(cfg)
    assert time.time() - t0 < 30
    assert not (tmp_path / "toobig").exists()  # nothing written


def fake_instance_metadata(notice: str, after: int):
    """An EC2 instance metadata service (IMDSv2) on this machine whose spot/instance-action is
    ``notice`` from the ``after``-th look on (404 before, as EC2 answers until a reclaim; the
    first look gets a server error, which a watcher must survive)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    looks = []

    class Metadata(BaseHTTPRequestHandler):
        def do_PUT(self):  # noqa: N802
            ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            self._answer(200 if ok else 400, "token-1")

        def do_GET(self):  # noqa: N802
            if self.headers.get("X-aws-ec2-metadata-token") != "token-1":
                return self._answer(401, "")
            looks.append(self.path)
            ready = self.path == "/latest/meta-data/spot/instance-action" and len(looks) >= after
            self._answer(200 if ready else 500 if len(looks) == 1 else 404, notice if ready else "")

        def _answer(self, code: int, body: str) -> None:
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, looks


def test_a_spot_notice_brings_checkpoints_and_the_restart_loses_at_most_a_step(ray_cluster, tiny_root, tmp_path):
    """A spot reclaim end to end: the training worker's node gets EC2's interruption notice (a
    fake metadata service), which `cluster/spot_watch.py` turns into a Ray drain with the
    preemption reason and the notice's deadline. Ray Train's watcher passes it on; the next poll
    (every 2 steps here) writes a checkpoint, and so does every step after it; at the deadline
    Ray restarts the worker group on the other node, which resumes from the last of them: at
    most the step the teardown interrupted is lost."""
    import datetime

    from ray.util.state import list_actors

    from mtl.distributed.ray_train import run_ray
    from mtl.runs import run_url

    c = ray_cluster([1, 1])
    cfg = ray_cfg(str(tmp_path), "spot", root=tiny_root, epochs=1, steps=48, workers=1, max_failures=0)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=2, checkpoint_every=4, preemption_poll_every=2)).validate()
    holder = {}
    thread = threading.Thread(target=lambda: holder.update(result=run_ray(cfg)[0]))
    thread.start()
    log = tmp_path / "spot" / "train.log"
    deadline = time.time() + 240
    # the drain comes early in a 48-step epoch (batch 2) and the node goes 15 s later: the notice
    # has time for several checkpoints on a loaded machine (it arrived 2-6 s after the drain), and
    # the kill lands mid-epoch on a fast one (with 24 steps of batch 4 and a drain at step 8, the
    # epoch once ended first)
    while not (log.exists() and "step checkpoint epoch-0000-step-00000004" in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    assert log.exists() and "step checkpoint" in log.read_text(), "training never checkpointed"
    (worker,) = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name == "RayTrainWorker"]
    goes = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=17)
    server, looks = fake_instance_metadata(json.dumps({"action": "terminate", "time": goes.strftime("%Y-%m-%dT%H:%M:%SZ")}), after=3)
    watch = subprocess.run([sys.executable, "cluster/spot_watch.py", "--address", c.cluster.address, "--node-id", worker.node_id,
                            "--metadata-url", f"http://127.0.0.1:{server.server_port}", "--poll-s", "0.1"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    server.shutdown()
    assert watch.returncode == 0 and f"node {worker.node_id} drained" in watch.stdout, watch.stdout + watch.stderr
    assert len(looks) == 3 and "metadata not read (HTTP Error 500" in watch.stdout  # two looks found no notice
    thread.join(timeout=400)
    assert not thread.is_alive() and holder["result"].error is None
    text = log.read_text()
    assert "preemption notice at step" in text, text
    notice_step = int(text.split("preemption notice at step ")[1].split()[0])
    after = [int(line.split("-step-")[1].split()[0]) for line in text.split("resumed from ")[0].splitlines()
             if "step checkpoint" in line and "-step-" in line]  # the drained attempt's
    saved = [s for s in after if s >= notice_step]
    assert saved[0] == notice_step and saved == list(range(notice_step, notice_step + len(saved))) and len(saved) >= 2, saved
    # (a checkpoint at the notice's poll, and after every step from then on)
    resumed = text.split("resumed from ")[1].split(":")[0] if "resumed from " in text else ""
    assert "-step-" in resumed, text  # the restart went on from a step checkpoint ...
    resumed_step = int(resumed.split("-step-")[1].split("/")[0])
    # ... the last one: what the teardown cost is the step it interrupted. (That checkpoint's own
    # line may come after "resumed from": the drained worker, still finishing, writes it once its
    # commit is done, and the new attempt on the other node may read the pointer first.)
    assert resumed_step in (saved[-1], saved[-1] + 1) and f"step checkpoint epoch-0000-step-{resumed_step:08d}" in text, \
        (resumed_step, saved)
    metrics = read_metrics(run_url(cfg))
    assert [m["epoch"] for m in metrics] == [1] and metrics[-1]["restarts"] >= 1


_DS_AUTOCAST = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from mtl.config import DistConfig, ExperimentConfig, TrainConfig
from mtl.distributed.deepspeed_strategy import deepspeed_config, without_cpu_shm_op
without_cpu_shm_op()
cfg = ExperimentConfig(dist=DistConfig(strategy="deepspeed", zero_stage=1), train=TrainConfig(batch_size=2))
for autocast in (False, True):
    m = torch.nn.Linear(8, 8)
    engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(m.parameters()), config=deepspeed_config(cfg, autocast))
    print(autocast, engine(torch.randn(2, 8)).dtype)
m = torch.nn.Linear(8, 8)  # --optimizer sgd: not on ZeRO's list of tested optimizers
sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
engine, *_ = deepspeed.initialize(model=m, optimizer=sgd, config=deepspeed_config(cfg))
engine.backward(engine(torch.randn(2, 8)).sum())
engine.step()
print("sgd", engine.global_steps)
"""


def test_deepspeed_runs_its_forward_under_the_train_steps_autocast(free_port):
    """The train step's bf16 autocast (--bf16 on a GPU) must reach inside the DeepSpeed engine:
    without its config's torch_autocast section, DeepSpeed 0.19 turns autocast off in its forward
    and trains in fp32. The engine's own autocast follows DeepSpeed's device (the CPU here).
    Also: ZeRO takes --optimizer sgd (DeepSpeed asserts for an optimizer off its list unless told)."""
    r = subprocess.run([sys.executable, "-c", _DS_AUTOCAST, str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    printed = [ln for ln in r.stdout.splitlines() if ln.startswith(("False ", "True ", "sgd "))]  # (not DeepSpeed's logging)
    assert printed == ["False torch.float32", "True torch.bfloat16", "sgd 1"], r.stdout
