"""Signals and logging shared by every long-running command. (The child processes a
supervisor runs are tribunal.processes': no stage starts any.)"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)

# Called before a hard exit (os._exit skips atexit): tribunal.processes registers the one
# that sends supervised children their hard stop.
_before_hard_exit: list[Callable[[], None]] = []


def before_hard_exit(callback: Callable[[], None]) -> None:
    """Run ``callback`` when a second signal (or a stop past its grace) exits at once."""
    _before_hard_exit.append(callback)


class StopFlag:
    """First SIGTERM/SIGINT/SIGHUP asks the loop to finish its batch and exit; a second
    signal, or a batch still running ``grace_s`` later (a hung model call), exits at once
    (running ``before_hard_exit``'s callbacks first: a supervisor's children get their
    ``hard_stop``). Whatever was not acked is
    reclaimed by another consumer later, so exiting hard loses nothing."""

    def __init__(self, grace_s: float = 30.0, doing: str | None = None, who: str = "") -> None:
        self._event = threading.Event()
        self.grace_s = grace_s
        self.who = who  # who stops, named in the log line: "worker vader" (a supervisor's
        # children share its terminal)
        # what the first signal's log line says happens next
        self.doing = doing or f"finishing the current batch (at most {grace_s:.0f}s)"

    def install(self) -> StopFlag:
        # SIGHUP too: a closed terminal must stop a supervisor in order, not kill it and
        # leave its children (in sessions of their own) running.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        who = f"{self.who}: " if self.who else ""
        if self._event.is_set():
            _exit_now(f"{who}second {name}", 128 + signum)
        log.info("%s: %s%s, then exiting", name, who, self.doing)
        self._event.set()
        timer = threading.Timer(
            self.grace_s,
            _exit_now,
            (f"{who}still busy {self.grace_s:.0f}s after {name}", 128 + signum),
        )
        timer.daemon = True
        timer.start()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking early on a stop request."""
        return self._event.wait(seconds)


def _exit_now(why: str, code: int) -> None:
    log.warning("%s: exiting now; the unfinished batch will be reclaimed", why)
    for callback in _before_hard_exit:  # os._exit skips atexit
        callback()
    logging.shutdown()
    os._exit(code)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # httpx logs every request at INFO: one line per item per model would bury the rest.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)
