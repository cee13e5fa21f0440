"""tribunal: label a stream of items with small worker models and a judge, over Redis Streams.

The distribution installs four top-level packages: ``tribunal`` (the application),
``producers``, ``consumers`` and ``common`` (the item's path). The last three have generic
names, so tribunal belongs in an environment of its own (a virtualenv, pipx, its image);
``foreign_packages`` says when another distribution's ``common`` (say) shadows ours.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PATH_PACKAGES = ("common", "consumers", "producers")
MARKER = 'DISTRIBUTION = "tribunal"'


def foreign_packages() -> str | None:
    """A one-line problem when ``common``, ``consumers`` or ``producers`` is not tribunal's
    (a folder of that name in the current directory or on PYTHONPATH comes first, or
    another distribution's package overwrote ours), else None. Reads each package's
    ``__init__.py`` without importing it (a foreign one may not import)."""
    for name in PATH_PACKAGES:
        spec = importlib.util.find_spec(name)
        init = Path(spec.origin) if spec and spec.origin else None
        if init is not None and init.is_file() and MARKER in init.read_text(errors="replace"):
            continue
        if spec is None:
            return f"tribunal's package {name!r} is not installed; reinstall tribunal"
        # A folder without __init__.py is a namespace package: no origin, only locations.
        where = init.parent if init else next(iter(spec.submodule_search_locations or ()), "?")
        return (
            f"the package {name!r} found first, at {where}, is not tribunal's: a folder of that "
            "name in the current directory or on PYTHONPATH shadows it (run from another "
            "directory, or fix PYTHONPATH), or another distribution overwrote it (install "
            "tribunal in a virtualenv of its own)"
        )
    return None


def main() -> None:
    """The ``tribunal`` executable."""
    if problem := foreign_packages():
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    from tribunal.cli.app import run_cli

    run_cli()
