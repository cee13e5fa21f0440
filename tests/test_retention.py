"""Trimming never drops an entry a group still needs; final streams keep their retention."""

from __future__ import annotations

import time

import pytest
from redis import Redis

from common.keys import Keys
from common.settings import Settings
from consumers.retention import forget_idle_consumers, needed_floor, trim, trim_all


def fill(redis: Redis, stream: str, n: int) -> list[str]:
    return [redis.xadd(stream, {"d": b"x"}).decode() for _ in range(n)]  # type: ignore[union-attr]


def read(redis: Redis, stream: str, group: str, count: int, ack: bool) -> list[str]:
    reply = redis.xreadgroup(group, "c", {stream: ">"}, count=count)
    ids = [eid.decode() for _, entries in reply for eid, _ in entries]  # type: ignore[union-attr]
    if ack and ids:
        redis.xack(stream, group, *ids)
    return ids


@pytest.fixture
def s(keys: Keys) -> str:
    """A stream of this test's own."""
    return f"{keys.prefix}:s"


def test_nothing_is_trimmed_while_an_expected_group_does_not_exist(redis: Redis, s: str) -> None:
    fill(redis, s, 10)
    redis.xgroup_create(s, "a", id="0")
    read(redis, s, "a", 10, ack=True)
    assert needed_floor(redis, s, ["a", "b"]) is None
    assert trim(redis, s, ["a", "b"], None, approximate=False) == 0
    assert redis.xlen(s) == 10


def test_trim_stops_at_the_oldest_pending_or_unread_entry(redis: Redis, s: str) -> None:
    ids = fill(redis, s, 10)
    for group in ("fast", "slow", "stuck"):
        redis.xgroup_create(s, group, id="0")
    read(redis, s, "fast", 10, ack=True)
    read(redis, s, "slow", 6, ack=True)  # entries 7..10 unread
    read(redis, s, "stuck", 2, ack=True)
    read(redis, s, "stuck", 3, ack=False)  # entries 3..5 pending (a consumer died)
    assert trim(redis, s, ["fast", "slow", "stuck"], None, approximate=False) == 2
    remaining = [eid.decode() for eid, _ in redis.xrange(s)]  # type: ignore[union-attr]
    assert remaining == ids[2:]
    read(redis, s, "stuck", 10, ack=True)
    redis.xack(s, "stuck", *ids[2:5])
    assert trim(redis, s, ["fast", "slow", "stuck"], None, approximate=False) == 4
    assert redis.xlen(s) == 4  # what "slow" has not read


def test_final_streams_keep_their_retention_and_unread_entries(redis: Redis, s: str) -> None:
    old = fill(redis, s, 3)
    time.sleep(0.05)
    fill(redis, s, 2)
    assert trim(redis, s, None, max_age_s=0.04, approximate=False) == 3
    redis.xgroup_create(s, "labels", id="0")
    time.sleep(0.05)
    # Old enough now, but the labels reader has not had them: kept.
    assert trim(redis, s, None, max_age_s=0.01, approximate=False) == 0
    read(redis, s, "labels", 10, ack=True)
    assert trim(redis, s, None, max_age_s=0.01, approximate=False) == 2
    assert old


def test_janitor_pass_runs_on_every_stream(redis: Redis, keys: Keys, settings: Settings) -> None:
    fill(redis, keys.items, 3)
    fill(redis, keys.output, 3)
    assert trim_all(redis, keys, settings) == 0  # no groups yet: nothing is known to be done


def test_idle_consumers_with_nothing_pending_are_forgotten(redis: Redis, s: str) -> None:
    fill(redis, s, 4)
    redis.xgroup_create(s, "g", id="0")
    redis.xreadgroup("g", "killed", {s: ">"}, count=2)  # pending 2: must stay
    redis.xreadgroup("g", "done", {s: ">"}, count=2)
    redis.xack(
        s, "g", *[e["message_id"] for e in redis.xpending_range(s, "g", "-", "+", 10, "done")]
    )
    time.sleep(0.05)
    assert forget_idle_consumers(redis, s, "g", idle_s=0.01) == 1
    names = {c["name"] for c in redis.xinfo_consumers(s, "g")}  # type: ignore[union-attr]
    assert names == {b"killed"}


def test_a_janitor_pass_keeps_up_with_a_fast_stream(redis: Redis, s: str) -> None:
    """Approximate XTRIM stops at 10,000 entries a call: one pass must still take them all."""
    pipe = redis.pipeline(transaction=False)
    for _ in range(35_000):
        pipe.xadd(s, {"d": b"x" * 100})
    pipe.execute()
    redis.xgroup_create(s, "g", id="$")  # everything before it counts as read and acked
    redis.xadd(s, {"d": b"new"})
    assert trim(redis, s, ["g"], None) >= 34_000
    assert redis.xlen(s) < 1_000
