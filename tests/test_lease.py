"""One driver per run folder: a second driver of a live run is refused, a dead one's lease is
taken, and a driver whose lease was taken stops."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from mtl.lease import LEASE_FILE, LOST_EXIT, LeaseHeld, LeaseTiming, RunLease, hold
from mtl.machine import machine_id
from mtl.runs import RunFolder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = LeaseTiming(ttl_s=2.0)  # renewed every 0.5 s


def write_lease(folder, **fields) -> None:
    lease = {"holder": "other", "host": "node-7", "pid": 4242, "ray_job": None, "command": "python jobs/train.py",
             "started": "2026-11-30T00:00:00+0000", "beat": 0, "renewed": time.time(), **fields}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LEASE_FILE), "w") as fh:
        json.dump(lease, fh)


def test_a_driver_holds_renews_and_releases_its_lease(tmp_path):
    folder = str(tmp_path / "run")
    lease = RunLease(folder, timing=FAST, log=lambda m: None)
    lease.acquire()
    lease.start_renewing()
    first = json.loads((tmp_path / "run" / LEASE_FILE).read_text())
    assert (first["host"], first["pid"]) == (socket.gethostname(), os.getpid())
    assert RunFolder(folder).entries() == []  # (a run folder's listing leaves the lease out: still a new run)
    time.sleep(FAST.renew_s * 1.5)
    assert json.loads((tmp_path / "run" / LEASE_FILE).read_text())["beat"] > first["beat"]
    lease.release()
    assert not (tmp_path / "run").exists()  # (released; the folder it made for the lease, empty, removed)
    (tmp_path / "out").mkdir()  # ... and the folders above it that it made (a refused run's --out leaves none behind)
    with hold(str(tmp_path / "out/new/deeper/run"), log=lambda m: None, timing=FAST):
        assert (tmp_path / "out/new/deeper/run" / LEASE_FILE).exists()
    assert os.listdir(tmp_path / "out") == []
    (tmp_path / "out/kept").mkdir()
    with hold(str(tmp_path / "out/kept/run"), log=lambda m: None, timing=FAST):
        (tmp_path / "out/kept/run/config.json").write_text("{}")  # (a run that wrote something: its folder stays)
    assert os.listdir(tmp_path / "out/kept/run") == ["config.json"]


@pytest.mark.parametrize("raw", ["0", "abc", "inf", "nan", "3601"])
def test_a_lease_lifetime_no_watcher_would_wait_for_is_refused(monkeypatch, raw):
    """A watcher waits for a holder's renewals at most MAX_TTL_S: a holder with a longer lifetime
    (renewing every quarter of it) would lose its live lease to a second driver; an infinite one
    would not renew at all."""
    from mtl.lease import TTL_ENV

    monkeypatch.setenv(TTL_ENV, raw)
    with pytest.raises(ValueError, match=f"{TTL_ENV}='{raw}': give the lease's lifetime in seconds \\(> 0, at most 3600\\)"):
        LeaseTiming.from_env()
    monkeypatch.setenv(TTL_ENV, "3600")
    assert LeaseTiming.from_env().ttl_s == 3600


def test_a_live_drivers_lease_is_refused_naming_it(tmp_path):
    folder = str(tmp_path / "run")
    first = RunLease(folder, timing=FAST, log=lambda m: None)
    first.acquire()
    first.start_renewing()
    try:
        t0 = time.monotonic()
        with pytest.raises(LeaseHeld, match=rf"run folder {folder} is in use by process {os.getpid()} on host "
                                            rf"{socket.gethostname()}.*stop that one first"):
            RunLease(folder, timing=FAST, log=lambda m: None).acquire()
        assert time.monotonic() - t0 < FAST.ttl_s  # (refused at the first renewal seen, not after the lease's life)
    finally:
        first.release()


def test_a_killed_holder_its_parent_has_not_reaped_is_gone(tmp_path):
    """A zombie (killed, not waited for: a parent that never waits, a container whose PID 1 reaps
    nothing) still answers kill(pid, 0) and keeps its start time; it renews nothing: its lease is
    taken at once, not refused as a live holder's."""
    from mtl.machine import process_gone, process_start

    child = subprocess.Popen(["sleep", "60"])
    try:
        start = process_start(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        time.sleep(0.5)  # (not waited for: a zombie now)
        assert process_gone(child.pid) and process_start(child.pid) == start
        folder, said = str(tmp_path / "run"), []
        write_lease(folder, host=socket.gethostname(), machine=machine_id(), pid=child.pid, pid_start=start, ttl_s=600.0)
        lease = RunLease(folder, timing=LeaseTiming(ttl_s=600.0), log=said.append)
        lease.acquire()
        lease.release()
        assert "a process that is gone" in said[0]
    finally:
        child.wait()


def test_a_live_process_of_this_machine_is_refused_at_once_a_reused_pid_is_watched(tmp_path):
    """The holder's pid and start time name one process of the boot: alive, it is refused without
    waiting for a renewal; the same pid with another start time (reused) is watched as before."""
    from mtl.machine import process_start

    folder, said = str(tmp_path / "run"), []
    slow = LeaseTiming(ttl_s=600.0)  # (renewed every 150 s: only the start time can refuse it within the test)
    write_lease(folder, host=socket.gethostname(), machine=machine_id(), pid=os.getpid(), pid_start=process_start(os.getpid()),
                ttl_s=600.0)
    t0 = time.monotonic()
    with pytest.raises(LeaseHeld, match=rf"run folder {folder} is in use by process {os.getpid()} on host"):
        RunLease(folder, timing=slow, log=said.append).acquire()
    assert time.monotonic() - t0 < 5 and said == []
    write_lease(folder, host=socket.gethostname(), machine=machine_id(), pid=os.getpid(), pid_start=1, ttl_s=2.0, beat=0)
    lease = RunLease(folder, timing=FAST, log=said.append)
    lease.acquire()  # (not renewed for its ttl: taken)
    lease.release()
    assert "watching for up to 2 s" in said[0] and "not renewed for 2 s" in said[-1]


def test_a_ray_jobs_lease_names_the_job_and_how_to_stop_it(tmp_path):
    folder = str(tmp_path / "run")
    write_lease(folder, ray_job="raysubmit_abc", renewed=time.time())

    def renew():  # (its holder, alive on another node)
        for beat in range(1, 20):
            time.sleep(0.3)
            write_lease(folder, ray_job="raysubmit_abc", beat=beat)

    threading.Thread(target=renew, daemon=True).start()
    with pytest.raises(LeaseHeld, match=r"in use by Ray job raysubmit_abc \(`ray job stop raysubmit_abc` stops it\) "
                                        r"on host node-7"):
        RunLease(folder, timing=FAST, log=lambda m: None).acquire()


def test_a_lease_that_nobody_renews_is_taken(tmp_path):
    logs = []
    old = str(tmp_path / "old")
    write_lease(old, renewed=time.time() - 60)  # (its node was lost a minute ago)
    t0 = time.monotonic()
    RunLease(old, timing=FAST, log=logs.append).acquire()
    assert time.monotonic() - t0 < 1 and "not renewed for 60 s" in logs[-1]

    gone = str(tmp_path / "gone")  # (a process of this host that was killed)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lease(gone, host=socket.gethostname(), machine=machine_id(), pid=dead.pid)
    RunLease(gone, timing=FAST, log=logs.append).acquire()
    assert logs[-1].endswith("a process that is gone")
    other = str(tmp_path / "container")  # (the same host name, another process namespace: its pid says nothing here)
    write_lease(other, host=socket.gethostname(), machine="another-boot/pid:[1]", pid=dead.pid)
    RunLease(other, timing=FAST, log=logs.append).acquire()
    assert "watching" in logs[-2] and "not renewed for 2 s" in logs[-1]

    fresh = str(tmp_path / "fresh")  # (stamped just now by another host, then silent: judged by watching, not clocks)
    write_lease(fresh)
    t0 = time.monotonic()
    lease = RunLease(fresh, timing=FAST, log=logs.append)
    lease.acquire()
    assert FAST.ttl_s <= time.monotonic() - t0 < FAST.ttl_s + 1.5
    assert "watching" in logs[-2] and "not renewed for 2 s" in logs[-1]
    assert json.loads(open(os.path.join(fresh, LEASE_FILE)).read())["holder"] == lease.mine["holder"]


def test_two_drivers_starting_together_one_goes_on(tmp_path):
    folder = str(tmp_path / "run")
    barrier, outcome = threading.Barrier(2), {}

    def driver(i):
        lease = RunLease(folder, timing=FAST, log=lambda m: None)
        barrier.wait()
        try:
            lease.acquire()
            lease.start_renewing()
            outcome[i] = lease
        except LeaseHeld as e:
            outcome[i] = e

    threads = [threading.Thread(target=driver, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    held = [v for v in outcome.values() if isinstance(v, RunLease)]
    assert len(held) == 1 and sum(isinstance(v, LeaseHeld) for v in outcome.values()) == 1, outcome
    held[0].release()


def holding_process(folder: str) -> subprocess.Popen:
    """A driver process that holds ``folder``'s lease (renewed every 0.5 s) for 30 s, saying
    "cleanup ran" if its ``finally`` runs; returned once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom mtl.lease import LeaseTiming, hold\n"
                               f"with hold({folder!r}, timing=LeaseTiming(2.0)):\n    print('held', flush=True)\n"
                               "    try:\n        time.sleep(30)\n    finally:\n        print('cleanup ran', flush=True)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_driver_whose_lease_was_taken_stops_at_once(tmp_path):
    """It could not renew for a ttl (storage unreachable, the process paused) and another driver
    took the lease: it ends there, without writing anything more (no checkpoint on the way out)."""
    folder = str(tmp_path / "run")
    holder = holding_process(folder)
    write_lease(folder)  # (another driver took it)
    assert holder.wait(timeout=10) == LOST_EXIT
    out = holder.stdout.read()
    assert "error: this driver stopped: it could not renew its lease of run folder" in out and "process 4242 on host node-7" in out
    assert "cleanup ran" not in out  # (no finally block ran: nothing written beside the new holder)
    assert json.loads(open(os.path.join(folder, LEASE_FILE)).read())["holder"] == "other"  # (not deleted: not its own)


@pytest.mark.parametrize("storage", ["hangs", "fails"])
def test_a_driver_that_cannot_renew_ends_before_another_may_take_its_lease(tmp_path, storage):
    """Its storage stops answering (a request that hangs, with its retries) or keeps failing: the
    driver ends once its last renewal is 3/4 of a ttl old, before a watcher (who waits a whole
    ttl without a renewal) may take the lease. It used to train on, and commit beside the new
    holder, until a renewal got through."""
    folder = str(tmp_path / "run")
    broken = "time.sleep(3600)" if storage == "hangs" else "raise OSError('connection refused')"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nimport mtl.lease\nfrom mtl.lease import LeaseTiming, hold\n"
         f"with hold({folder!r}, timing=LeaseTiming(2.0)):\n"
         f"    def read(url):\n        {broken}\n"
         "    mtl.lease.read_bytes = read\n    t0 = time.monotonic()\n    print('held', flush=True)\n"
         "    try:\n        time.sleep(30)\n    finally:\n        print('cleanup ran', flush=True)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    assert holder.wait(timeout=20) == LOST_EXIT
    assert time.monotonic() - t0 < 2.0  # (a watcher starting with the holder's last renewal takes it after 2 s)
    out = holder.stdout.read()
    assert f"error: this driver stopped: it could not renew its lease of run folder {folder} for 2 s (" in out
    assert ("the storage did not answer for" if storage == "hangs" else "connection refused") in out
    assert "cleanup ran" not in out
    assert (storage == "hangs") == ("warning: could not renew" not in out)


def test_a_driver_whose_lease_file_is_gone_stops(tmp_path):
    """Gone while it held it: taken while this driver could not renew (paused) by one that has
    ended since, or its folder deleted. Renewing it afresh could train beside another driver."""
    folder = str(tmp_path / "run")
    holder = holding_process(folder)
    os.remove(os.path.join(folder, LEASE_FILE))
    assert holder.wait(timeout=10) == LOST_EXIT
    assert f"error: this driver stopped: its lease file {folder}/{LEASE_FILE} is gone" in holder.stdout.read()


def test_the_lease_on_s3(s3_prefix):
    folder = f"{s3_prefix}/run"
    with hold(folder, log=lambda m: None):
        assert RunFolder(folder).entries() == []
        with pytest.raises(LeaseHeld, match="in use by process"):
            RunLease(folder, timing=FAST, log=lambda m: None).acquire()  # (this one renews every 3 s: the suite's 12 s lease)
    assert RunFolder(s3_prefix).entries() == []


def test_a_second_train_driver_of_a_live_run_is_refused(tiny_root, tmp_path, capsys):
    """As a user meets it: `jobs/train.py` while another driver of the run is alive; once that
    one is gone (killed), the same command trains."""
    from jobs.train import main

    out, name = str(tmp_path / "runs"), "twice"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; from mtl.lease import hold\n"
                               "sys.argv = ['jobs/train.py', '--name', '[/]']  # (what rich would take for markup)\n"
                               f"with hold({out + '/' + name!r}):\n    print('held', flush=True); time.sleep(120)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert holder.stdout.readline().strip() == "held"
    train = ["--local", "--arch", "branched", "--encoder", "resnet18", "--root", tiny_root, "--epochs", "1",
             "--batch-size", "8", "--max-steps-per-epoch", "1", "--workers", "0", "--out", out, "--name", name]
    assert main(train) == 2
    err = capsys.readouterr().err
    assert f"error: run folder {out}/{name} is in use by process {holder.pid} on host {socket.gethostname()}" in err, err
    assert err.strip().endswith("jobs/train.py --name [/]. One driver per run: stop that one first, or wait for it to end")
    assert not os.path.exists(f"{out}/{name}/config.json")  # (it wrote nothing)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert main(train) == 0
    assert f"taking the lease of process {holder.pid}" in capsys.readouterr().out
    assert LEASE_FILE not in os.listdir(f"{out}/{name}")


def test_on_s3_every_lease_write_is_a_compare_and_swap(s3_prefix):
    """S3's conditional writes close what a read-back cannot: two drivers that both found no
    lease cannot both write theirs, and a renewal (or a release) held up until another driver
    has taken the lease (a stalled request) is refused instead of landing over it (or deleting
    it); its driver then finds the lease lost."""
    from mtl.storage import WriteConflict, read_tagged, write_if

    url = f"{s3_prefix}/cas/{LEASE_FILE}"
    tag = write_if(url, b"one", None)
    assert read_tagged(url) == (b"one", tag)
    with pytest.raises(WriteConflict, match="another writer created it first"):
        write_if(url, b"two", None)
    newer = write_if(url, b"three", tag)
    with pytest.raises(WriteConflict, match="another writer replaced it first"):
        write_if(url, b"four", tag)  # (the version it was read as is gone)
    assert read_tagged(url) == (b"three", newer)

    folder = f"{s3_prefix}/run"
    a, b = (RunLease(folder, timing=FAST, log=lambda m: None) for _ in range(2))
    assert a.conditional and a.read() is None and b.read() is None  # both found no lease ...
    assert a._write(started=True) and not b._write(started=True)  # ... only the first write lands
    assert a.read()["holder"] == a.mine["holder"]  # (a's renewal reads its own lease here ...)
    c = RunLease(folder, timing=FAST, log=lambda m: None)
    c.read()
    assert c._write(started=True)  # (... and another driver takes it over before a's write lands)
    assert not a._write()  # the held-up renewal is refused
    a._delete()  # and so is a release held up the same way (a read its own lease before c took it)
    assert json.loads(read_tagged(f"{folder}/{LEASE_FILE}")[0])["holder"] == c.mine["holder"]
    assert f"and process {os.getpid()} on host" in a._renew()  # a finds it lost (and would end)
    c.release()
    assert read_tagged(f"{folder}/{LEASE_FILE}") == (None, None)  # (its own: deleted)


@pytest.mark.parametrize("refusal", ["refuses its own ETags", "does not take the conditions"])
def test_an_s3_endpoint_without_conditional_writes_gets_the_lease_written_without_them(s3_prefix, monkeypatch, refusal):
    """An endpoint that answers NotImplemented, or refuses a conditional write over the very
    version it holds, would otherwise make every start fail or loop: the lease is then written
    as on a local disk (read back after a settle), and the driver says so once."""
    import mtl.lease

    def write_if(url, data, etag):
        if refusal == "does not take the conditions":
            raise NotImplementedError(f"{url}: the endpoint does not take conditional writes (NotImplemented)")
        raise mtl.lease.WriteConflict("refused")

    monkeypatch.setattr(mtl.lease, "write_if", write_if)
    lines = []
    folder = f"{s3_prefix}/run-{refusal.split()[0]}"
    with hold(folder, log=lines.append, timing=FAST) as lease:
        assert not lease.conditional and RunLease(folder, timing=FAST).read()["holder"] == lease.mine["holder"]
    assert [ln for ln in lines if "written without conditions from now on" in ln] == [lines[0]], lines
