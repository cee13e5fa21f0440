"""The fault-injection test as a soak, at a size of your choosing.

    python bench/soak.py --items 50000 --seconds 600 [--seed N]

Runs tests/test_fault_injection.py (SIGKILLed workers, aggregator and judge, and a
SIGKILLed Redis with AOF) with more items and a longer chaos window than the default
suite uses, and exits with its status. The test prints the seed: pass it back with
--seed to replay a failing run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=30_000)
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the chaos")
    parser.add_argument("--seed", type=int, help="replay a run")
    args = parser.parse_args()
    env = {
        **os.environ,
        "TRIBUNAL_FAULT_ITEMS": str(args.items),
        "TRIBUNAL_FAULT_SECONDS": str(args.seconds),
    }
    if args.seed is not None:
        env["TRIBUNAL_FAULT_SEED"] = str(args.seed)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "test_fault_injection.py"),
    ]
    sys.exit(subprocess.call(command, cwd=ROOT, env=env))


if __name__ == "__main__":
    main()
