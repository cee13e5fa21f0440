"""Chaos: thousands of items while consumers are SIGKILLed and Redis itself is killed once.

Every item produced must end as exactly one label, reject or dead letter, and no
per-item key may be left behind. Seeded: set TRIBUNAL_FAULT_SEED to replay a run.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as redis_lib

from common.connection import connect
from common.keys import AGGREGATOR_GROUP, JUDGE_GROUP, Keys, worker_group
from common.settings import Settings, load_settings
from producers.api import Producer
from tribunal.fleet.supervisor import Fleet
from tribunal.processes.embedded import EmbeddedRedis

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips

N_ITEMS = int(os.environ.get("TRIBUNAL_FAULT_ITEMS", "3000"))
CHAOS_S = float(os.environ.get("TRIBUNAL_FAULT_SECONDS", "25"))
LABELS = ("positive", "negative", "neutral")

FLEET = """
batch_size = 32
block_ms = 100
reclaim_idle_s = 1.0
reclaim_every_s = 0.5
vote_timeout_s = 4.0
max_deliveries = 8
trim_every_s = 2.0
shutdown_grace_s = 5.0

[workers.a]
backend = "simulated"
options = { latency_ms_per_call = 4, latency_ms_per_item = 0.3, accuracy = 0.8, seed = "a" }
[workers.b]
backend = "simulated"
options = { latency_ms_per_call = 4, latency_ms_per_item = 0.3, accuracy = 0.8, seed = "b" }
[workers.c]
backend = "simulated"
options = { latency_ms_per_call = 4, latency_ms_per_item = 0.3, accuracy = 0.75, seed = "c" }
[judge]
backend = "simulated"
options = { latency_ms_per_call = 15, latency_ms_per_item = 1, accuracy = 0.95, seed = "j" }
"""


def records(rng: random.Random) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"id": f"f{n:05d}", "task": "sentiment", "text": f"ticket {n}", "gold": rng.choice(LABELS)}
        for n in range(N_ITEMS)
    ]
    # Resubmissions of the same id must not be labeled twice.
    out += [dict(out[rng.randrange(N_ITEMS)]) for _ in range(N_ITEMS // 50)]
    rng.shuffle(out)
    return out


def produce_through_outages(
    settings: Settings, batch: list[dict[str, Any]], done: list[str]
) -> None:
    """Produce in chunks spread over the chaos window, retrying a chunk while Redis is down
    (a retried chunk may land twice: ids make that harmless)."""
    client = connect(settings)
    producer = Producer(client, settings, chunk_size=100)
    for start in range(0, len(batch), 100):
        chunk = batch[start : start + 100]
        while True:
            try:
                producer.send(chunk)
                break
            except (redis_lib.ConnectionError, redis_lib.TimeoutError):
                time.sleep(0.2)
        time.sleep(CHAOS_S * 0.7 / (len(batch) / 100))
    done.append("done")


def bad_entries(client: redis_lib.Redis, keys: Keys) -> set[str]:
    ids = set()
    for n in range(20):
        client.xadd(
            keys.items, {"d": orjson.dumps({"id": f"bad{n}", "task": "sentiment", "text": ""})}
        )
        ids.add(f"bad{n}")
    return ids


def settled(client: redis_lib.Redis, keys: Keys) -> dict[str, list[str]]:
    """Every id in the final streams, with where it ended (a list, to catch doubles)."""
    where: dict[str, list[str]] = {}
    for stream in keys.final_streams:
        for _, fields in client.xrange(stream):  # type: ignore[union-attr]
            where.setdefault(fields[b"id"].decode(), []).append(stream.rsplit(":", 1)[1])
    return where


def test_nothing_is_lost_or_doubled_through_kills(tmp_path: Path) -> None:
    seed = int(os.environ.get("TRIBUNAL_FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    context = f"(seed {seed}; rerun with TRIBUNAL_FAULT_SEED={seed})"
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(FLEET)
    server = EmbeddedRedis(tmp_path / "valkey", appendfsync="always").start()
    settings = load_settings(fleet_file, redis_url=server.url, namespace="chaos")
    keys = Keys(settings.namespace)
    fleet = Fleet(settings, server.url, log_level="WARNING").start()
    batch = records(rng)
    expected = {r["id"] for r in batch}
    produced: list[str] = []
    producer = threading.Thread(target=produce_through_outages, args=(settings, batch, produced))
    try:
        producer.start()
        expected |= bad_entries(connect(settings), keys)
        kills, redis_killed, deadline = 0, False, time.monotonic() + CHAOS_S
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.4, 1.2))
            child = rng.choice(fleet.children)
            if child.process is not None and child.process.poll() is None:
                child.process.kill()
                child.process.wait()
                kills += 1
                time.sleep(rng.uniform(0.0, 0.5))
                fleet.respawn(child)
            if not redis_killed and time.monotonic() > deadline - CHAOS_S / 2:
                server.kill()  # SIGKILL: only what the AOF holds survives
                time.sleep(1.0)
                server.restart()
                redis_killed = True
        producer.join(timeout=120)
        assert produced, f"the producer did not finish {context}"
        client = connect(settings)
        wait_until = time.monotonic() + 150
        while time.monotonic() < wait_until:
            fleet.supervise()
            if set(settled(client, keys)) >= expected:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # a doubled outcome would show up now
        outcome = settled(client, keys)
    finally:
        fleet.stop()
    try:
        missing = expected - set(outcome)
        doubled = {k: v for k, v in outcome.items() if len(v) > 1}
        assert not missing, (
            f"{len(missing)} items never ended, e.g. {sorted(missing)[:5]} {context}"
        )
        assert not doubled, (
            f"{len(doubled)} items ended twice, e.g. {list(doubled.items())[:3]} {context}"
        )
        assert set(outcome) == expected, f"unexpected ids {set(outcome) - expected} {context}"
        ends = [v[0] for v in outcome.values()]
        assert ends.count("rejects") == 20, context
        assert client.keys(keys.votes("*")) == [], f"vote hashes left behind {context}"
        assert client.zcard(keys.deadlines) == 0, context
        groups = [(keys.items, worker_group(w)) for w in settings.workers]
        groups += [(keys.ready, AGGREGATOR_GROUP), (keys.judge, JUDGE_GROUP)]
        for stream, group in groups:
            assert client.xpending(stream, group)["pending"] == 0, f"{group} {context}"
        print(
            f"chaos: {kills} kills, Redis killed once, {len(expected)} items, "
            f"{ends.count('output')} labels, {ends.count('dead')} dead letters {context}"
        )
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _no_env_fleet(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TRIBUNAL_FLEET_FILE", "TRIBUNAL_NAMESPACE", "TRIBUNAL_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
