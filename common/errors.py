"""tribunal's own errors: one family, so a caller catches ``TribunalError`` for any of them and
the command line maps each branch to its exit code by base class (``tribunal.cli.base``),
as dramatiq's ``errors.py`` does. Each error lives beside the code that raises it and
subclasses one of these; some also keep the built-in base they always had (``ValueError``),
so older ``except`` clauses still catch them. Redis's own errors stay redis-py's.

- ``ConfigurationError``: the fleet as configured cannot run — a setting, a model, a
  backend, an agreement scheme, a partition count other than the namespace's. Exit 2.
- ``InputError``: a record or an input file that cannot be read as items. Exit 2 where it
  ends a command; a bad record alone becomes a reject with the reason.
- ``Busy``: another process holds what the command needs (a data directory, a label
  reader's group). Exit 1: trying again later may work.
"""

from __future__ import annotations


class TribunalError(Exception):
    """Any error of tribunal's own."""


class ConfigurationError(TribunalError):
    """The fleet as configured cannot run; the message says what to change. Exit 2."""


class InputError(TribunalError):
    """Input that cannot be read as items; the message names the record or file. Exit 2."""


class Busy(TribunalError):
    """Another process holds what this one needs; the message names it. Exit 1."""


# Exit codes of the command line, by branch (the first base that matches wins).
EXIT_CODES: tuple[tuple[type[TribunalError], int], ...] = (
    (ConfigurationError, 2),
    (InputError, 2),
    (Busy, 1),
)


def exit_code(error: TribunalError) -> int:
    """The exit code for ``error``: 2 for configuration and input, 1 for busy, else 1."""
    return next((code for base, code in EXIT_CODES if isinstance(error, base)), 1)
