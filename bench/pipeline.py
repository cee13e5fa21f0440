"""The fleet's own overhead, measured beside its two baselines in one run on one server.

    python bench/pipeline.py [--items 20000] [--rq-items 300] [--json]
    python bench/pipeline.py --rates 500 1000             # also latency at steady rates
    python bench/pipeline.py --stages                     # Redis CPU per item, by script
    python bench/pipeline.py --cluster [--items 6000]   # partitions on 1 vs 3 primaries

With instant models (the simulated backend at zero latency) whatever time is left
is tribunal's: stream reads, validation, votes, the decision, the output. Three
numbers, all on the same embedded valkey, all in the same run, so the ratios hold
on a noisy shared machine even when the absolute numbers wander:

- raw ceiling: a minimal XADD → XREADGROUP → XACK loop, same batch size, one producer
  process and one consumer process; the most any Streams design can do here.
- tribunal: producer → 3 worker processes → aggregator → judge → an output reader,
  items/s from the first XADD to the last label read, then p50/p95 produce-to-label
  latency at half that rate, and CPU seconds per 1,000 items for every process.
- rq: the design one might write first: one rq job per item per worker model plus an
  aggregation job once three votes are in (JSON serializer, default forking workers).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import redis
from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rq_baseline  # noqa: E402  (bench/, beside this file)
import stages  # noqa: E402
from workload import BATCH, CLK_TCK, FLEET, cpu_seconds, records  # noqa: E402

from common.keys import RECORD_FIELD, Keys  # noqa: E402
from common.settings import load_settings  # noqa: E402
from producers.api import Producer  # noqa: E402
from tribunal.fleet.supervisor import Fleet  # noqa: E402
from tribunal.processes.embedded import EmbeddedRedis  # noqa: E402

# --- raw ceiling ------------------------------------------------------------------------


def _raw_produce(url: str, stream: str, n: int, cpu: Any) -> None:
    client = Redis.from_url(url)
    payload = orjson.dumps(records(1, "x")[0])
    for start in range(0, n, 500):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(500, n - start)):
            pipe.xadd(stream, {"d": payload})
        pipe.execute()
    cpu.put(time.process_time())


def _raw_consume(url: str, stream: str, n: int, cpu: Any) -> None:
    client = Redis.from_url(url)
    seen = 0
    while seen < n:
        reply: Any = client.xreadgroup("g", "c", {stream: ">"}, count=BATCH, block=1000)
        for _, entries in reply or ():
            ids = [eid for eid, _ in entries]
            client.xack(stream, "g", *ids)
            seen += len(ids)
    cpu.put(time.process_time())


def raw_ceiling(url: str, n: int, redis_pid: int) -> dict[str, float]:
    """Items/s of the raw loop, and its CPU µs per item: Redis's and all of it (Redis,
    the producer and the consumer), the yardstick for the fleet's own CPU per item."""
    stream = "raw:{0}:items"
    client = Redis.from_url(url)
    client.delete(stream)
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    cpu: Any = multiprocessing.Queue()
    consumer = multiprocessing.Process(target=_raw_consume, args=(url, stream, n, cpu))
    producer = multiprocessing.Process(target=_raw_produce, args=(url, stream, n, cpu))
    redis_before = cpu_seconds(redis_pid)
    consumer.start()
    started = time.perf_counter()
    producer.start()
    producer.join()
    consumer.join()
    elapsed = time.perf_counter() - started
    redis_s = cpu_seconds(redis_pid) - redis_before
    client.delete(stream)
    return {
        "items_per_s": n / elapsed,
        "redis_us": redis_s / n * 1e6,
        "cpu_us": (redis_s + cpu.get() + cpu.get()) / n * 1e6,
    }


# --- tribunal ---------------------------------------------------------------------------


def drain_output(client: Redis, keys: Keys, n: int, timeout: float = 300) -> list[dict[str, Any]]:
    """Read decisions through a consumer group, like `tribunal labels`, until n arrived."""
    decisions: list[dict[str, Any]] = []
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: made by an earlier phase
        client.xgroup_create(keys.output, "bench", id="0", mkstream=True)
    deadline = time.monotonic() + timeout
    while len(decisions) < n and time.monotonic() < deadline:
        reply: Any = client.xreadgroup("bench", "r", {keys.output: ">"}, count=BATCH, block=1000)
        for _, entries in reply or ():
            decisions += [orjson.loads(fields[RECORD_FIELD]) for _, fields in entries]
            client.xack(keys.output, "bench", *[eid for eid, _ in entries])
    return decisions


