"""Faults met in the field (issue 15), each on real processes and a real server.

A live consumer keeps a slow batch however long its model takes, and a killed one's entries
move to a live consumer at once, the dead consumer then leaving its group (hung model: a
real HTTP server that does not answer; the workers are real ``tribunal worker`` processes,
one SIGKILLed). A chunk the producer sends again after losing the reply to a real WAIT is
added once. A pending entry an operator deleted with a real XDEL is acknowledged without a
fake reject. An id produced again is reported as known, queued or settled. The worker's
ACL user may do all of it. (The command-line faults are in test_cli.py.)
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from llm_server import LLMServer, llm_server
from redis import Redis

from common.connection import connect
from common.keys import Keys, worker_group
from common.settings import ModelSpec, Settings, load_settings
from consumers.backends.simulated import Simulated
from consumers.engine.consumer import StreamConsumer
from consumers.engine.runtime import Runtime
from consumers.worker import WorkerHandler
from producers.api import Producer, ProduceReport
from tribunal.processes.embedded import EmbeddedRedis

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips

LLM_FLEET = """
batch_size = 16
block_ms = 100
reclaim_every_s = 0.3
heartbeat_every_s = 0.2
reclaim_idle_s = {reclaim_idle_s}
[workers.llm]
backend = "openai"
[workers.llm.options]
base_url = "{url}"
model = "test-model"
max_concurrency = 4
timeout_s = 900
max_retries = 0
"""

HUNG_FLEET = """
batch_size = 10
block_ms = 100
[workers.slow]
backend = "simulated"
options = { latency_ms_per_call = 600000 }
"""


@pytest.fixture
def spawn(settings: Settings, tmp_path: Path) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Start a real worker process on a fleet file; whatever a test leaves running is killed."""
    started: list[subprocess.Popen[bytes]] = []

    def start(fleet: str, worker: str = "llm") -> subprocess.Popen[bytes]:
        path = tmp_path / f"fleet{len(started)}.toml"
        path.write_text(fleet)
        env = {
            **os.environ,
            "TRIBUNAL_REDIS_URL": str(settings.redis_url),
            "TRIBUNAL_NAMESPACE": settings.namespace,
            "TRIBUNAL_FLEET_FILE": str(path),
        }
        log = open(tmp_path / f"worker{len(started)}.log", "wb")  # noqa: SIM115
        started.append(
            subprocess.Popen(
                [sys.executable, "-m", "tribunal", "worker", worker],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"not within {timeout:.0f}s: {what}")


def consumers(redis: Redis, stream: str, group: str) -> dict[str, int]:
    """Consumer name -> pending entries, as XINFO CONSUMERS lists them (none: no group yet)."""
    if not redis.exists(stream) or not redis.xinfo_groups(stream):
        return {}
    rows: Any = redis.xinfo_consumers(stream, group)
    return {r["name"].decode(): int(r["pending"]) for r in rows}


def produce(redis: Redis, settings: Settings, texts: list[str]) -> None:
    records = [{"id": f"f{i}", "task": "sentiment", "text": t} for i, t in enumerate(texts)]
    assert Producer(redis, settings).send(records).produced == len(records)


def requests_per_ticket(server: LLMServer) -> list[int]:
    with server.lock:
        return sorted(server.attempts.values())


def test_a_live_consumer_keeps_its_slow_batch_whatever_the_model_latency(
    settings: Settings, spawn: Any
) -> None:
    """Eight items in two waves of 5 s (max_concurrency 4), reclaim_idle_s 2 s, a second
    replica started beside the first once it has the batch: the batch takes five times
    reclaim_idle_s, yet no item is asked for twice, because the working consumer renews its
    claim while its batch runs (every 0.2 s, heartbeat_every_s). With reclaim_idle_s 1 s the
    second replica once took the whole batch over on a loaded 2-core machine (a fresh clone's
    first suite run), most likely because the keeper thread had not run for a second."""
    redis, keys, group = connect(settings), Keys(settings.namespace), worker_group("llm")
    with llm_server() as server:
        fleet = LLM_FLEET.format(reclaim_idle_s=2.0, url=server.url)
        spawn(fleet)
        wait_until(lambda: len(consumers(redis, keys.items, group)) == 1, 60, "first reads")
        started = time.monotonic()
        produce(redis, settings, [f"ticket {i} slow=5x1" for i in range(8)])
        wait_until(lambda: sum(consumers(redis, keys.items, group).values()) == 8, 10, "read")
        spawn(fleet)
        wait_until(lambda: len(consumers(redis, keys.items, group)) == 2, 60, "second reads")
        wait_until(lambda: len(redis.keys(keys.votes("*"))) == 8, 60, "every item voted on")
        wait_until(lambda: redis.xpending(keys.items, group)["pending"] == 0, 10, "all acked")
        assert requests_per_ticket(server) == [1] * 8, "an item was taken over in flight"
        assert time.monotonic() - started > 8.0  # the batch did outlast reclaim_idle_s


def test_a_killed_consumers_entries_move_at_once_and_it_leaves_the_group(
    settings: Settings, spawn: Any
) -> None:
    """A hung model (it answers a ticket's first request after 10 minutes) and the default
    reclaim_idle_s of 60 s: while the first worker waits on it, the second takes nothing;
    once the first is SIGKILLed, the second takes its entries over within seconds (it
    has not touched its group since), labels them, and removes it from the group."""
    redis, keys, group = connect(settings), Keys(settings.namespace), worker_group("llm")
    with llm_server() as server:
        fleet = LLM_FLEET.format(reclaim_idle_s=60.0, url=server.url)
        first = spawn(fleet)
        wait_until(lambda: len(consumers(redis, keys.items, group)) == 1, 60, "first reads")
        produce(redis, settings, [f"ticket {i} slow=600x1" for i in range(4)])
        wait_until(lambda: requests_per_ticket(server) == [1] * 4, 30, "four model requests")
        [first_name] = consumers(redis, keys.items, group)
        spawn(fleet)
        wait_until(lambda: len(consumers(redis, keys.items, group)) == 2, 60, "second reads")
        time.sleep(3.0)  # three times what makes a consumer that touches nothing count as gone
        assert requests_per_ticket(server) == [1] * 4, "a live consumer's batch was taken"
        assert consumers(redis, keys.items, group)[first_name] == 4

        killed = time.monotonic()
        first.kill()
        first.wait()
        wait_until(lambda: redis.xpending(keys.items, group)["pending"] == 0, 30, "taken over")
        assert time.monotonic() - killed < 20  # far inside reclaim_idle_s (60 s)
        assert requests_per_ticket(server) == [2] * 4
        assert len(redis.keys(keys.votes("*"))) == 4
        wait_until(
            lambda: first_name not in consumers(redis, keys.items, group), 10, "dead one removed"
        )
        assert len(consumers(redis, keys.items, group)) == 1


def test_a_pending_entry_deleted_by_an_operator_is_acked_without_an_outcome(
    make_settings: Any, spawn: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker read three items and died with them pending; an operator XDELs one. The
    consumer back under the same name (a restarted container keeps its host name and pid 1)
    re-reads its own pending entries: the deleted one comes back without its fields, and is
    acknowledged with a log line, never turned into a reject; the other two are labeled.
    (On Redis 7 an XAUTOCLAIM pass that comes first drops it from the pending list too.)"""
    settings = make_settings(workers={"slow": ModelSpec(backend="simulated")}, block_ms=50)
    redis, keys, group = connect(settings), Keys(settings.namespace), worker_group("slow")
    worker = spawn(HUNG_FLEET, "slow")
    produce(redis, settings, ["one", "two", "three"])
    wait_until(lambda: sum(consumers(redis, keys.items, group).values()) == 3, 60, "read")
    [name] = consumers(redis, keys.items, group)
    worker.kill()
    worker.wait()
    entries: Any = redis.xrange(keys.items)
    deleted = entries[0][0].decode()
    assert redis.xdel(keys.items, deleted) == 1

    rt = Runtime.create(settings)
    handler = WorkerHandler(rt, "slow", Simulated({"accuracy": 1.0}, settings.all_tasks))
    again = StreamConsumer(rt, keys.items, group, handler, name)
    with caplog.at_level(logging.WARNING, logger="consumers.engine.consumer"):
        cursor = again.read_pending("0")  # its own pending entries, as after a start or outage
        assert cursor is not None and again.read_pending(cursor) is None

    assert redis.xpending(keys.items, group)["pending"] == 0
    assert redis.xlen(keys.rejects) == 0, redis.xrange(keys.rejects)
    assert sorted(k.decode().rsplit(":", 1)[1] for k in redis.keys(keys.votes("*"))) == [
        "f1",
        "f2",
    ]
    assert f"deleted from the stream (XDEL/XTRIM); acknowledged without an outcome: {deleted}" in (
        caplog.text
    )


def test_a_chunk_sent_again_after_a_lost_reply_is_added_once(tmp_path: Path) -> None:
    """WAIT for a replica that is not there outlasts this client's socket timeout (0.5 s), so
    the producer never gets the reply of a chunk the server did add, and sends it again and
    again (as redis-py's own retries also do). When a replica attaches, the last WAIT
    confirms: the stream holds each item once, and the report counts each once."""
    with EmbeddedRedis(tmp_path / "primary") as primary:
        settings = load_settings(
            redis_url=primary.url, namespace="retry", wait_replicas=1, wait_timeout_ms=3000
        )
        keys = Keys(settings.namespace)
        client = connect(settings, timeout_s=0.5)
        producer = Producer(client, settings, wait_for_redis=True)
        report = ProduceReport()
        records = [{"id": f"r{i}", "task": "sentiment", "text": f"ticket {i}"} for i in range(3)]
        sending = threading.Thread(target=producer.send, args=(records,), kwargs={"report": report})
        sending.daemon = True  # on a failure, it would retry until the test process ends
        sending.start()
        observer = Redis.from_url(primary.url)
        wait_until(lambda: observer.xlen(keys.items) == 3, 10, "the chunk stored")
        time.sleep(2.5)  # several timed-out WAITs, each followed by the chunk sent again
        assert sending.is_alive() and observer.xlen(keys.items) == 3
        with EmbeddedRedis(tmp_path / "replica") as replica:
            Redis.from_url(replica.url).replicaof("127.0.0.1", primary.port)
            sending.join(timeout=30)
            assert not sending.is_alive(), "the producer never got a replica's confirmation"
            assert Redis.from_url(replica.url).xlen(keys.items) == 3
        assert observer.xlen(keys.items) == 3
        assert (report.produced, report.known, report.unreplicated) == (3, 0, 0)


def test_an_id_is_known_from_queued_to_settled_and_leaves_no_marker(make_settings: Any) -> None:
    """Producing the same records again is reported, not silent: while they wait in the
    stream and after they settled (by the workers or the judge), they are known and not added
    again; once settled, no queued marker is left behind."""
    from test_consumers import WORKERS, Fleet

    workers = {name: ModelSpec(backend="simulated") for name in WORKERS}
    fleet = Fleet(make_settings(workers=workers, block_ms=20))
    redis, keys = fleet.rt.redis, fleet.rt.keys
    split = {"alpha": "positive", "beta": "negative", "gamma": "neutral", "judge": "negative"}
    records = [
        {
            "id": "agreed",
            "task": "sentiment",
            "text": "t",
            "metadata": dict.fromkeys(WORKERS, "positive"),
        },
        {"id": "judged", "task": "sentiment", "text": "t", "metadata": split},
    ]
    producer = Producer(redis, fleet.rt.settings)
    first = producer.send(records)
    assert (first.produced, first.known) == (2, 0)
    queued = producer.send([*records, records[0]])  # one of them twice in one chunk, too
    assert (queued.produced, queued.known, queued.new) == (3, 3, 0)
    assert redis.xlen(keys.items) == 2

    fleet.step()
    assert sorted(d["id"] for d in fleet.outputs()) == ["agreed", "judged"]
    assert redis.keys(keys.queued("*")) == []
    settled = producer.send(records)
    assert (settled.produced, settled.known) == (2, 2)
    assert redis.xlen(keys.items) == 2


def test_the_worker_acl_lets_it_keep_and_take_over_claims(make_settings: Any, redis: Redis) -> None:
    """Under the least-privilege worker user of ``tribunal acl``: renewing its batch, taking
    over a silent consumer's entries and removing that consumer once it holds nothing."""
    from tribunal.ops.acl import rules

    settings = make_settings(
        workers={"w": ModelSpec(backend="simulated")}, heartbeat_every_s=0.05, block_ms=10
    )
    user = f"worker-{settings.namespace}"
    redis.execute_command(
        "ACL", "SETUSER", user, "on", ">pw", *rules("worker", settings.namespace).split()
    )
    try:
        url = str(settings.redis_url).replace("redis://", f"redis://{user}:pw@", 1)
        rt = Runtime.create(settings.model_copy(update={"redis_url": url}))
        keys, group = rt.keys, worker_group("w")
        handler = WorkerHandler(rt, "w", Simulated({"accuracy": 1.0}, settings.all_tasks))
        me = StreamConsumer(rt, keys.items, group, handler, "me")
        me.ensure_group()
        produce(redis, settings, ["one", "two", "three"])
        mine: Any = redis.xreadgroup(group, "me", {keys.items: ">"}, count=1)
        me.in_flight = [mine[0][1][0][0].decode()]
        assert me.renew() == 1
        redis.xreadgroup(group, "gone", {keys.items: ">"}, count=2)
        time.sleep(0.5)  # "gone" is silent for twice what counts as gone
        me.take_over_silent()
        assert consumers(redis, keys.items, group) == {"gone": 0, "me": 1}  # labeled, acked
        assert len(redis.keys(keys.votes("*"))) == 2
        me.take_over_silent()
        assert consumers(redis, keys.items, group) == {"me": 1}
    finally:
        redis.execute_command("ACL", "DELUSER", user)
