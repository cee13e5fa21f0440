"""The synthetic workload the fleet benchmarks share (pipeline.py, cluster.py, scale.py):
tickets of one shape, a fleet of instant simulated models, the batch size, and a process's
CPU time read from /proc."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import stages  # (bench/, beside this file)

BATCH = stages.BATCH
LABELS = ("positive", "negative", "neutral")
FLEET = """
batch_size = {batch}
block_ms = 50
[workers.a]
backend = "simulated"
options = {{ accuracy = 0.95, seed = "a" }}
[workers.b]
backend = "simulated"
options = {{ accuracy = 0.95, seed = "b" }}
[workers.c]
backend = "simulated"
options = {{ accuracy = 0.95, seed = "c" }}
[judge]
backend = "simulated"
options = {{ accuracy = 1.0, seed = "j" }}
"""
CLK_TCK = os.sysconf("SC_CLK_TCK")


def records(n: int, prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{prefix}{i}",
            "task": "sentiment",
            "text": f"ticket {i} about an invoice",
            "gold": LABELS[i % 3],
        }
        for i in range(n)
    ]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (no psutil needed)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK
