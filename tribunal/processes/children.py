"""The child processes a supervisor runs (fleet members, model servers, valkey): started in a
session of their own with a parent-death signal, stopped together, restarted with backoff,
and sent their hard stop when this process exits without stopping them."""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.backoff import ExponentialBackoff

from common.lifecycle import before_hard_exit

log = logging.getLogger(__name__)

_children: list[tuple[subprocess.Popen[bytes], signal.Signals]] = []


# The supervisors' backoff (redis-py's, as for Redis outages): 1, 2, 4 … 30 s.
RESTART_BACKOFF = ExponentialBackoff(cap=30.0, base=1.0)
STABLE_S = 60.0  # a process up this long is well again: its restart backoff starts over


@dataclass
class Restarts:
    """When to restart a supervised process that died: after 1, 2, 4 … 30 s (monotonic)."""

    count: int = 0
    at: float = 0.0  # when the planned restart is due; 0.0: none planned
    started_at: float = 0.0  # monotonic: when the process was last started

    def started(self) -> None:
        """The process was (re)started now."""
        self.started_at = time.monotonic()

    def running(self) -> None:
        """Called each supervision round while the process is alive: once it has run for
        ``STABLE_S``, its crashes are forgotten and the next one restarts it at once."""
        if self.count and time.monotonic() - self.started_at > STABLE_S:
            self.count = 0

    def plan(self) -> float:
        """Plan the next restart; returns its delay in seconds."""
        delay = RESTART_BACKOFF.compute(self.count)
        self.at = time.monotonic() + delay
        return delay

    def after_exit(self, what: Callable[[], str]) -> bool:
        """Called each supervision round while the process is dead: the first time, plans
        its restart and logs ``what()`` happened with the delay; True once it is due."""
        if self.at == 0.0:
            log.warning("%s; restarting in %.0fs", what(), self.plan())
            return False
        return self.due()

    def cancel(self) -> None:
        """Drop the planned restart (the process was started again by other means)."""
        self.at = 0.0

    def due(self) -> bool:
        """True once the planned restart's time has come (and counts it)."""
        if self.at == 0.0 or time.monotonic() < self.at:
            return False
        self.count, self.at = self.count + 1, 0.0
        return True


def start_child(
    argv: list[str], hard_stop: signal.Signals = signal.SIGKILL, **options: Any
) -> subprocess.Popen[bytes]:
    """Start a process this one supervises (a fleet member, a model server, valkey).

    In a session of its own: a terminal's Ctrl-C is a SIGINT to its whole foreground
    process group, so a child in that group would start stopping on its own, take the
    supervisor's SIGTERM that follows for a second signal and exit mid-batch (and a
    server would go away under the consumers still finishing theirs). Only the supervisor
    gets the terminal's signals and stops its children once, in order. Since they no
    longer get them, whenever this process exits without stopping them (a second signal,
    an exception, ``sys.exit``) each child still running is sent ``hard_stop``.

    When this process cannot stop them (SIGKILL, the OOM killer), the kernel sends each
    child SIGTERM (Linux's parent-death signal, ``prctl(2)`` PR_SET_PDEATHSIG): a consumer
    finishes its batch, valkey flushes its append-only file and releases the data directory,
    instead of living on unsupervised and keeping the next start out.
    """
    process: subprocess.Popen[bytes] = subprocess.Popen(
        argv, start_new_session=True, preexec_fn=_parent_death_signal(), **options
    )
    _children[:] = [(p, sig) for p, sig in _children if p.returncode is None]
    _children.append((process, hard_stop))
    return process


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks for SIGTERM when this process dies; None off Linux, and
    off the main thread: the signal follows the *thread* that forked, and only the main
    thread lives as long as the process."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    parent = os.getpid()

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the request: nobody would stop us
            os._exit(1)

    return in_child


def stop_processes(
    processes: Sequence[tuple[str, subprocess.Popen[bytes]]], timeout_s: float
) -> dict[str, int]:
    """Stop supervised processes together: SIGTERM to each still running (a consumer finishes
    its batch, a server its requests), then SIGKILL whoever is left ``timeout_s`` later.
    Returns each one's exit code by name."""
    running = [(name, p) for name, p in processes if p.poll() is None]
    for _, process in running:
        process.terminate()
    deadline = time.monotonic() + timeout_s
    codes: dict[str, int] = {}
    for name, process in running:
        try:
            codes[name] = process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs: killing it", name, timeout_s)
            process.kill()
            codes[name] = process.wait()
    return codes


@atexit.register
def stop_children() -> None:
    """Send each child still running its ``hard_stop`` (without waiting: called on exit)."""
    for process, sig in _children:
        try:
            if process.poll() is None:
                process.send_signal(sig)
        except OSError:
            pass


before_hard_exit(stop_children)