def fleet_run(
    server: EmbeddedRedis, n: int, workdir: Path, rates: tuple[float, ...] = ()
) -> dict[str, Any]:
    """Items/s and CPU per item at full speed, then latency at half that rate and at each of
    ``rates`` (items/s)."""
    fleet_file = workdir / "fleet.toml"
    fleet_file.write_text(FLEET.format(batch=BATCH))
    settings = load_settings(fleet_file, redis_url=server.url, namespace="bench", max_backlog=10**9)
    client = Redis.from_url(server.url)
    keys = Keys(settings.namespace)
    fleet = Fleet(settings, server.url, log_level="WARNING").start()
    try:
        time.sleep(3.0)  # let every process import and create its group
        warm = Producer(client, settings).send(records(500, "warm"))
        drain_output(client, keys, warm.produced)
        pids = {**fleet.pids(), "redis": server.pid}
        cpu_before = {role: cpu_seconds(pid) for role, pid in pids.items()}
        client.config_resetstat()  # INFO commandstats from here: the measured items only
        cpu_bench = time.process_time()
        started = time.perf_counter()
        Producer(client, settings, chunk_size=BATCH).send(records(n, "max"))
        decisions = drain_output(client, keys, n)
        elapsed = time.perf_counter() - started
        cpu = {role: cpu_seconds(pid) - cpu_before[role] for role, pid in pids.items()}
        cpu["producer + output reader (bench)"] = time.process_time() - cpu_bench
        commands = commands_per_item(client, len(decisions))
        rate = len(decisions) / elapsed
        rss = {role: rss_mib(pid) for role, pid in pids.items() if role != "redis"}
        leftover_votes = sum(1 for _ in client.scan_iter(keys.votes("*"), count=1000))
        latencies = paced_latencies(server.url, settings, keys, rate / 2, seconds=5.0)
        by_rate = {
            f"{r:g}": percentiles(paced_latencies(server.url, settings, keys, r, seconds=5.0))
            for r in rates
        }
    finally:
        fleet.stop()
    judged = sum(d["source"] == "judge" for d in decisions)
    return {
        "items": len(decisions),
        "items_per_s": rate,
        "judge_fraction": judged / max(len(decisions), 1),
        "latency_rate": rate / 2,
        **percentiles(latencies),
        "latency_by_rate": by_rate,
        "cpu_s_per_1k": {role: 1000 * s / len(decisions) for role, s in cpu.items()},
        "consumer_rss_mib": rss,
        "redis_commands_per_item": commands,
        "leftover_vote_hashes": leftover_votes,
    }


def commands_per_item(client: Redis, n: int) -> dict[str, float]:
    """Calls per item of each Redis command since the last CONFIG RESETSTAT, from INFO
    commandstats, most frequent first. Commands a script runs count too (EVAL is the call,
    HSET inside it another): the per-command cost is what a script's work is made of."""
    stats: Any = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): row["calls"] / n for name, row in stats.items()}
    return dict(sorted(calls.items(), key=lambda kv: -kv[1]))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        raise SystemExit("no label came back from a paced run: is the fleet running?")
    ordered = sorted(latencies)
    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p95_ms": ordered[int(0.95 * len(ordered))] * 1000,
    }


