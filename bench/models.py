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

    python bench/models.py --feeding [--items 192] [--slots 2,4] [--batches 64,8]
                                     [--replicas 1] [--json]

instead runs one worker (``--replicas``: that many processes of it) through the fleet
against one SmolLM2 llama-server per (slots, batch size, replicas), samples its
``/metrics`` every 0.1 s and reports where the slot-time went: busy, idle while requests
waited, idle in a batch's tail, idle between batches, and the run's start and end
(``slot_time``). Goal: ≥ 95% busy (issue 18).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import orjson
from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.connection import connect  # noqa: E402
from common.schemas import Item  # noqa: E402
from common.settings import Settings, load_settings  # noqa: E402
from consumers.backends import ask, backend_for  # noqa: E402
from producers.api import Producer  # noqa: E402
from tribunal.demo import load_sample  # noqa: E402
from tribunal.fleet.running import FleetSession, running_fleet  # noqa: E402
from tribunal.ops.outcomes import Outcome, collect, final_cursors  # noqa: E402
from tribunal.serving.llama import serving  # noqa: E402

METRIC = re.compile(r"^llamacpp:(requests_processing|requests_deferred)\s+([0-9.e+-]+)$", re.M)
FEED_PACKAGE = "smollm2-135m-instruct"  # the smallest model: feeding, not the model, is measured


class Sample(NamedTuple):
    """One ``/metrics`` reading of a llama-server."""

    t: float  # perf_counter
    busy: float  # slots processing a request
    deferred: float  # requests waiting for a slot


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


def label_all(
    session: FleetSession, redis: Redis, records: list[dict[str, Any]], poll_s: float
) -> Outcome:
    """Produce ``records`` and read the final streams every ``poll_s`` until each has ended
    (or 30 minutes passed), supervising the fleet meanwhile."""
    Producer(redis, session.settings).send(records)
    cursors, outcome = final_cursors(session.settings), Outcome()
    deadline = time.monotonic() + 1800
    while outcome.ended < len(records) and time.monotonic() < deadline:
        session.fleet.supervise()
        collect(redis, cursors, outcome)
        time.sleep(poll_s)
    return outcome


def through_fleet(settings: Settings, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The records through the whole fleet: wall time, judge calls, slot occupancy."""
    from rich.console import Console

    with running_fleet(settings, Console(stderr=True), "bench: the fleet") as session:
        live = session.settings
        redis = connect(live)
        sampler = SlotSampler(session.fleet.servers.urls())
        sampler.start()
        started = time.perf_counter()
        outcome = label_all(session, redis, records, poll_s=0.1)
        seconds = time.perf_counter() - started
        sampler.done.set()
    judged = sum(d.source == "judge" for d in outcome.decisions)
    right = sum(d.label == d.gold for d in outcome.decisions)
    return {
        "seconds": round(seconds, 1),
        "items_per_s": round(len(records) / seconds, 3),
        "ended": outcome.ended,
        "judge_call_rate": round(judged / max(len(outcome.decisions), 1), 3),
        "accuracy": round(right / max(len(outcome.decisions), 1), 3),
        "slots": sampler.summary(),
    }


FEED_FLEET = """
batch_size = {batch}
block_ms = 100
vote_timeout_s = 900
reclaim_idle_s = 1200
[models.smol]
package = "{package}"
threads = {threads}
slots = {slots}
[workers.w]
backend = "llama-cpp"
replicas = {replicas}
options = {{ model = "smol", endpoint = "chat", timeout_s = 600{extra} }}
[judge]
backend = "lexicon-judge"
"""


def slot_time(samples: list[Sample], slots: int, t0: float, t1: float) -> dict[str, float]:
    """Where the slot-time of the window [t0, t1] went, from ``/metrics`` samples: each
    sample stands for the time until the next one (the last one until t1).

    - busy: slots processing a request;
    - idle, saturated: idle slots while requests waited (deferred): the server's own;
    - idle, tail: some slots busy, nothing waiting: a batch's last requests running
      while the worker cannot send more (it has no more items until the batch is done);
    - idle, between batches: no slot busy inside the run: the worker writing votes,
      acking and reading the next batch;
    - idle, edges: before the first and after the last busy sample: the first read and
      the last votes' way to a label (the run's start and end, not feeding).
    All are shares of the window's slot-time; they add up to 1."""
    rows = [s for s in samples if t0 <= s.t <= t1]
    out = {"busy": 0.0, "saturated": 0.0, "tail": 0.0, "between_batches": 0.0, "edges": 0.0}
    total = slots * (t1 - t0)
    if not rows or total <= 0:
        return out
    active = [i for i, s in enumerate(rows) if s.busy > 0]
    first, last = (active[0], active[-1]) if active else (len(rows), -1)
    out["edges"] = slots * (rows[0].t - t0)  # before the first sample
    for i, s in enumerate(rows):
        dt = (rows[i + 1].t if i + 1 < len(rows) else t1) - s.t
        busy = min(s.busy, slots)
        idle = (slots - busy) * dt
        out["busy"] += busy * dt
        if s.deferred > 0:
            out["saturated"] += idle
        elif i < first or i > last:
            out["edges"] += idle
        elif busy > 0:
            out["tail"] += idle
        else:
            out["between_batches"] += idle
    return {k: round(v / total, 4) for k, v in out.items()}


