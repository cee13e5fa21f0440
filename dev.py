#!/usr/bin/env python3
"""Set up and run tribunal from a fresh clone with nothing but Python 3.11+.

    python3 dev.py demo     # the end-to-end demo on an embedded Redis
    python3 dev.py test     # ruff format --check, ruff check, mypy, pytest

The first run creates ``.venv`` and installs the project with its dev tools,
pinned by ``requirements.lock``; later runs reinstall only when those files change.
Extra arguments go to the command (``python3 dev.py test -k decision``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".tribunal-installed"


def ensure_env() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - say so plainly on an old Python
        sys.exit(f"tribunal needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256(
        b"".join((ROOT / f).read_bytes() for f in ("pyproject.toml", "requirements.lock"))
    ).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.create(VENV, with_pip=True)
    print("installing tribunal and its dev tools into .venv ...", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run([*pip, "-c", str(ROOT / "requirements.lock"), "-e", f"{ROOT}[dev]"])
    STAMP.write_text(wanted)


def run(argv: list[str]) -> None:
    code = subprocess.call(argv, cwd=ROOT)
    if code:
        sys.exit(code)


def main() -> None:
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command not in ("demo", "test"):
        sys.exit(__doc__)
    ensure_env()
    if command == "demo":
        run([str(BIN / "tribunal"), "demo", *args])
        return
    run([str(BIN / "ruff"), "format", "--check", "."])
    run([str(BIN / "ruff"), "check", "."])
    run([str(BIN / "mypy")])
    run([str(BIN / "pytest"), *args])


if __name__ == "__main__":
    main()
