"""Facts of the machine this process runs on, for the defaults that depend on them."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a cgroup or ``taskset`` limit, a Slurm or
    Ray allotment), not the machine's: one worker process per CPU of the machine on a 4-CPU
    allotment would fight over 4 CPUs and multiply the memory."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
