"""Facts of the machine this process runs on, for the defaults that depend on them."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a cgroup or ``taskset`` limit, a Slurm or
    Ray allotment), not the machine's: one worker process per CPU of the machine on a 4-CPU
    allotment would fight over 4 CPUs and multiply the memory."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_workers(workers: int | None) -> None:
    """ValueError for a negative ``--workers`` (a count of worker processes): it was taken as
    one worker, silently (0 or None: the default, from the usable CPUs)."""
    if workers is not None and workers < 0:
        raise ValueError(f"--workers must be 0 (one per usable CPU) or more, got {workers}")


#: what installs Ray (and the rest of the distributed layer) beside the core
CLUSTER_INSTALL = "pip install -e '.[cluster]' -c constraints.txt"


def check_ray(what: str) -> None:
    """``what`` (training without --local, a sweep) runs on Ray, which the core install leaves
    out: said at once, naming the install, instead of Ray's import traceback."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ValueError(f"{what} runs on Ray, which is not installed here: {CLUSTER_INSTALL} installs it")


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers end with this process (data prep: sharding, conversion, the
    synthetic set): a parent killed (SIGKILL, an out-of-memory kill) would otherwise leave them
    writing on, beside a rerun that writes the same files."""
    return ProcessPoolExecutor(workers, initializer=_end_with_parent, initargs=(os.getpid(),))


def _end_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process when its parent ends (``prctl(PR_SET_PDEATHSIG)``),
    where the pool's process is its parent (fork, spawn; a fork server's workers are the
    server's children); elsewhere nothing is done. A parent that ended before this call left
    the pool's queue closed: the worker ends on it."""
    if os.getppid() != parent:
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # (1: PR_SET_PDEATHSIG)
    except (OSError, AttributeError):
        pass


def machine_id() -> str:
    """This machine's boot and process namespace: two containers may share a host name (host
    networking) but not their processes, and a rebooted host keeps its name but no process."""
    parts = []
    for path, read in (("/proc/sys/kernel/random/boot_id", _read_text), ("/proc/self/ns/pid", os.readlink)):
        try:
            parts.append(read(path))
        except OSError:
            parts.append("?")  # (not Linux: the host name alone decides)
    return "/".join(parts)


def machine_token() -> str:
    """Host name and `machine_id` as 8 hex digits: short enough for a file name."""
    return hashlib.sha256(f"{socket.gethostname()}/{machine_id()}".encode()).hexdigest()[:8]


def _read_text(path: str) -> str:
    with open(path) as fh:
        return fh.read().strip()


def knows_its_processes() -> bool:
    """Whether this machine can be told from another that shares its host name (`machine_id`
    read whole) and `process_gone` can ask after a process (POSIX: on Windows ``os.kill`` would
    end it)."""
    return os.name == "posix" and "?" not in machine_id().split("/")


def process_gone(pid: Any) -> bool:
    """Whether process ``pid`` of this machine has ended (False when that is not known: another
    user's process, or not a pid). A killed process its parent has not reaped yet (a zombie) has
    ended: it runs nothing and renews nothing."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, TypeError, ValueError, OverflowError):
        return False
    stat = _proc_stat(pid)
    return stat is not None and stat[0] in ("Z", "X")


def process_start(pid: Any) -> int | None:
    """When process ``pid`` of this machine started, in clock ticks since boot (``/proc/<pid>/stat``):
    with the pid it names one process of the boot (pids are reused, start times not). None where
    that is not known (no /proc, no such process, not a pid)."""
    stat = _proc_stat(pid)
    try:
        return int(stat[19]) if stat is not None else None  # (field 22: the start time)
    except (ValueError, IndexError):
        return None


def _proc_stat(pid: Any) -> list[str] | None:
    """``/proc/<pid>/stat``'s fields from the third (the state) on: the name before them, in
    parentheses, may hold spaces. None where there is no such file."""
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError, ValueError, OverflowError, IndexError):
        return None
