"""Redis CPU per item, stage by stage of the hot path, beside the raw Streams loop's.

    python bench/pipeline.py --stages [--items 20000]

Each stage runs alone on one embedded valkey with the fleet's own code (the producer,
``Writes`` and ``Scripts`` as the consumers use them, one batch per call), and is charged
the server's CPU seconds over the items: what the fleet's ~25 Redis commands per item cost,
script by script, without five Python processes competing for the cores. A stage that
gets cheaper here gets cheaper in the fleet (``pipeline.py``'s CPU per item); the fleet
adds its reads of the ready and output streams and the MULTI/EXEC around each batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from redis import Redis

from common.keys import RECORD_FIELD, Keys
from common.schemas import Vote
from common.scripts import Scripts
from common.settings import load_settings
from consumers.engine.writes import Writes
from producers.api import Producer

BATCH = 256
WORKERS = "abc"


def redis_stages(
    url: str, redis_cpu: Callable[[], float], records: list[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """``{stage: {"redis_us": …, "client_us": …}}`` per item: CPU of the server (from
    ``redis_cpu``, seconds) and of this process, for each stage in the fleet's order."""
    n = len(records)
    client = Redis.from_url(url)
    settings = load_settings(redis_url=url, namespace="stages", max_backlog=10**9)
    keys = Keys(settings.namespace)
    scripts = Scripts(keys, settings.decided_ttl_s)
    entries: list[tuple[bytes, dict[bytes, bytes]]] = []
    ids: list[str] = []

    def produce() -> None:
        Producer(client, settings, chunk_size=BATCH).send(records)

    def read_items() -> None:  # one worker group's XREADGROUP + XACK
        client.xgroup_create(keys.items, "stages", id="0")
        while reply := client.xreadgroup("stages", "c", {keys.items: ">"}, count=BATCH):
            batch: Any = reply[0][1]
            entries.extend(batch)
            client.xack(keys.items, "stages", *[eid for eid, _ in batch])
        ids.extend(orjson.loads(fields[RECORD_FIELD])["id"] for _, fields in entries)

    def gather() -> None:
        for offset in range(0, len(ids), BATCH):
            scripts.gather_votes(client, ids[offset : offset + BATCH])

    def settle() -> None:
        for offset in range(0, len(ids), BATCH):
            writes = Writes.transaction(client, scripts)
            for item_id in ids[offset : offset + BATCH]:
                payload = orjson.dumps({"id": item_id, "label": "positive", "source": "workers"})
                writes.settle(item_id, keys.output, payload, "decisions_total|source=workers")
            writes.flush().execute()

    stages = {
        "produce (script: add unless known)": produce,
        "read items (1 group: XREADGROUP + XACK)": read_items,
        "cast votes (3 workers)": lambda: cast_votes(client, scripts, entries),
        "gather votes (aggregator)": gather,
        "settle (aggregator)": settle,
    }
    result = {}
    for name, stage in stages.items():
        server, own = redis_cpu(), time.process_time()
        stage()
        result[name] = {
            "redis_us": (redis_cpu() - server) / n * 1e6,
            "client_us": (time.process_time() - own) / n * 1e6,
        }
    client.delete(*client.keys(f"{keys.prefix}:*"))
    return result


def cast_votes(client: Redis, scripts: Scripts, entries: Any) -> None:
    """Three workers vote on every item of ``entries`` (``(entry id, fields)`` as read from
    the items stream) with its gold label, a batch per transaction as in the fleet, so a
    batch's votes carry all three labels (one script call per label)."""
    for worker in WORKERS:
        for offset in range(0, len(entries), BATCH):
            writes = Writes.transaction(client, scripts)
            for _, fields in entries[offset : offset + BATCH]:
                item = orjson.loads(fields[RECORD_FIELD])
                vote = Vote(worker=worker, label=item["gold"], confidence=0.9)
                writes.cast_vote(item["id"], vote, fields[RECORD_FIELD], 2, 60.0)
            writes.flush().execute()


def memory_per_item(url: str, records: list[dict[str, Any]]) -> dict[str, float]:
    """Redis bytes per item: queued (an items-stream entry and its queued marker) and in
    flight (its vote hash with three votes, its deadline and its share of the
    notifications), each measured as the difference in used_memory over ``records`` in a
    namespace of its own."""
    n = len(records)
    client = Redis.from_url(url)
    settings = load_settings(redis_url=url, namespace="memory", max_backlog=10**9)
    keys = Keys(settings.namespace)

    def used() -> int:
        return int(client.info("memory")["used_memory"])

    start = used()
    Producer(client, settings, chunk_size=BATCH).send(records)
    queued = used()
    scripts = Scripts(keys, settings.decided_ttl_s)
    cast_votes(client, scripts, client.xrange(keys.items))
    in_flight = used()
    client.delete(*client.keys(f"{keys.prefix}:*"))
    return {"queued_bytes": (queued - start) / n, "in_flight_bytes": (in_flight - queued) / n}


def report(stages: dict[str, dict[str, float]], raw_redis_us: float, n: int, tick_s: float) -> None:
    print(
        f"Redis CPU per item by stage (µs), each stage alone, {n:,} items; /proc counts CPU in "
        f"{tick_s * 1000:g} ms ticks, so each figure is ± {tick_s / n * 1e6:.1f} µs:"
    )
    for name, cost in stages.items():
        print(f"  {name:42s} {cost['redis_us']:7.1f}   (client {cost['client_us']:6.1f})")
    total = sum(cost["redis_us"] for cost in stages.values())
    print(f"  {'all stages':42s} {total:7.1f}")
    print(f"  {'raw loop: XADD + XREADGROUP + XACK':42s} {raw_redis_us:7.1f}")
