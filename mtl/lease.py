"""One driver per run folder (or sweep folder): a lease file its driver renews while it runs.

Why: closing the terminal of ``ray job submit`` leaves the job running, and a second
submission of the same run with ``--resume`` (or a second local run, or a second sweep driver)
would train the same folder beside it: both write checkpoints and metrics, each moves
``latest.json`` to its own, and their lineages interleave. Nothing refuses that without a lease.

``<folder>/driver.lease`` (JSON; not named ``*.json``: Tune copies a sweep folder's JSON files
down at a resume and uploads them again, old, at every sync) names its holder (host, machine,
process, Ray job, command), its ``ttl`` and a counter the holder's thread raises every
``ttl/4`` seconds. Another driver starting there:

* finds no lease, or one whose holder was a process of this machine that is gone (killed, out
  of memory; the same host name, boot and process namespace), or one last renewed over
  ``STALE_TTLS`` ttls ago by this host's clock (a node lost long ago: cloud hosts' clocks differ
  by seconds, not by that): takes it, and says so;
* finds one whose holder is a live process of this machine, the very one (its pid and start
  time: a reused pid starts later): refused at once (`LeaseHeld`);
* else watches it for up to ``ttl``: renewed meanwhile, its holder is alive and the start is
  refused (`LeaseHeld`, naming the holder and how to stop it); not renewed, its holder died with
  its node, and the lease is taken. Liveness is judged by watching, not by comparing clocks.

On S3 every write of the lease is a compare-and-swap (`mtl.storage.write_if`): created only if
there is none, replaced only if it is still the version this driver last read or wrote. So two
drivers that both found no lease (or the same dead one) cannot both write theirs, and a renewal
held up past a takeover (a stalled request, retries) is refused instead of landing over the new
holder's lease. Elsewhere (local disks; an S3 endpoint that does not take the conditions, which
is then said once) two drivers starting in the same second could both write the file, so a new
holder also reads it back after a short settle and only the last writer goes on (a start whose
write lands later than that is not caught there). The holder deletes the file when it ends (on
S3 only if it is still the version it wrote).

A holder that finds its lease taken (it could not renew for ``ttl``: the process paused), or
gone (taken by a driver that has ended since), ends its process at once (exit status
`LOST_EXIT`), without a checkpoint or any other write beside the new holder. So does one whose
last renewal is ``HOLD_TTLS`` ttls old (storage unreachable, a request that hangs, the machine
suspended): it ends before any watcher, who waits a whole ttl without a renewal, may take the
lease, instead of training on beside the new holder until a renewal gets through.

The times come from ``STREETMTL_LEASE_TTL_S`` (default 120 s; the tests use less).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mtl.machine import machine_id, process_gone, process_start
from mtl.storage import (WriteConflict, delete_if, has_conditional_writes, is_local, is_object_store, json_bytes, read_bytes,
                         read_tagged, storage_errors, url_to_fs, write_bytes_atomic, write_if)

LEASE_FILE = "driver.lease"
STALE_TTLS = 10  # (a lease older than this many ttls by this host's clock is taken without watching)
HOLD_TTLS = 0.75  # (a holder whose last renewal began this many ttls ago ends: a watcher takes it after 1)
TICK_S = 1.0  # (how often the holder looks at its clock, at the most: after a pause it ends within this)
LOST_EXIT = 3  # (the exit status of a driver whose lease another driver took)
TTL_ENV = "STREETMTL_LEASE_TTL_S"
DEFAULT_TTL_S = 120.0
MAX_TTL_S = 3600.0  # (what a lease file may ask another driver to wait, at most)
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # (set by Ray in a submitted job's driver: its metadata names the job)


class LeaseHeld(ValueError):
    """Another driver that is alive holds the folder's lease."""


