"""Graceful shutdown of a real consumer process: finish and ack the batch, or exit within the
bound when the model hangs; a second signal exits at once. Nothing is lost either way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from redis import Redis

from common.connection import connect
from common.keys import Keys, worker_group
from common.settings import Settings
from producers.api import Producer

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips

FLEET = """
batch_size = 10
block_ms = 100
shutdown_grace_s = {grace}
[workers.slow]
backend = "simulated"
options = {{ latency_ms_per_call = {latency} }}
"""


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[Any]:
    """Start a real worker process; whatever a test leaves running is killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(latency_ms: int, grace_s: float) -> subprocess.Popen[bytes]:
        started.append(_spawn(settings, tmp_path, latency_ms, grace_s))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _spawn(
    settings: Settings, tmp_path: Path, latency_ms: int, grace_s: float
) -> subprocess.Popen[bytes]:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET.format(latency=latency_ms, grace=grace_s))
    env = {
        **os.environ,
        "TRIBUNAL_REDIS_URL": str(settings.redis_url),
        "TRIBUNAL_NAMESPACE": settings.namespace,
        "TRIBUNAL_FLEET_FILE": str(fleet),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tribunal", "worker", "slow"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def in_model_call(redis: Redis, keys: Keys, n: int, timeout: float = 30) -> None:
    """Wait until the worker has read the batch (it is pending) and sits in the model call."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if redis.xpending(keys.items, worker_group("slow"))["pending"] == n:
                time.sleep(0.3)
                return
        except redis_lib.ResponseError:  # NOGROUP: the worker has not created it yet
            pass
        time.sleep(0.05)
    pytest.fail("the worker never read the batch")


def produce(redis: Redis, settings: Settings, n: int = 10) -> None:
    records = [{"id": f"s{i}", "task": "sentiment", "text": f"ticket {i}"} for i in range(n)]
    assert Producer(redis, settings).send(records).produced == n


def test_sigterm_finishes_and_acks_the_batch_then_exits_zero(
    settings: Settings, start_worker: Any
) -> None:
    redis, keys = connect(settings), Keys(settings.namespace)
    worker = start_worker(latency_ms=2000, grace_s=30)
    produce(redis, settings)
    in_model_call(redis, keys, 10)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0, worker.stderr.read().decode()
    assert redis.xpending(keys.items, worker_group("slow"))["pending"] == 0
    assert len(redis.keys(keys.votes("*"))) == 10  # the batch's votes were written


def test_a_hung_model_call_still_stops_within_the_grace_period(
    settings: Settings, start_worker: Any
) -> None:
    redis, keys = connect(settings), Keys(settings.namespace)
    worker = start_worker(latency_ms=120_000, grace_s=1.5)
    produce(redis, settings)
    in_model_call(redis, keys, 10)
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code = worker.wait(timeout=20)
    assert time.monotonic() - started < 10
    assert code == 128 + signal.SIGTERM
    assert b"still busy" in worker.stderr.read()
    # Not acked: another consumer reclaims the batch later.
    assert redis.xpending(keys.items, worker_group("slow"))["pending"] == 10


def test_a_second_signal_exits_at_once(settings: Settings, start_worker: Any) -> None:
    redis, keys = connect(settings), Keys(settings.namespace)
    worker = start_worker(latency_ms=120_000, grace_s=60)
    produce(redis, settings)
    in_model_call(redis, keys, 10)
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 5
    assert redis.xpending(keys.items, worker_group("slow"))["pending"] == 10
