"""Partitions on one server: items spread by a stable hash of their id, every consumer reads
all its partitions in one blocking call, status adds the partitions up."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from test_pipeline import wait_for_all

from common.connection import connect
from common.keys import Keys, PartitionMismatch, all_partitions, partition_of
from producers.api import Producer
from tribunal.demo import load_sample
from tribunal.fleet.supervisor import Fleet
from tribunal.ops.status import snapshot


def test_partition_of_is_stable_and_spreads() -> None:
    assert partition_of("t0001", 1) == 0
    assert partition_of("t0001", 6) == partition_of("t0001", 6)  # a pure function of the id
    # the standard CRC-32 (its check value), so any language can route an item
    assert partition_of("123456789", 7) == 0xCBF43926 % 7
    spread = Counter(partition_of(f"ticket-{n}", 4) for n in range(4000))
    assert sorted(spread) == [0, 1, 2, 3] and min(spread.values()) > 900


def test_producer_routes_each_item_to_its_partition(make_settings: Any) -> None:
    settings = make_settings(partitions=4)
    redis = connect(settings)
    records = [{"id": f"r{n}", "task": "sentiment", "text": "the app crashes"} for n in range(40)]
    Producer(redis, settings).send(records)
    for keys in all_partitions(settings.namespace, 4):
        ids = [e[1][b"d"] for e in redis.xrange(keys.items)]
        assert all(partition_of(orjson_id(raw), 4) == keys.partition for raw in ids)
    assert sum(redis.xlen(k.items) for k in all_partitions(settings.namespace, 4)) == 40


def orjson_id(raw: bytes) -> str:
    import orjson

    return str(orjson.loads(raw)["id"])


def test_fleet_on_three_partitions_labels_every_item_once(make_settings: Any) -> None:
    settings = make_settings(partitions=3, block_ms=200)
    redis = connect(settings)
    records = load_sample("sentiment")
    fleet = Fleet(settings, settings.redis_url or "", log_level="WARNING").start()
    try:
        Producer(redis, settings).send(records)
        outcome = wait_for_all(redis, settings, len(records))
        snap = snapshot(redis, settings)
    finally:
        fleet.stop()
    labeled = [d.id for d in outcome.decisions]
    assert len(labeled) == len(set(labeled)) == len(records)
    per_partition = Counter(partition_of(i, 3) for i in labeled)
    for p in range(3):
        assert redis.xlen(Keys(settings.namespace, p).output) == per_partition[p] > 0
    # status shows the partitions added up, each consumer once
    items = snap.stream("items")
    assert items.entries_added == len(records) and items.partitions == 3
    assert snap.decisions.total == len(records)
    aggregator = snap.stream("ready").groups[0]
    assert len(aggregator.consumers) == 1 and aggregator.pending == 0


def test_a_stalled_partition_is_not_hidden_by_a_healthy_one(make_settings: Any) -> None:
    settings = make_settings(partitions=2)
    redis = connect(settings)
    p0, p1 = all_partitions(settings.namespace, 2)
    for keys in (p0, p1):
        redis.xgroup_create(keys.ready, "aggregator", id="0", mkstream=True)
    redis.xadd(p1.ready, {"ids": "x"})
    redis.xreadgroup("aggregator", "aggregator@dead:1", {p1.ready: ">"})  # then it died
    entry = redis.xadd(p0.ready, {"ids": "y"})
    redis.xreadgroup("aggregator", "aggregator@live:2", {p0.ready: ">"})  # Redis 7.0: only
    redis.xack(p0.ready, "aggregator", entry)  # a delivery makes the consumer known
    redis.zadd(p0.heartbeats, {"aggregator@live:2": time.time()})
    snap = snapshot(redis, settings)
    group = snap.stream("ready").groups[0]
    assert group.stalled and "partition 1" in (group.stall_reason or ""), group
    assert "ready/aggregator" in snap.stalled
    assert group.live_consumers == 1 and group.pending == 1


def test_a_process_counting_partitions_differently_is_refused(make_settings: Any) -> None:
    settings = make_settings(partitions=2)
    redis = connect(settings)
    record = [{"task": "sentiment", "text": "fine"}]
    assert Producer(redis, settings).send(record).produced == 1
    other = settings.model_copy(update={"partitions": 3})
    with pytest.raises(PartitionMismatch, match=r"uses 2 partitions.*TRIBUNAL_PARTITIONS=2"):
        Producer(redis, other).send(record)
