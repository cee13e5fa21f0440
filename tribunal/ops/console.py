"""Where the operator commands print: tables on stdout, one-line errors on stderr."""

from __future__ import annotations

import sys

from rich.console import Console


def wide_console() -> Console:
    """Tables of many columns: on a terminal its width, in a pipe or file 160 columns
    (rich would otherwise squeeze them into 80 and cut names short)."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def error_console() -> Console:
    """stderr, one line per message even in a pipe (rich wraps at 80 columns otherwise)."""
    return Console(stderr=True, soft_wrap=True)