@dataclass(frozen=True)
class LeaseTiming:
    ttl_s: float = DEFAULT_TTL_S

    @property
    def renew_s(self) -> float:
        return self.ttl_s / 4

    @property
    def hold_s(self) -> float:
        return self.ttl_s * HOLD_TTLS

    @property
    def settle_s(self) -> float:
        return self.ttl_s / 120  # (1 s at the default: long against two writes racing, short against a start)

    @classmethod
    def from_env(cls) -> LeaseTiming:
        raw = os.environ.get(TTL_ENV)
        if raw is None:
            return cls()
        try:
            ttl = float(raw)
        except ValueError:
            ttl = -1.0
        if not 0 < ttl <= MAX_TTL_S:  # (a watcher waits no longer for any holder: a longer one would lose its lease)
            raise ValueError(f"{TTL_ENV}={raw!r}: give the lease's lifetime in seconds (> 0, at most {MAX_TTL_S:g})")
        return cls(ttl)


def _clock() -> float:
    """Seconds on a clock that goes on while the machine is suspended (the monotonic clock
    stops then, while a watcher elsewhere counts the ttl)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


def _missing_folders(folder: str) -> list[str]:
    """The local folders from ``folder`` up that do not exist yet, deepest first (none on an
    object store, where folders are only prefixes)."""
    if not is_local(folder):
        return []
    out, path = [], os.path.abspath(folder.removeprefix("file://"))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        out.append(path)
        path = os.path.dirname(path)
    return out


def ray_job_id() -> str | None:
    """The submission id of the Ray job this process is the driver of, else None."""
    try:
        return json.loads(os.environ[RAY_JOB_ENV])["metadata"]["job_submission_id"]
    except (KeyError, TypeError, ValueError):
        return None


def _positive(v: Any, default: float) -> float:
    """``v`` as a positive float (a lease file's number), else ``default``."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return f if f > 0 and f == f else default


def describe(lease: dict[str, Any]) -> str:
    """Who holds ``lease``, and how to stop it."""
    job = lease.get("ray_job")
    who = f"Ray job {job} (`ray job stop {job}` stops it)" if job else f"process {lease.get('pid')}"
    return f"{who} on host {lease.get('host')}, started {lease.get('started')}: {lease.get('command', '')}"


class RunLease:
    """The lease of ``folder_url`` (``what``: "run" or "sweep", for messages). `hold` takes it
    for a ``with`` block."""

    def __init__(self, folder_url: str, what: str = "run", timing: LeaseTiming | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.folder, self.what, self.log = folder_url.rstrip("/"), what, log
        self.url = f"{self.folder}/{LEASE_FILE}"
        self.timing = timing or LeaseTiming.from_env()
        self.mine: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.conditional = has_conditional_writes(self.url)  # (writes are compare-and-swaps)
        self._etag: str | None = None  # the lease's version as last read or written (conditional stores)
        self._made: list[str] = []  # the local folders the lease's write makes (`_missing_folders`)

    def read(self) -> dict[str, Any] | None:
        if self.conditional:
            data, self._etag = read_tagged(self.url)
        else:
            data = read_bytes(self.url)
        if data is None:
            return None
        try:
            lease = json.loads(data)
        except ValueError:
            return {}  # (a torn or foreign file: nobody renews it, so it expires)
        return lease if isinstance(lease, dict) else {}

    def acquire(self) -> None:
        """Take the lease (see the module docstring), or raise `LeaseHeld`."""
        self._made = _missing_folders(self.folder)  # (the lease's write makes them: its release removes them, when empty)
        dead = None  # the holder judged dead after the read-back below: its lease is taken without watching again
        while True:
            held = self.read()
            if held is not None and held.get("holder") not in (self.mine.get("holder"), dead) and not self._wait_out(held):
                continue  # (released, or taken by a third driver, meanwhile: read again)
            if not self._write(started=True):
                continue  # (another driver's write came first)
            time.sleep(self.timing.settle_s)
            now = self.read()
            if now is not None and now.get("holder") == self.mine["holder"]:
                return
            if now is not None and self._wait_out(now):  # (another driver wrote it after this one: refused while it lives)
                dead = now.get("holder")

    def _wait_out(self, held: dict[str, Any]) -> bool:
        """True once ``held`` may be taken (as last read: `_write` replaces that version), False
        when it was released or replaced meanwhile; raises `LeaseHeld` while its holder is alive."""
        t = LeaseTiming(min(_positive(held.get("ttl_s"), self.timing.ttl_s), MAX_TTL_S))  # (the holder's: its pace)
        age = time.time() - _positive(held.get("renewed"), 0.0)
        if age > STALE_TTLS * t.ttl_s:
            self.log(f"{self.what} folder {self.folder}: taking the lease of {describe(held)}, not renewed for {age:.0f} s")
            return True
        here = held.get("host") == socket.gethostname() and held.get("machine") == machine_id()
        if here and process_gone(held.get("pid")):
            self.log(f"{self.what} folder {self.folder}: taking the lease of {describe(held)}, a process that is gone")
            return True
        if here and held.get("pid_start") is not None and process_start(held.get("pid")) == held.get("pid_start"):
            raise LeaseHeld(self._in_use(held))  # (that very process, alive: no renewal to wait for)
        self.log(f"{self.what} folder {self.folder} is leased to {describe(held)}; watching for up to {t.ttl_s:.0f} s "
                 f"whether it is alive")
        deadline = time.monotonic() + t.ttl_s
        while time.monotonic() < deadline:
            time.sleep(min(t.renew_s / 2, max(0.0, deadline - time.monotonic())))
            now = self.read()
            if now is None or now.get("holder") != held.get("holder"):
                return False
            if now.get("beat") != held.get("beat"):
                raise LeaseHeld(self._in_use(now))
        self.log(f"{self.what} folder {self.folder}: taking the lease of {describe(held)}, not renewed for {t.ttl_s:.0f} s")
        return True

    def _in_use(self, held: dict[str, Any]) -> str:
        return (f"{self.what} folder {self.folder} is in use by {describe(held)}. One driver per {self.what}: stop that one "
                f"first, or wait for it to end")

    def _write(self, started: bool = False) -> bool:
        """Write this driver's lease (a new one when ``started``, else the next renewal); on a
        conditional store only over the version last read (or none); False when another
        driver's write came first."""
        if started:
            self.mine = {"holder": uuid.uuid4().hex, "host": socket.gethostname(), "machine": machine_id(), "pid": os.getpid(),
                         "pid_start": process_start(os.getpid()),
                         "ray_job": ray_job_id(), "command": " ".join(sys.argv)[:300],
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ttl_s": self.timing.ttl_s, "beat": 0}
        else:
            self.mine["beat"] += 1
        self.mine["renewed"] = time.time()
        data = json_bytes(self.mine)
        if self.conditional:
            expected = self._etag
            try:
                self._etag = write_if(self.url, data, expected)
                return True
            except WriteConflict:
                if read_tagged(self.url)[1] != expected:
                    return False  # (another driver's write)
                # the version it was read as is still there: the endpoint refuses its own ETags
                self._without_conditions("the endpoint refused a conditional write over the version it holds")
            except NotImplementedError as e:
                self._without_conditions(str(e))
        write_bytes_atomic(self.url, data)
        return True

    def _without_conditions(self, why: str) -> None:
        self.conditional = False
        self.log(f"note: {why}; the lease of {self.what} folder {self.folder} is written without conditions from now on "
                 f"(a start race of drivers is then caught by reading it back)")

    def _renew(self) -> str | None:
        """One renewal; None, or why the lease is lost: another driver took it, or the file is
        gone. A holder never finds its lease gone unless it was taken (while this one could not
        renew) by a driver that has since ended, or the folder was deleted: either way, going
        on could train beside another driver."""
        now = self.read()
        if self._stop.is_set():  # (a read that hung past the release: no write after it, which would put the lease back)
            return None
        if now is not None and now.get("holder") == self.mine["holder"]:
            if self._write():
                return None
            now = self.read()  # (refused: another driver wrote it since it was read; or this one's own write landed twice)
            if now is not None and now.get("holder") == self.mine["holder"]:
                return None
        if now is None:
            return (f"its lease file {self.url} is gone: a driver that took the lease while this one could not renew it has "
                    f"ended, or the folder was deleted")
        return (f"it could not renew its lease of {self.what} folder {self.folder} for {self.timing.ttl_s:.0f} s, and "
                f"{describe(now)} took it")

    def _renew_loop(self) -> None:
        """A renewal every ``renew_s``, each on a thread of its own: one that hangs (a stalled
        request and its retries) or keeps failing cannot keep this driver going past ``hold_s``
        from the start of its last renewal, when it ends (`_lost`), before a watcher may take the
        lease. Storage hiccups meanwhile are said once and renewed past."""
        t, renewed, failing = self.timing, _clock(), None
        due = renewed + t.renew_s
        while not self._stop.wait(min(TICK_S, t.renew_s / 4)):
            now = _clock()
            if now >= due:
                outcome = self._attempt(renewed + t.hold_s - now)
                if isinstance(outcome, str):
                    self._lost(outcome)
                    return
                if outcome is None:
                    renewed, due, failing = now, now + t.renew_s, None
                else:
                    if failing is None and not isinstance(outcome, TimeoutError):  # (that one ends it, below)
                        self.log(f"warning: could not renew the lease of {self.what} folder {self.folder}: {outcome}")
                    failing, due = outcome, _clock() + t.renew_s / 4
            if _clock() - renewed >= t.hold_s and not self._stop.is_set():  # (not while it is released)
                self._lost(self._unrenewed(failing or TimeoutError("its clock jumped: the process or machine was paused")))
                return

    def _attempt(self, timeout: float) -> str | Exception | None:
        """One `_renew`, waited for up to ``timeout`` s: None (renewed), why the lease is lost, or
        its error (TimeoutError when it did not end in time: the loop then ends the process)."""
        box: list[str | Exception | None] = []

        def renew() -> None:
            try:
                box.append(self._renew())
            except Exception as e:  # noqa: BLE001 - storage hiccups: renewed past until ``hold_s``
                box.append(e)

        worker = threading.Thread(target=renew, name="streetmtl-lease-renewal", daemon=True)
        worker.start()
        worker.join(max(timeout, 0.0))
        return box[0] if box else TimeoutError(f"the storage did not answer for {max(timeout, 0.0):.0f} s")

    def _unrenewed(self, why: Exception) -> str:
        return (f"it could not renew its lease of {self.what} folder {self.folder} for {self.timing.hold_s:.0f} s ({why}); "
                f"it ends before another driver may take the lease (after {self.timing.ttl_s:.0f} s without a renewal): "
                f"the same command with --resume continues")

    def _lost(self, why: str) -> None:
        """The lease is lost (`_renew`): end this process now. Not an exception in the main
        thread: Ray Train's and Tune's SIGINT handlers would end in a normal exit, and local
        mode's would write a checkpoint on the way out, beside the new holder."""
        self.log(f"error: this driver stopped: {why}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(LOST_EXIT)

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="streetmtl-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease (when it is still this driver's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.mine:
            return
        try:
            now = self.read()
            if now is not None and now.get("holder") == self.mine["holder"]:
                self._delete()
        except Exception as e:  # noqa: BLE001 - the driver's own error matters more; the lease expires
            self.log(f"warning: could not release the lease of {self.what} folder {self.folder}: {e}")

    def _delete(self) -> None:
        """Delete the lease as last read (this driver's): on S3 only if it is still that version,
        so a delete held up past a takeover cannot remove the new holder's lease (which would then
        find it gone and stop)."""
        if self.conditional and self._etag:
            try:
                delete_if(self.url, self._etag)
                return
            except WriteConflict:
                self.log(f"the lease of {self.what} folder {self.folder} was taken meanwhile: left to its new holder")
                return
            except NotImplementedError:
                pass  # (the endpoint takes no condition: deleted as elsewhere)
        with storage_errors(self.url):
            fs, path = url_to_fs(self.url)
            fs.rm(path)
            if not is_object_store(fs):  # (made for the lease by a run that stopped before writing anything)
                for folder in self._made:
                    if fs.exists(folder) and fs.ls(folder):
                        break
                    with contextlib.suppress(FileNotFoundError):
                        fs.rmdir(folder)


@contextmanager
def hold(folder_url: str, what: str = "run", log: Callable[[str], None] = print,
         timing: LeaseTiming | None = None) -> Iterator[RunLease]:
    """The lease of ``folder_url`` for the ``with`` block: taken, renewed, released (a driver
    whose lease another one took ends at once, `RunLease._lost`)."""
    lease = RunLease(folder_url, what, timing, log)
    lease.acquire()
    lease.start_renewing()
    try:
        yield lease
    finally:
        lease.release()
