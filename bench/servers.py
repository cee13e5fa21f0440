"""What the model servers do while a fleet runs: their slots (``/metrics``) and their CPU
time (``/proc``), sampled beside a fleet run by the model benchmarks (models.py,
feeding.py)."""

from __future__ import annotations

import re
import statistics
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import httpx
from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workload import cpu_seconds  # noqa: E402  (bench/, beside this file)

from producers.api import Producer  # noqa: E402
from tribunal.fleet.running import FleetSession  # noqa: E402
from tribunal.ops.finals import FinalRecords, collect, final_cursors  # noqa: E402

METRIC = re.compile(r"^llamacpp:(requests_processing|requests_deferred)\s+([0-9.e+-]+)$", re.M)


class Sample(NamedTuple):
    """One ``/metrics`` reading of a llama-server."""

    t: float  # perf_counter
    busy: float  # slots processing a request
    deferred: float  # requests waiting for a slot


class SlotSampler(threading.Thread):
    """Samples every server's ``/metrics`` each ``every`` seconds: busy slots
    (``requests_processing``) and requests waiting for one (``requests_deferred``).

    (``prompt_seconds_total`` and ``tokens_predicted_seconds_total`` are no measure of
    slot-time on this llama-server: with 4 slots they summed to a third of the per-request
    times in its own log, which these samples matched within 1%.)"""

    def __init__(self, urls: dict[str, str], every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.every = every
        self.samples: dict[str, list[Sample]] = {name: [] for name in urls}
        self.done = threading.Event()

    def run(self) -> None:
        # trust_env=False: a proxy configured for pip must not see loopback calls
        with httpx.Client(timeout=2, trust_env=False) as client:
            while True:
                for name in self.urls:
                    sample = self.sample(client, name)
                    if sample is not None:
                        self.samples[name].append(sample)
                if self.done.wait(self.every):
                    return

    def sample(self, client: httpx.Client, name: str) -> Sample | None:
        try:
            text = client.get(self.urls[name].removesuffix("/v1") + "/metrics").text
        except httpx.HTTPError:
            return None
        found = {k: float(v) for k, v in METRIC.findall(text)}
        return Sample(
            time.perf_counter(),
            found.get("requests_processing", 0.0),
            found.get("requests_deferred", 0.0),
        )

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "busy_slots_mean": round(statistics.fmean(x.busy for x in s), 2) if s else 0.0,
                "deferred_mean": round(statistics.fmean(x.deferred for x in s), 2) if s else 0.0,
            }
            for name, s in self.samples.items()
        }


class CPUMeter:
    """CPU seconds (user + system) each process spent between ``start`` and ``stop``:
    the model servers' own compute, which wall time on a shared machine does not show."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.began: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    def start(self) -> CPUMeter:
        self.began = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def stop(self) -> dict[str, float]:
        self.spent = {name: cpu_seconds(pid) - self.began[name] for name, pid in self.pids.items()}
        return self.spent


def label_all(
    session: FleetSession, redis: Redis, records: list[dict[str, Any]], poll_s: float
) -> FinalRecords:
    """Produce ``records`` and read the final streams every ``poll_s`` until each has ended
    (or 30 minutes passed), supervising the fleet meanwhile."""
    Producer(redis, session.settings).send(records)
    cursors, outcome = final_cursors(session.settings), FinalRecords()
    deadline = time.monotonic() + 1800
    while outcome.ended < len(records) and time.monotonic() < deadline:
        session.fleet.supervise()
        collect(redis, cursors, outcome)
        time.sleep(poll_s)
    return outcome