def feeding_run(
    records: list[dict[str, Any]],
    slots: int,
    batch: int,
    replicas: int,
    threads: int,
    extra: str,
    workdir: Path,
) -> dict[str, Any]:
    """One worker (``replicas`` processes, one llama-server with ``slots`` slots) through the
    fleet at ``batch``; the server's /metrics sampled every 0.1 s from the first XADD to the
    last label."""
    from rich.console import Console

    from tribunal.fleet.running import wait_until_live

    fleet_file = workdir / f"feed-{slots}-{batch}-{replicas}.toml"
    fleet_file.write_text(
        FEED_FLEET.format(
            batch=batch,
            replicas=replicas,
            package=FEED_PACKAGE,
            threads=threads,
            slots=slots,
            extra=extra,
        )
    )
    settings = load_settings(str(fleet_file))
    console = Console(stderr=True)
    title = f"bench: {slots} slots, batch {batch}, {replicas} replica(s)"
    with running_fleet(settings, console, title) as session:
        live = session.settings
        redis = connect(live)
        wait_until_live(redis, live, session.fleet, console)
        sampler = SlotSampler(session.fleet.servers.urls(), every=0.1)
        sampler.start()
        time.sleep(0.3)  # a sample before the first request
        started = time.perf_counter()
        outcome = label_all(session, redis, records, poll_s=0.05)
        ended = time.perf_counter()
        time.sleep(0.15)
        sampler.done.set()
        sampler.join()
    samples = sampler.samples["smol"]
    shares = slot_time(samples, slots, started, ended)
    return {
        "slots": slots,
        "batch_size": batch,
        "replicas": replicas,
        "items": outcome.ended,
        "seconds": round(ended - started, 2),
        "items_per_s": round(outcome.ended / (ended - started), 3),
        "samples": len([s for s in samples if started <= s.t <= ended]),
        "busy_share": shares["busy"],
        "idle_share": {k: v for k, v in shares.items() if k != "busy"},
        "deferred_mean": round(
            statistics.fmean(s.deferred for s in samples if started <= s.t <= ended), 2
        ),
    }


def feeding(
    items: int,
    slots: list[int],
    batches: list[int],
    replicas: list[int],
    threads: int,
    max_concurrency: int | None,
) -> dict[str, Any]:
    """Issue 18: does a worker keep its server's slots full? Every (slots, batch, replicas)."""
    import tempfile

    records = load_sample("sentiment", items)
    extra = f", max_concurrency = {max_concurrency}" if max_concurrency else ""
    runs = []
    with tempfile.TemporaryDirectory(prefix="tribunal-feed-") as tmp:
        for n, b, r in [(n, b, r) for n in slots for b in batches for r in replicas]:
            print(f"feeding: {n} slots, batch {b}, {r} replica(s) ...", file=sys.stderr)
            runs.append(feeding_run(records, n, b, r, threads, extra, Path(tmp)))
            print(orjson.dumps(runs[-1]).decode(), file=sys.stderr)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "model": FEED_PACKAGE,
        "threads": threads,
        "max_concurrency": max_concurrency or "default",
        "runs": runs,
    }


def print_feeding(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return
    print(
        f"{report['model']}, -t {report['threads']}, max_concurrency "
        f"{report['max_concurrency']}: share of slot-time"
    )
    print("slots batch replicas items/s   busy  idle: saturated   tail between  edges  deferred")
    for r in report["runs"]:
        idle = r["idle_share"]
        print(
            f"{r['slots']:>5} {r['batch_size']:>5} {r['replicas']:>8} {r['items_per_s']:>7.2f}  "
            f"{r['busy_share']:>6.1%}        {idle['saturated']:>6.1%} {idle['tail']:>6.1%} "
            f"{idle['between_batches']:>7.1%} {idle['edges']:>6.1%}  {r['deferred_mean']:>8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet", default=str(ROOT / "examples" / "local.toml"))
    parser.add_argument("--items", type=int, help="tickets (default 24; --feeding: 192)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--feeding",
        action="store_true",
        help="instead: one worker against one SmolLM2 server, the share of slot-time busy",
    )
    parser.add_argument("--slots", default="2,4", help="--feeding: server slots to try")
    parser.add_argument("--batches", default="64,8", help="--feeding: batch sizes to try")
    parser.add_argument(
        "--replicas", default="1", help="--feeding: worker processes to try (e.g. 1,2)"
    )
    parser.add_argument("--threads", type=int, default=2, help="--feeding: llama-server -t")
    parser.add_argument("--max-concurrency", type=int, help="--feeding: the worker's option")
    args = parser.parse_args()
    if args.feeding:
        report = feeding(
            args.items or 192,
            [int(n) for n in args.slots.split(",")],
            [int(b) for b in args.batches.split(",")],
            [int(r) for r in args.replicas.split(",")],
            args.threads,
            args.max_concurrency,
        )
        print_feeding(report, args.json)
        return
    args.items = args.items or 24
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
