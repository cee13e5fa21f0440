"""A long run at a steady rate: is Redis memory bounded and throughput steady?

    python bench/scale.py [--items 1000000] [--rate 5000] [--every 5]

The fleet of bench/pipeline.py (instant models, separate processes, embedded valkey)
labels ``--items`` items produced at ``--rate`` items/s while a reader drains the
output through its own group. Retention is set short (final records kept 30 s,
settled ids remembered 60 s, the janitor every 5 s) so that everything that should be
trimmed or expire does so within the run. Every ``--every`` seconds it prints Redis
memory, the key count, the stream lengths, and the labels per second in that
interval; at the end, the peak and final memory and the spread of the throughput.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pipeline import rss_mib
from redis import Redis
from workload import BATCH, FLEET, records

from common.keys import Keys
from common.settings import load_settings
from producers.api import Producer
from tribunal.fleet.supervisor import Fleet
from tribunal.processes.embedded import EmbeddedRedis

RETENTION = "\nretention_s = 30\ndecided_ttl_s = 60\ntrim_every_s = 5\nmax_backlog = 20000\n"


def produce_steadily(url: str, settings: Any, n: int, rate: float) -> None:
    chunk = max(1, int(rate / 50))
    lazily = (
        r for start in range(0, n, chunk) for r in records(min(chunk, n - start), f"s{start}-")
    )
    Producer(Redis.from_url(url), settings, chunk_size=chunk).send(lazily, rate=rate)


def read_output(url: str, keys: Keys, n: int, done: list[int]) -> None:
    client = Redis.from_url(url)
    client.xgroup_create(keys.output, "reader", id="0", mkstream=True)
    while done[0] < n:
        reply: Any = client.xreadgroup("reader", "r", {keys.output: ">"}, count=BATCH, block=1000)
        for _, entries in reply or ():
            client.xack(keys.output, "reader", *[eid for eid, _ in entries])
            done[0] += len(entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=5000.0, help="items produced per second")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tribunal-scale-"))
    fleet_file = workdir / "fleet.toml"
    fleet_file.write_text(RETENTION + FLEET.format(batch=BATCH))
    with EmbeddedRedis(workdir / "valkey") as server:
        settings = load_settings(fleet_file, redis_url=server.url, namespace="scale")
        keys = Keys(settings.namespace)
        client = Redis.from_url(server.url)
        fleet = Fleet(settings, server.url, log_level="WARNING").start()
        done = [0]
        try:
            time.sleep(3.0)
            reader = threading.Thread(
                target=read_output, args=(server.url, keys, args.items, done), daemon=True
            )
            reader.start()
            producer = threading.Thread(
                target=produce_steadily,
                args=(server.url, settings, args.items, args.rate),
                daemon=True,
            )
            producer.start()
            samples = sample(client, keys, done, args.items, args.every)
            rss = {role: rss_mib(pid) for role, pid in fleet.pids().items()}
        finally:
            fleet.stop()
    report(samples, rss, args)


def sample(
    client: Redis, keys: Keys, done: list[int], n: int, every: float
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    started, last_done, last_t = time.monotonic(), 0, time.monotonic()
    print(
        f"{'t s':>6} {'labels/s':>9} {'labeled':>9} {'memory MiB':>11} {'keys':>8} "
        f"{'items len':>10} {'output len':>11}"
    )
    while done[0] < n:
        time.sleep(every)
        now = time.monotonic()
        row = {
            "t": now - started,
            "rate": (done[0] - last_done) / (now - last_t),
            "labeled": done[0],
            "memory_mib": int(client.info("memory")["used_memory"]) / 2**20,
            "keys": int(client.dbsize()),
            "items_len": int(client.xlen(keys.items)),
            "output_len": int(client.xlen(keys.output)),
        }
        last_done, last_t = done[0], now
        rows.append(row)
        print(
            f"{row['t']:6.0f} {row['rate']:9.0f} {row['labeled']:9d} {row['memory_mib']:11.1f} "
            f"{row['keys']:8d} {row['items_len']:10d} {row['output_len']:11d}",
            flush=True,
        )
    return rows


def report(rows: list[dict[str, Any]], rss: dict[str, float], args: Any) -> None:
    steady = [r["rate"] for r in rows[1:-1]] or [r["rate"] for r in rows]
    memory = [r["memory_mib"] for r in rows]
    print(
        f"\n{args.items} items at {args.rate:.0f}/s: labels/s over the run "
        f"min {min(steady):.0f}, median {statistics.median(steady):.0f}, max {max(steady):.0f}"
    )
    print(
        f"Redis memory: peak {max(memory):.1f} MiB, last {memory[-1]:.1f} MiB, "
        f"first sample {memory[0]:.1f} MiB"
    )
    print(
        "consumer RSS at the end (MiB): "
        + ", ".join(f"{role} {mib:.0f}" for role, mib in sorted(rss.items()))
    )


if __name__ == "__main__":
    main()
