"""``tribunal status`` against a live fleet (real processes, real Redis) with known counts:
lag is every item before the fleet runs, 0 while it runs, and comes back for one worker's
group only when that worker stops, which is then flagged as stalled."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from rich.console import Console

from common import metrics
from common.connection import connect
from common.keys import Keys
from common.settings import Settings
from producers.api import Producer
from tribunal.demo import load_sample
from tribunal.fleet.supervisor import Fleet
from tribunal.ops.readmodels import GroupReading, Snapshot
from tribunal.ops.status import render, snapshot

T = TypeVar("T")
# Quick heartbeats and reads, so a stopped consumer is noticed within seconds.
FAST = {"TRIBUNAL_HEARTBEAT_EVERY_S": "0.3", "TRIBUNAL_BLOCK_MS": "200"}
TTL_S = 3.0


def fast_settings(make_settings: Any) -> Settings:
    return make_settings(heartbeat_ttl_s=TTL_S)  # type: ignore[no-any-return]


def cli_env(settings: Settings) -> dict[str, str]:
    """Environment for ``python -m tribunal`` children on the test's Redis and namespace."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
    return {
        **environ,
        **FAST,
        "TRIBUNAL_REDIS_URL": str(settings.redis_url),
        "TRIBUNAL_NAMESPACE": settings.namespace,
        "TRIBUNAL_HEARTBEAT_TTL_S": str(settings.heartbeat_ttl_s),
    }


def start_fleet(settings: Settings) -> Fleet:
    fleet = Fleet(settings, str(settings.redis_url), log_level="WARNING")
    fleet.env = cli_env(settings)
    return fleet.start()


def stop_role(fleet: Fleet, role: str) -> None:
    child = next(c for c in fleet.children if c.role == role)
    assert child.process is not None
    child.process.terminate()
    child.process.wait(15)


def wait_until(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 30.0) -> T:
    """Poll ``read`` until ``done`` holds; return the last value either way."""
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.2)
        value = read()
    return value


def fresh_records(n: int, offset: int = 0) -> list[dict[str, Any]]:
    """Sample tickets without their ids (the producer gives new ones: no duplicates)."""
    return [
        {k: v for k, v in r.items() if k != "id"} for r in load_sample("sentiment")[offset:][:n]
    ]


def groups(snap: Snapshot, stream: str = "items") -> dict[str, GroupReading]:
    (found,) = [s for s in snap.streams if s.stream == stream]
    return {g.group: g for g in found.groups}


def status_text(snap: Snapshot) -> str:
    """``tribunal status`` as a 200-column terminal shows it."""
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(render(snap))
    return console.export_text()


def printed_groups(printed: dict[str, Any], stream: str = "items") -> dict[str, dict[str, Any]]:
    """``groups`` of a snapshot as ``status --json`` printed it."""
    (found,) = [s for s in printed["streams"] if s["stream"] == stream]
    return {g["group"]: g for g in found["groups"]}


