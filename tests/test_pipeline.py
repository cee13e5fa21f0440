"""End to end: the real fleet (separate processes) on a real Redis, every item accounted for."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.exceptions import RedisError

from common.connection import connect
from common.keys import Keys
from common.settings import Settings
from producers.api import Producer
from tribunal.demo import BAD_ENTRIES, load_sample
from tribunal.fleet.supervisor import Fleet
from tribunal.ops.finals import FinalRecords, collect, final_cursors

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips


def wait_for_all(
    redis: Any,
    settings: Settings,
    expected: int,
    timeout: float = 120.0,
    fleet: Fleet | None = None,
) -> FinalRecords:
    """Collect the final records of every partition until ``expected`` ended (or the
    timeout), then a moment more: a second record for an item would show up then. Read
    errors are retried (a cluster may be electing a primary)."""
    outcome = FinalRecords()
    cursors = final_cursors(settings)
    deadline = time.monotonic() + timeout
    while outcome.ended < expected and time.monotonic() < deadline:
        if fleet is not None:
            fleet.supervise()
        with contextlib.suppress(RedisError):
            collect(redis, cursors, outcome)
        time.sleep(0.1)
    time.sleep(1.0)  # anything extra (a second label for an item) would show up now
    collect(redis, cursors, outcome)
    return outcome


def test_fleet_labels_every_sample_ticket_exactly_once(settings: Settings) -> None:
    redis = connect(settings)
    keys = Keys(settings.namespace)
    records = load_sample("sentiment")
    assert len(records) >= 200
    fleet = Fleet(
        settings,
        settings.redis_url or "",
        log_level="WARNING",
    ).start()
    try:
        report = Producer(redis, settings).send(records)
        assert report.produced == len(records) and not report.invalid
        bad_ids = []
        for fields in BAD_ENTRIES:
            entry_id = redis.xadd(keys.items, fields)  # type: ignore[arg-type]
            bad_ids.append(entry_id.decode())
        outcome = wait_for_all(redis, settings, len(records) + len(BAD_ENTRIES))
    finally:
        fleet.stop()

    labeled = [d.id for d in outcome.decisions]
    rejected = [r.id for r in outcome.rejects]
    assert outcome.dead == []
    assert len(labeled) == len(set(labeled)), "an item was labeled twice"
    assert set(labeled) == {r["id"] for r in records}
    assert len(rejected) == len(BAD_ENTRIES) == len(set(rejected))
    # Entries without a usable id are named after their stream entry.
    assert {"entry-" + bad_ids[0], "entry-" + bad_ids[-1]} <= set(rejected)
    tasks = settings.all_tasks
    for d in outcome.decisions:
        assert d.label in tasks[d.task].labels
        assert d.source in ("workers", "judge")
        assert d.votes, d
    assert redis.keys(keys.votes("*")) == [], "per-item vote hashes left behind"
    assert redis.zcard(keys.deadlines) == 0
    assert any(d.source == "judge" for d in outcome.decisions)


def test_demo_command_prints_a_summary_with_every_item_accounted(redis_url: str) -> None:
    env = {**os.environ, "TRIBUNAL_REDIS_URL": redis_url, "COLUMNS": "120"}
    result = subprocess.run(
        [sys.executable, "-m", "tribunal", "demo", "--offline", "--limit", "60"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Summary" in out and "Agreement with gold labels" in out
    assert "65 (60 tickets + 5 malformed)" in out
    assert re.search(r"not settled\s*│\s*0\s", out), out


def test_demo_watch_shows_the_live_queues_while_producing_at_a_rate(redis_url: str) -> None:
    env = {**os.environ, "TRIBUNAL_REDIS_URL": redis_url, "COLUMNS": "160"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tribunal",
            "demo",
            "--offline",
            "--limit",
            "20",
            "--rate",
            "40",
            "--watch",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "live consumers" in result.stdout and "lag" in result.stdout
    assert "25 (20 tickets + 5 malformed)" in result.stdout


def test_demo_ctrl_c_prints_what_ended_so_far_and_stops_the_fleet(tmp_path: Path) -> None:
    """Ctrl-C is a SIGINT to the terminal's foreground process group: the summary of what
    ended, then a graceful stop of every process it started, and exit 130."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
    env["COLUMNS"] = "120"
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "tribunal", "demo", "--offline", "--rate", "5"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120

        def labeled() -> int:  # on the demo's own embedded valkey, once it says where
            url = re.search(r"Redis (redis://\S+?)[ ,]", " ".join(log.read_text().split()))
            if not url:
                return 0
            with Redis.from_url(url.group(1)) as client:
                return int(client.xlen(Keys("tribunal").output))

        while labeled() < 5:  # the fleet is up and labels flow
            assert demo.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(90) == 130, log.read_text()[-3000:]
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    text = log.read_text()
    line = re.search(
        r"interrupted after \d+s of labeling: (\d+) of 220 tickets and (\d) of 5 "
        r"malformed entries produced, (\d+) ended",
        " ".join(text.split()),
    )
    assert line and "Summary" in text, text[-3000:]
    tickets, malformed, ended = (int(n) for n in line.groups())
    assert ended >= 5 and tickets + malformed < 225, line.group(0)  # part-way, not done
    # The summary counts what was produced, not the whole sample.
    expected = max(tickets + malformed, ended)
    assert f"{expected} ({tickets} tickets + {expected - tickets} malformed)" in text
    settled = re.search(r"not settled\s*│\s*(\d+)\s", text)
    assert settled and int(settled.group(1)) == expected - ended, text[-3000:]
    assert "stopping: each process finishes its batch" in text
    for role in ("worker:vader", "worker:textblob", "worker:afinn", "aggregator", "judge"):
        assert f"{role} exited (0)" in text, text[-3000:]
    assert "Traceback" not in text
