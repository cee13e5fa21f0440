"""Partitions on a Redis Cluster: items/s for 1 vs 3 primaries at P = 1, 3, 6, in one run.

    python bench/pipeline.py --cluster [--items 6000] [--json]

Each configuration runs the same fleet as ``bench/pipeline.py`` (three instant
simulated workers, aggregator, judge: one process each) against a local cluster of
valkey processes (``tests/localcluster.py``, no replicas) and times ``--items`` items
from the first XADD until every partition's output holds them. The single-server
client at P=1 is the baseline of the ratios. Redis CPU per item is summed over every
valkey process from /proc, which is what the scaling model below needs.

On a 2-core machine the fleet's seven-plus processes already share two cores, so
more primaries cannot add throughput here; the ratios show what partitioning and the
cluster client cost. The model printed at the end says what they buy where each
primary and each consumer process has a core of its own.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from redis import Redis

from common.connection import connect
from common.keys import all_partitions
from common.settings import Settings, load_settings
from producers.api import Producer
from tests.localcluster import LocalCluster
from tribunal.fleet.supervisor import Fleet
from tribunal.ops.queues import expected_roles, read_heartbeats
from tribunal.processes.embedded import EmbeddedRedis

CONFIGS = ((None, 1), (1, 1), (1, 3), (1, 6), (3, 1), (3, 3), (3, 6))  # (primaries, P)
QUICK = ((None, 1), (3, 6))  # for the smoke test


def run_one(
    url: str, partitions: int, items: int, workdir: Path, pids: list[int]
) -> dict[str, Any]:
    from workload import BATCH, FLEET, cpu_seconds, records

    fleet_file = workdir / "fleet.toml"
    fleet_file.write_text(FLEET.format(batch=BATCH))
    settings = load_settings(
        fleet_file,
        redis_url=url,
        namespace=f"b{uuid.uuid4().hex[:6]}",
        partitions=partitions,
        max_backlog=10**9,
    )
    client = connect(settings)
    fleet = Fleet(settings, url, log_level="WARNING").start()
    try:
        wait_until_live(client, settings)
        warm = Producer(client, settings).send(records(300, "warm"))
        wait_for_outputs(client, settings, warm.produced)
        redis_cpu = sum(cpu_seconds(pid) for pid in pids)
        started = time.perf_counter()
        Producer(client, settings, chunk_size=BATCH).send(records(items, "run"))
        wait_for_outputs(client, settings, warm.produced + items)
        elapsed = time.perf_counter() - started
        redis_cpu = sum(cpu_seconds(pid) for pid in pids) - redis_cpu
    finally:
        fleet.stop()
    return {"items_per_s": items / elapsed, "redis_cpu_us_per_item": 1e6 * redis_cpu / items}


def wait_until_live(client: Redis, settings: Settings, timeout: float = 60) -> None:
    from tribunal.ops.health import missing_roles

    roles, keys = expected_roles(settings), all_partitions(settings.namespace, 1)[0]
    deadline = time.monotonic() + timeout
    while missing_roles(read_heartbeats(client, keys), roles, settings.heartbeat_ttl_s):
        if time.monotonic() > deadline:
            raise RuntimeError("the fleet did not come up")
        time.sleep(0.2)


def wait_for_outputs(client: Redis, settings: Settings, n: int, timeout: float = 600) -> None:
    outputs = [keys.output for keys in all_partitions(settings.namespace, settings.partitions)]
    deadline = time.monotonic() + timeout
    while sum(int(client.xlen(stream)) for stream in outputs) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only part of {n} items labeled after {timeout:.0f}s")
        time.sleep(0.02)


def scaling_table(
    items: int, configs: tuple[tuple[int | None, int], ...] = CONFIGS
) -> list[dict[str, Any]]:
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="tribunal-cluster-bench-"))
    for primaries, partitions in configs:
        if primaries is None:
            with EmbeddedRedis(workdir / "single") as server:
                pids = [server.pid]
                result = run_one(server.url, partitions, items, workdir, pids)
        else:
            where = workdir / f"c{primaries}-{partitions}"
            with LocalCluster(primaries=primaries, replicas=0, data_dir=where) as cluster:
                pids = [pid for node in cluster.nodes() if (pid := node.pid) is not None]
                result = run_one(cluster.url, partitions, items, workdir, pids)
        rows.append({"primaries": primaries, "partitions": partitions, **result})
        label = "single server" if primaries is None else f"{primaries} primaries"
        line = f"  {label:14s} P={partitions}: {result['items_per_s']:7.0f} items/s"
        print(line, file=sys.stderr, flush=True)
    return rows


def report(rows: list[dict[str, Any]], python_us_per_item: float | None = None) -> None:
    base = rows[0]["items_per_s"]
    print(f"\n{'Redis':16s}{'P':>3s}{'items/s':>10s}{'vs single':>11s}{'Redis CPU/item':>16s}")
    for r in rows:
        label = "single server" if r["primaries"] is None else f"cluster, {r['primaries']} prim."
        print(
            f"{label:16s}{r['partitions']:3d}{r['items_per_s']:10.0f}"
            f"{r['items_per_s'] / base:10.2f}x{r['redis_cpu_us_per_item']:13.0f} us"
        )
    widest = max((r for r in rows if r["primaries"] == 3), key=lambda r: r["partitions"])
    redis_us = widest["redis_cpu_us_per_item"]
    print(
        "\nScaling model (cores to spare): Redis work per item is split over the primaries "
        f"by partition, {redis_us:.0f} us in all at 3 primaries/P={widest['partitions']}, so "
        f"S primaries on their own cores carry about S x {1e6 / redis_us:,.0f} items/s; "
        "the Python consumers scale by replicas (each pinned to some partitions, or all "
        "sharing them through their consumer groups)"
        + (
            f", at about {python_us_per_item:.0f} us of CPU per item, i.e. one core per "
            f"{1e6 / python_us_per_item:,.0f} items/s"
            if python_us_per_item
            else ""
        )
        + ". Nothing per item is serial across partitions: an item's keys, scripts and "
        "acks stay in its partition's slot. What stays shared: one heartbeat set (every 2 s "
        "per process), the producer's backlog check (one XINFO per partition per chunk), "
        "and the per-item cost of every worker model seeing every item."
    )