def test_status_follows_lag_as_the_fleet_starts_and_a_worker_stops(make_settings: Any) -> None:
    settings = fast_settings(make_settings)
    redis = connect(settings)
    workers = [f"worker:{w}" for w in settings.workers]
    n, m = 40, 12
    assert Producer(redis, settings).send(fresh_records(n)).produced == n

    before = snapshot(redis, settings)
    items = groups(before)
    assert [s.length for s in before.streams if s.stream == "items"] == [n]
    for group in workers:  # not created yet: what its consumers will have to read
        assert items[group].lag == n and items[group].exists is False
        assert items[group].stalled, items[group]
    assert sorted(before.stalled) == sorted(f"items/{g}" for g in workers)
    assert before.decisions.total == 0 and before.judge_call_rate is None
    assert set(before.live_consumers.values()) == {0}

    fleet = start_fleet(settings)
    try:
        running = wait_until(
            lambda: snapshot(redis, settings),
            lambda s: s.decisions.total == n and all(g.lag == 0 for g in groups(s).values()),
        )
        assert running.decisions.total == n, running
        for group in workers:
            g = groups(running)[group]
            assert g.exists and g.lag == 0 and g.live_consumers == 1, g
            assert g.consumers[0].name.startswith(group + "@")
        assert list(running.stalled) == []
        assert running.throughput.outputs == n and not running.throughput.capped
        d = running.decisions.by_source
        assert d.get("workers", 0) + d.get("judge", 0) == n
        assert running.agreement_rate == round(d.get("workers", 0) / n, 4)
        assert running.judge_call_rate == round(running.escalations / n, 4)
        assert running.rejects == 0 and running.dead_letters == 0
        votes = sum(c for by_label in running.votes.values() for c in by_label.values())
        assert votes >= 2 * n  # a decision needs a quorum of two, an escalation two votes
        assert all(running.live_consumers[r] == 1 for r in [*workers, "aggregator", "judge"])

        stop_role(fleet, "worker:vader")
        Producer(redis, settings).send(fresh_records(m, offset=n))
        stopped = wait_until(
            lambda: snapshot(redis, settings),
            lambda s: (
                list(s.stalled) == ["items/worker:vader"]
                and all(groups(s)[g].lag == 0 for g in workers if g != "worker:vader")
            ),
        )
        assert groups(stopped)["worker:vader"].lag == m
        assert list(stopped.stalled) == ["items/worker:vader"], stopped.stalled
        # A consumer that stopped cleanly leaves its group; one killed leaves a silent
        # heartbeat (or, as Redis 7.0 counts idle time from the last delivery, an idle one).
        reason = groups(stopped)["worker:vader"].stall_reason or ""
        assert any(sign in reason for sign in ("no consumer", "heartbeat", "idle for more")), reason
        assert stopped.live_consumers["worker:vader"] == 0

        result = subprocess.run(
            [sys.executable, "-m", "tribunal", "status", "--json"],
            env=cli_env(settings),
            capture_output=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        printed = orjson.loads(result.stdout)
        assert printed_groups(printed)["worker:vader"]["lag"] == m
        assert printed["stalled"] == ["items/worker:vader"]
        assert printed["decisions"]["total"] >= n
    finally:
        fleet.stop()


def test_status_table_and_errors(settings: Settings) -> None:
    env = cli_env(settings)
    Producer(connect(settings), settings).send(fresh_records(3))
    # Votes counted for one worker only: the others (all their votes late) get a row of none.
    vote = metrics.field(metrics.VOTES, {"worker": "vader", "label": "positive"})
    connect(settings).hset(Keys(settings.namespace).stats, vote, 2)
    table = subprocess.run(
        [sys.executable, "-m", "tribunal", "status"],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert table.returncode == 0, table.stderr
    assert "worker:vader" in table.stdout and "STALLED" in table.stdout
    assert "judge-call rate" in table.stdout
    assert re.search(r"votes vader\s+2 \(positive 2\)", table.stdout), table.stdout
    assert re.search(r"votes textblob\s+0 \(none counted\)", table.stdout), table.stdout
    assert "abstain: the model's answer held no usable label" in " ".join(table.stdout.split())
    for url in ("redis://127.0.0.1:1/0", "redis+cluster://127.0.0.1:1/0"):
        down = subprocess.run(
            [sys.executable, "-m", "tribunal", "status", "--json"],
            env={**env, "TRIBUNAL_REDIS_URL": url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert down.returncode == 3 and "cannot read Redis" in down.stderr, down.stderr
        assert "Traceback" not in down.stderr and down.stdout == ""


def test_watch_refreshes_until_interrupted(settings: Settings) -> None:
    redis = connect(settings)
    known = max(int(c["id"]) for c in redis.client_list())
    watch = subprocess.Popen(
        [sys.executable, "-m", "tribunal", "status", "--watch", "--interval", "0.2"],
        env={**cli_env(settings), "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Up once it reads Redis (its import takes seconds on a loaded machine): the first frames
    # show an empty items stream. Its connection is the first with a newer client id (a count
    # of clients misses it when an earlier test's connection closes meanwhile).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(int(c["id"]) > known for c in redis.client_list()):
            break
        time.sleep(0.1)
    Producer(redis, settings).send(fresh_records(5))
    time.sleep(1.5)  # several refreshes at 0.2 s
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=15)
    assert watch.returncode == 0, err
    # Off a terminal, rich prints the last frame when the live display stops.
    assert re.search(r"items\s*│\s*5\s*│\s*5\s*│", out), out


def test_a_group_read_on_demand_is_not_stalled_but_a_follower_that_stopped_is(
    make_settings: Any,
) -> None:
    """`labels` without --follow reads what is there and leaves the group: the labels that
    come after it wait for its next read, which is no stall. A follower that died is."""
    from common.keys import RECORD_FIELD, Keys
    from consumers.engine.runtime import Runtime
    from consumers.labels import read_labels

    settings = make_settings(heartbeat_ttl_s=0.5)
    rt = Runtime.create(settings)
    output = Keys(settings.namespace).output
    for n in range(2):
        rt.redis.xadd(output, {RECORD_FIELD: orjson.dumps({"id": f"a{n}"})})
    assert read_labels(rt, io.BytesIO(), "archive", follow=False) == 2
    # a follower wrote and acked one label, and was killed (its consumer stays in the group)
    rt.redis.xgroup_create(output, "live", id="0")
    got: Any = rt.redis.xreadgroup("live", "labels@elsewhere:1", {output: ">"}, count=1)
    rt.redis.xack(output, "live", got[0][1][0][0])
    for n in range(3):
        rt.redis.xadd(output, {RECORD_FIELD: orjson.dumps({"id": f"b{n}"})})
    time.sleep(0.6)
    snap = snapshot(rt.redis, settings, stall_after_s=0.5)
    readers = {g.group: g for s in snap.streams if s.stream == "output" for g in s.groups}
    archive, live = readers["archive"], readers["live"]
    assert (archive.lag, archive.pending, archive.consumers) == (3, 0, ()), archive
    assert not archive.stalled, archive
    assert (live.lag, live.pending, live.stalled) == (4, 0, True), live
    assert list(snap.stalled) == ["output/live"]
