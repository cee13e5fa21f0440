"""A learning fleet under `tribunal run`, killed with real signals mid-stream: nothing is
lost or doubled, and the student comes back from its snapshot, not from zero (issue 25)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import time
from pathlib import Path

import orjson
import pytest
from ports import free_port
from redis import Redis
from test_run_command import (
    KEYS,
    Procs,
    ctrl_c,
    endings,
    procs,
    produce,
    start_run,
    wait_for,
)
from test_run_command import tickets as make_tickets

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips
__all__ = ["procs"]  # the fixture, imported for pytest

FLEET = """
agreement = "posterior"
target_agreement = 0.8
audit_fraction = 0.2
policy = "staged"
quorum = 1
batch_size = 8
[workers.student]
backend = "student"
options = { min_per_class = 2, snapshot_every_s = 0.5 }
[workers.vader]
backend = "vader"
[judge]
backend = "lexicon-judge"
"""


def test_killed_mid_stream_nothing_is_lost_and_the_student_resumes_from_its_snapshot(
    procs: Procs, tmp_path: Path
) -> None:
    fleet = tmp_path / "learning.toml"
    fleet.write_text(FLEET)
    data, port = str(tmp_path / "valkey"), str(free_port())
    procs.env["TRIBUNAL_FLEET_FILE"] = str(fleet)
    run, url, pids = start_run(procs, "run.log", "--data-dir", data, "--port", port, members=4)
    redis = Redis.from_url(url)
    first = make_tickets("a", 60)
    produce(procs, url, first, "produce1.log")
    wait_for("the first 60 to end", lambda: len(endings(redis)) == 60, 120, run)
    key = KEYS.student("student")
    wait_for("a snapshot", lambda: redis.get(key), 30, run)
    saved = orjson.loads(redis.get(key))
    learned = sum(saved["state"]["tasks"]["sentiment"]["counts"].values())
    assert learned > 0

    second = make_tickets("b", 60)
    os.kill(pids["worker:student"], signal.SIGKILL)  # its state only in Redis
    os.kill(pids["judge"], signal.SIGKILL)  # and the judge, whose labels are its lessons
    produce(procs, url, second[:30], "produce2.log")  # while they are down
    resumed = "student: resumed from its snapshot"
    wait_for("the student back", lambda: resumed.encode() in procs.output("run.log"), 60, run)
    produce(procs, url, second[30:], "produce3.log")
    wait_for("all 120 to end", lambda: len(endings(redis)) == 120, 180, run)
    time.sleep(1.5)  # a doubled outcome would show by now
    where = endings(redis)
    # Every judge decision and judged audit is a lesson, once: none lost to the kills.
    lessons = redis.xlen(KEYS.lessons)
    judged = sum(1 for ends in where.values() if ends[0]["source"] == "judge")
    audits = [orjson.loads(f[b"d"]) for _, f in redis.xrange(KEYS.audits)]
    assert lessons == judged + len(audits)

    def snapshot_covers_all() -> bool:  # the restarted student saved what it learned since
        saved = orjson.loads(redis.get(key))
        return bool(sum(saved["state"]["tasks"]["sentiment"]["counts"].values()) == lessons)

    wait_for("a snapshot of every lesson", snapshot_covers_all, 30, run)
    assert ctrl_c(run) == 0
    log = procs.output("run.log").decode(errors="replace")
    # what another shell needs to see this fleet (status, health read its fleet file)
    assert f"export TRIBUNAL_FLEET_FILE={shlex.quote(str(fleet.resolve()))}" in log

    assert set(where) == {t["id"] for t in first + second}
    assert all(len(ends) == 1 for ends in where.values())
    assert all(ends[0]["stream"] == "output" for ends in where.values())
    # The student came back from its snapshot (it logs what it resumed with), not from zero.
    counts = [int(n) for n in re.findall(rf"{resumed} \(sentiment: (\d+) lessons", log)]
    assert counts and counts[0] >= learned, log[-3000:]
