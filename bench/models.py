"""The fleet against its own model servers: real local models, one run, one machine.

    python bench/models.py [--fleet examples/local.toml] [--items 24] [--json]

What a user pays for is model time, so three numbers are measured side by side with
the same llama-server processes, on the first ``--items`` bundled tickets:

- ceiling: each model's server driven directly by its backend at the fleet's
  concurrency (batches of ``batch_size``), items/s; judge-only is the judge's ceiling.
- cascade: the same items through the whole fleet (producer → worker processes →
  aggregator → judge, embedded valkey): items/s from the first XADD to the last label,
  the judge-call rate, and fleet items/s as a share of the slowest worker's ceiling
  (the queue must not starve the models: goal ≥ 95%).
- speedup: judge-only wall time over the cascade's, and model-seconds per item for each.

While the fleet runs, each server's ``/metrics`` (llama-server ``--metrics``:
``llamacpp:requests_processing``, ``llamacpp:requests_deferred``) is sampled to show
whether its slots were kept busy. Speed is only ever measured here, never asserted.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.connection import connect  # noqa: E402
from common.schemas import Item  # noqa: E402
from common.settings import Settings, load_settings  # noqa: E402
from consumers.backends import ask, backend_for  # noqa: E402
from producers.api import Producer  # noqa: E402
from tribunal.demo import load_sample, running_fleet  # noqa: E402
from tribunal.queues import Outcome, collect, final_cursors  # noqa: E402
from tribunal.serving.llama import serving  # noqa: E402

METRIC = re.compile(r"^llamacpp:(requests_processing|requests_deferred)\s+([0-9.e+-]+)$", re.M)


def ceilings(settings: Settings, items: list[Item]) -> dict[str, float]:
    """Items/s of each model alone, asked in the fleet's batches at its concurrency."""
    out = {}
    for name, spec in {**settings.workers, "judge": settings.judge}.items():
        backend = backend_for(spec, settings)
        backend.classify(items[:1])  # warm the prompt cache: the fleet's servers are warm too
        started = time.perf_counter()
        for i in range(0, len(items), settings.batch_size):
            ask(backend, name, items[i : i + settings.batch_size], settings.all_tasks)
        out[name] = len(items) / (time.perf_counter() - started)
        close = getattr(backend, "close", None)
        if close:
            close()
    return out


class SlotSampler(threading.Thread):
    """Samples every server's busy and waiting requests twice a second."""

    def __init__(self, urls: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in urls}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            for name, url in self.urls.items():
                try:
                    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=2).text
                except httpx.HTTPError:
                    continue
                found = dict(METRIC.findall(text))
                busy = float(found.get("requests_processing", 0))
                self.samples[name].append((busy, float(found.get("requests_deferred", 0))))

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "busy_slots_mean": round(statistics.fmean(b for b, _ in s), 2) if s else 0.0,
                "deferred_mean": round(statistics.fmean(d for _, d in s), 2) if s else 0.0,
            }
            for name, s in self.samples.items()
        }


def through_fleet(settings: Settings, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The records through the whole fleet: wall time, judge calls, slot occupancy."""
    from rich.console import Console

    with running_fleet(settings, Console(stderr=True), "bench: the fleet") as session:
        live = session.settings
        redis = connect(live)
        sampler = SlotSampler(session.fleet.servers.urls())
        sampler.start()
        started = time.perf_counter()
        Producer(redis, live).send(records)
        cursors = final_cursors(live)
        outcome = Outcome()
        deadline = time.monotonic() + 1800
        while outcome.ended < len(records) and time.monotonic() < deadline:
            session.fleet.supervise()
            collect(redis, cursors, outcome)
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        sampler.done.set()
    judged = sum(d["source"] == "judge" for d in outcome.decisions)
    right = sum(d["label"] == d.get("gold") for d in outcome.decisions)
    return {
        "seconds": round(seconds, 1),
        "items_per_s": round(len(records) / seconds, 3),
        "ended": outcome.ended,
        "judge_call_rate": round(judged / max(len(outcome.decisions), 1), 3),
        "accuracy": round(right / max(len(outcome.decisions), 1), 3),
        "slots": sampler.summary(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet", default=str(ROOT / "examples" / "local.toml"))
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    settings = load_settings(args.fleet)
    records = load_sample("sentiment", args.items)
    items = [Item(id=r["id"], task=r["task"], text=r["text"], gold=r["gold"]) for r in records]
    print(f"ceilings: each model alone on {len(items)} tickets ...", file=sys.stderr)
    with serving(settings, Path("/tmp/tribunal-bench-models")) as served:
        ceiling = ceilings(served, items)
    print("the same tickets through the fleet ...", file=sys.stderr)
    fleet = through_fleet(settings, records)
    workers = {k: v for k, v in ceiling.items() if k != "judge"}
    slowest = min(workers.values())
    judge_only_s = len(items) / ceiling["judge"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "items": len(items),
        "ceiling_items_per_s": {k: round(v, 3) for k, v in ceiling.items()},
        "fleet": fleet,
        "fleet_share_of_slowest_worker": round(fleet["items_per_s"] / slowest, 3),
        "judge_only_seconds": round(judge_only_s, 1),
        "speedup_vs_judge_only": round(judge_only_s / fleet["seconds"], 3),
        "model_seconds_per_item": {
            "judge_only": round(1 / ceiling["judge"], 3),
            "cascade": round(
                sum(1 / v for v in workers.values()) + fleet["judge_call_rate"] / ceiling["judge"],
                3,
            ),
        },
    }
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    print(f"models alone (items/s): {result['ceiling_items_per_s']}")
    print(
        f"fleet: {fleet['items_per_s']} items/s over {fleet['seconds']} s, judge calls "
        f"{fleet['judge_call_rate']:.0%}, accuracy {fleet['accuracy']:.0%}; "
        f"{result['fleet_share_of_slowest_worker']:.0%} of the slowest worker's ceiling"
    )
    print(
        f"judge alone: {result['judge_only_seconds']} s; speedup of the cascade "
        f"{result['speedup_vs_judge_only']}x; model-seconds per item "
        f"{result['model_seconds_per_item']}"
    )
    print(f"server slots while the fleet ran: {fleet['slots']}")


if __name__ == "__main__":
    main()
