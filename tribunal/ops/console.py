"""Where the operator commands print: tables on stdout, one-line errors on stderr."""

from __future__ import annotations

import signal
import sys

from rich.console import Console


class PipedConsole(Console):
    """A console whose pipe closed early (``status | head``) ends the command as a Unix tool
    does, exit 141 (128 + SIGPIPE), where rich's own exits 1 (rich documents this override:
    ``Console.on_broken_pipe``)."""

    def on_broken_pipe(self) -> None:
        try:
            super().on_broken_pipe()  # quiet, stdout pointed at /dev/null
        except SystemExit:
            raise SystemExit(128 + signal.SIGPIPE) from None


def wide_console() -> Console:
    """Tables of many columns: on a terminal its width, in a pipe or file 160 columns
    (rich would otherwise squeeze them into 80 and cut names short)."""
    return PipedConsole() if sys.stdout.isatty() else PipedConsole(width=160)


def error_console() -> Console:
    """stderr, one line per message even in a pipe (rich wraps at 80 columns otherwise)."""
    return Console(stderr=True, soft_wrap=True)
