"""The thread budget: how many compute threads each model server gets, and how they wait.

Why it matters (shared/FACTS.md, 2026-12-06, 2 cores): llama.cpp's CPU backend computes
with OpenMP, whose threads spin while they wait for work — between requests and at every
barrier inside one. Three worker servers at ``-t 1`` beside a judge at ``-t 2`` were five
spinning threads on two cores: the judge took 5.6 s a ticket at ``-t 2`` and 2.7 s at
``-t 1``. With a passive wait policy (``OMP_WAIT_POLICY=passive``, OpenMP 5.2 §6.2; GNU
libgomp also reads ``GOMP_SPINCOUNT``) a waiting thread sleeps and gives its core to a
server that computes, and then more threads than cores cost nothing: Qwen-0.5B at ``-t 2``
on a machine at load 6 processed 74 prompt tokens/s, against 68 at ``-t 1`` (26 at ``-t 2``
spinning).

So every server gets as many threads as the machine gives this process — each can use
every core while the others wait, as the judge does when it works through the escalations
of a burst after the workers are done — and all of them wait passively. Measured with
``bench/models.py --items 40`` on the local fleet (2026-12-06, one run each, back to
back): one thread per server 0.73 items/s, 78% of what the cores could do for that model
work; two per server 0.92 items/s, 95%, at the same CPU seconds per item.

The cores are what the process may run on (its CPU affinity, ``os.sched_getaffinity``)
capped by a cgroup CPU quota (a container's ``--cpus``, a systemd unit's ``CPUQuota``:
cgroup v2 ``cpu.max`` of this process's cgroup and of the root, v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``), as the JVM counts them —
llama-server's own default counts the host's cores, 32 threads in a 2-CPU container on
a 64-core host. A fleet file's ``threads`` overrides the count for its model.
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


def available_cores(cgroup: Path | None = None) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (rounded
    up: a quota of 1.5 CPUs gives two threads room) — of ``cgroup``, by default the
    process's own cgroup v2 directory and the mounted root (a container's). At least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    for directory in [cgroup] if cgroup is not None else _own_cgroups():
        quota = cgroup_quota(directory)
        if quota is not None:
            cores = min(cores, math.ceil(quota))
    return max(1, cores)


def _own_cgroups() -> list[Path]:
    """This process's cgroup v2 directory (from /proc/self/cgroup: "0::/PATH") and the root."""
    try:
        line = next(
            row
            for row in Path("/proc/self/cgroup").read_text().splitlines()
            if row.startswith("0::")
        )
    except (OSError, StopIteration):
        return [CGROUP]
    own = CGROUP / line[3:].lstrip("/")
    return [own, CGROUP] if own != CGROUP else [CGROUP]


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
    def oversubscribed(self) -> list[str]:
        """Servers given more threads than there are cores: their own threads compete."""
        return [name for name, n in self.threads.items() if n > self.cores]

    def describe(self) -> str:
        """One line for the start log: what each server got and why."""
        each = ", ".join(
            f"{name} {n}" + (" (fleet file)" if name in self.fixed else "")
            for name, n in self.threads.items()
        )
        line = (
            f"thread budget: {len(self.threads)} model server(s) on {self.cores} cores, threads "
            f"{each}; a server may use every core while the others wait, and waiting "
            "threads sleep (OMP_WAIT_POLICY=passive)"
        )
        if self.oversubscribed:
            names = ", ".join(self.oversubscribed)
            line += f"; the fleet file gives {names} more threads than cores: they compete"
        return line


def thread_budget(wanted: Mapping[str, int | None], cores: int) -> ThreadBudget:
    """Threads for each server: ``wanted[name]`` where the fleet file sets it, else
    ``cores`` (see the module's docstring for why every server gets every core)."""
    fixed = frozenset(name for name, n in wanted.items() if n is not None)
    return ThreadBudget({name: n or cores for name, n in wanted.items()}, cores, fixed)