def paced_latencies(
    url: str, settings: Any, keys: Keys, rate: float, seconds: float
) -> list[float]:
    """Produce at a steady ``rate`` and return each item's produce-to-label time."""
    n = int(rate * seconds)
    batch = records(n, f"paced{rate:g}-")  # new ids at each rate: settled ones are known
    chunk = max(1, int(rate / 100))  # about 100 sends a second
    out: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: out.extend(drain_output(Redis.from_url(url), keys, n)))
    reader.start()
    Producer(Redis.from_url(url), settings, chunk_size=chunk).send(batch, rate=rate)
    reader.join()
    return [d["decided_at"] - d["produced_at"] for d in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--items",
        type=int,
        default=20_000,
        help="items through the raw loop and the fleet (default 20000; --cluster: at most 6000)",
    )
    parser.add_argument(
        "--rq-items",
        type=int,
        default=300,
        help="items through the rq baseline, ~15 items/s (default 300; 0 skips it)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="items/s for 1 vs 3 primaries at P = 1, 3, 6 partitions (TRIBUNAL_PARTITIONS)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="with --cluster: one server and 3 primaries, P=6"
    )
    parser.add_argument(
        "--stages", action="store_true", help="Redis CPU per item, script by script"
    )
    parser.add_argument(
        "--rates",
        type=float,
        nargs="*",
        default=[],
        metavar="ITEMS_PER_S",
        help="also measure latency at these steady rates (5 s each)",
    )
    args = parser.parse_args()
    if args.stages:
        with EmbeddedRedis() as server:
            pid = server.pid or 0
            raw = raw_ceiling(server.url, args.items, pid)
            costs = stages.redis_stages(
                server.url, lambda: cpu_seconds(pid), records(args.items, "s")
            )
        if args.json:
            print(orjson.dumps({"raw": raw, "stages": costs}, option=orjson.OPT_INDENT_2).decode())
        else:
            stages.report(costs, raw["redis_us"], args.items, 1 / CLK_TCK)
        return
    if args.cluster:
        import cluster

        rows = cluster.scaling_table(
            min(args.items, 6000), cluster.QUICK if args.quick else cluster.CONFIGS
        )
        if args.json:
            print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        else:
            cluster.report(rows)
        return
    workdir = Path(tempfile.mkdtemp(prefix="tribunal-bench-"))
    with EmbeddedRedis(workdir / "valkey") as server:
        raw = raw_ceiling(server.url, args.items, server.pid or 0)
        memory = stages.memory_per_item(server.url, records(min(args.items, 10_000), "mem"))
        fleet = fleet_run(server, args.items, workdir, tuple(args.rates))
        rq = rq_baseline.rq_run(server.url, records(args.rq_items, "rq")) if args.rq_items else 0.0
    result = {
        "machine": f"{os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "raw_items_per_s": raw["items_per_s"],
        "raw_cpu_us_per_item": raw["cpu_us"],
        "rq_items_per_s": rq,
        "tribunal": fleet,
        "redis_memory_per_item": memory,
        "of_raw_ceiling": fleet["items_per_s"] / raw["items_per_s"],
        "cpu_vs_raw": sum(fleet["cpu_s_per_1k"].values()) * 1000 / raw["cpu_us"],
        "times_rq": fleet["items_per_s"] / rq if rq else None,
    }
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        report(result)


def report(r: dict[str, Any]) -> None:
    f = r["tribunal"]
    print(f"raw Streams ceiling   {r['raw_items_per_s']:9.0f} items/s")
    print(
        f"tribunal (3 workers)  {f['items_per_s']:9.0f} items/s  = {r['of_raw_ceiling']:.0%} "
        f"of the ceiling, judge on {f['judge_fraction']:.1%}"
    )
    if r["rq_items_per_s"]:
        print(
            f"rq, job per vote      {r['rq_items_per_s']:9.1f} items/s  -> tribunal is "
            f"{r['times_rq']:.0f}x"
        )
    print(
        f"latency at {f['latency_rate']:.0f} items/s: p50 {f['p50_ms']:.1f} ms, "
        f"p95 {f['p95_ms']:.1f} ms"
    )
    for rate, p in f["latency_by_rate"].items():
        print(f"latency at {rate} items/s: p50 {p['p50_ms']:.1f} ms, p95 {p['p95_ms']:.1f} ms")
    total = sum(f["cpu_s_per_1k"].values())
    print(
        f"CPU per item: {total * 1000:.0f} µs over all processes = {r['cpu_vs_raw']:.1f}x the "
        f"raw loop's {r['raw_cpu_us_per_item']:.0f} µs; seconds per 1,000 items:"
    )
    for role, seconds in sorted(f["cpu_s_per_1k"].items()):
        print(f"  {role:34s} {seconds:6.3f}")
    commands = f["redis_commands_per_item"]
    shown = [f"{name.upper()} {calls:.2f}" for name, calls in commands.items() if calls >= 0.005]
    print(
        f"Redis commands per item: {sum(commands.values()):.1f} (INFO commandstats, those run "
        f"by scripts included): " + ", ".join(shown)
    )
    m = r["redis_memory_per_item"]
    print(
        f"Redis memory per item: queued {m['queued_bytes']:.0f} B, in flight (3 votes) "
        f"{m['in_flight_bytes']:.0f} B; vote hashes left after the drain: "
        f"{f['leftover_vote_hashes']}"
    )
    print(
        "consumer RSS (MiB): "
        + ", ".join(f"{role} {mib:.0f}" for role, mib in sorted(f["consumer_rss_mib"].items()))
    )


if __name__ == "__main__":
    main()
