"""Signals and logging shared by every long-running command."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


class StopFlag:
    """First SIGTERM/SIGINT asks the loop to finish its batch and exit; a second signal, or a
    batch still running ``grace_s`` later (a hung model call), exits at once. Whatever was not
    acked is reclaimed by another consumer later, so exiting hard loses nothing."""

    def __init__(self, grace_s: float = 30.0) -> None:
        self._event = threading.Event()
        self.grace_s = grace_s

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._event.is_set():
            _exit_now(f"second {name}", 128 + signum)
        log.info(
            "%s: finishing the current batch (at most %.0fs), then exiting", name, self.grace_s
        )
        self._event.set()
        timer = threading.Timer(
            self.grace_s, _exit_now, (f"still busy {self.grace_s:.0f}s after {name}", 128 + signum)
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
    logging.shutdown()
    os._exit(code)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
