"""Redis going away: producers wait when asked (or fail clearly), consumers wait it out."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis as redis_lib

from common.connection import connect
from common.keys import Keys
from common.settings import load_settings
from producers.api import Producer
from tribunal.processes.embedded import EmbeddedRedis

RECORDS = [{"task": "sentiment", "text": f"ticket {n}"} for n in range(50)]


def test_producer_fails_at_once_or_waits_for_redis_when_asked(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "valkey").start()
    settings = load_settings(redis_url=server.url, namespace="outage")
    server.stop()
    with pytest.raises(redis_lib.ConnectionError):
        Producer(connect(settings), settings).send(RECORDS)

    reports = []
    waiting = threading.Thread(
        target=lambda: reports.append(
            Producer(connect(settings), settings, chunk_size=10, wait_for_redis=True).send(RECORDS)
        )
    )
    waiting.start()
    time.sleep(1.0)
    assert waiting.is_alive(), "the producer gave up instead of waiting"
    server.restart()
    waiting.join(timeout=30)
    try:
        assert reports and reports[0].produced == 50
        assert connect(settings).xlen(Keys("outage").items) == 50
    finally:
        server.stop()
