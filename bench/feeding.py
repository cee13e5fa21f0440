"""Does a worker keep its llama-server's slots busy? (issue 18)

    python bench/feeding.py [--items 192] [--slots 2,4] [--batches 64,8] [--replicas 1]
                            [--threads 2] [--max-concurrency N] [--json]

runs one worker (``--replicas``: that many processes of it) through the fleet against one
SmolLM2 llama-server per (slots, batch size, replicas), samples its ``/metrics`` every
0.1 s and reports where the slot-time went: busy, idle while requests waited, idle in a
batch's tail, idle between batches, and the run's start and end (``slot_time``). Goal:
≥ 95% busy. (``bench/models.py --feeding`` runs this too.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servers import Sample, SlotSampler, label_all  # noqa: E402  (bench/, beside this file)

from common.connection import connect  # noqa: E402
from common.settings import load_settings  # noqa: E402
from tribunal.demo import load_sample  # noqa: E402
from tribunal.fleet.running import running_fleet  # noqa: E402

FEED_PACKAGE = "smollm2-135m-instruct"  # the smallest model: feeding, not the model, is measured


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=192, help="tickets (default 192)")
    parser.add_argument("--slots", default="2,4", help="server slots to try")
    parser.add_argument("--batches", default="64,8", help="batch sizes to try")
    parser.add_argument("--replicas", default="1", help="worker processes to try (e.g. 1,2)")
    parser.add_argument("--threads", type=int, default=2, help="llama-server -t")
    parser.add_argument("--max-concurrency", type=int, help="the worker's option")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    report = feeding(
        args.items,
        [int(n) for n in args.slots.split(",")],
        [int(b) for b in args.batches.split(",")],
        [int(r) for r in args.replicas.split(",")],
        args.threads,
        args.max_concurrency,
    )
    print_feeding(report, args.json)


if __name__ == "__main__":
    main()
