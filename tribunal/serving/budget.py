"""The thread budget: how many compute threads each model server gets, so that together
they do not ask for more cores than the machine gives this process.

Why it matters (measured on 2 cores, 2026-12-06, shared/FACTS.md): llama.cpp's CPU
backend computes with OpenMP, whose threads spin while they wait for work. Three worker
servers at ``-t 1`` beside a judge at ``-t 2`` are five busy-waiting threads on two cores:
the judge took 5.6 s a ticket at ``-t 2`` and 2.7 s at ``-t 1``, and Qwen-0.5B's prompt
processing fell from 74 to 26 tokens/s. Two things fix it: no more threads than cores
where the fleet can help it, and a passive OpenMP wait policy (``OMP_WAIT_POLICY=passive``,
OpenMP 5.2 §6.2; GNU libgomp reads ``GOMP_SPINCOUNT`` too), so a server that waits sleeps
instead of taking a core from one that computes.

The cores are what the process may run on (its CPU affinity, ``os.sched_getaffinity``)
capped by a cgroup CPU quota (a container's ``--cpus``: cgroup v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), as ``nproc`` and the JVM count them —
``os.cpu_count()`` counts the host's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Set in every model server's environment: waiting threads sleep instead of spinning.
PASSIVE_WAIT = {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "0"}

CGROUP = Path("/sys/fs/cgroup")


def available_cores(cgroup: Path = CGROUP) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (rounded
    up: a quota of 1.5 CPUs gives two threads room). At least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_quota(cgroup)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_quota(cgroup: Path = CGROUP) -> float | None:
    """CPUs allowed by the cgroup's quota (v2 ``cpu.max`` "QUOTA PERIOD", v1 the two cfs
    files; "max" or -1 means none), or None where there is none or it cannot be read."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


@dataclass(frozen=True)
class ThreadBudget:
    """Threads per server (``threads``, by model name), the cores they share, and which
    counts the fleet file set itself (``fixed``)."""

    threads: Mapping[str, int]
    cores: int
    fixed: frozenset[str]

    @property
    def total(self) -> int:
        return sum(self.threads.values())

    @property
    def oversubscribed(self) -> bool:
        return self.total > self.cores

    def describe(self) -> str:
        """One line for the start log: what each server got and why."""
        each = ", ".join(
            f"{name} {n}" + (" (fleet file)" if name in self.fixed else "")
            for name, n in self.threads.items()
        )
        line = (
            f"thread budget: {len(self.threads)} model servers on {self.cores} cores: {each} "
            f"(sum {self.total}); waiting threads sleep (OMP_WAIT_POLICY=passive)"
        )
        if not self.oversubscribed:
            return line
        if self.fixed:
            return f"{line}; the fleet file asks for more threads than cores: they compete"
        return f"{line}; more servers than cores: one thread each, they take turns"


def thread_budget(
    wanted: Mapping[str, int | None], sizes: Mapping[str, int], cores: int
) -> ThreadBudget:
    """Threads for each server: ``wanted[name]`` where the fleet file sets it, otherwise a
    share of the cores the fixed ones leave — one each, then one more at a time to the
    largest models first (``sizes``: bytes of weights; per item a bigger model computes
    more, so an extra core shortens its calls most). Never below 1, so with more servers
    than cores the sum exceeds the cores (``oversubscribed``) and the servers take turns."""
    fixed = {name: n for name, n in wanted.items() if n is not None}
    free = [name for name, n in wanted.items() if n is None]
    threads = {name: 1 for name in free}
    spare = cores - sum(fixed.values()) - len(free)
    by_size = sorted(free, key=lambda name: -sizes.get(name, 0))
    while spare > 0 and by_size:
        for name in by_size:
            if spare == 0:
                break
            threads[name] += 1
            spare -= 1
    return ThreadBudget(
        {name: fixed.get(name) or threads[name] for name in wanted}, cores, frozenset(fixed)
    )
