"""``tribunal health`` as a healthcheck runs it: a subprocess whose exit code is the verdict,
against real consumers' heartbeats."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from test_status import cli_env, fast_settings, wait_until

from common.connection import connect
from common.keys import Keys
from common.settings import Settings

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips


def health(settings: Settings, *args: str, url: str | None = None) -> tuple[int, str]:
    env = cli_env(settings)
    if url is not None:
        env["TRIBUNAL_REDIS_URL"] = url
    result = subprocess.run(
        [sys.executable, "-m", "tribunal", "health", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


def test_health_follows_a_real_worker_from_start_to_kill(make_settings: Any) -> None:
    settings = fast_settings(make_settings)
    code, said = health(settings)
    assert code == 1
    for role in ("worker:vader", "worker:textblob", "worker:afinn", "aggregator", "judge"):
        assert f"{role}: never seen" in said

    worker = subprocess.Popen(
        [sys.executable, "-m", "tribunal", "worker", "vader"],
        env=cli_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        code, said = wait_until(
            lambda: health(settings, "--role", "worker:vader"), lambda r: r[0] == 0
        )
        assert code == 0 and "healthy: worker:vader" in said
        assert health(settings, "--role", "worker:vader", "--local")[0] == 0
        code, said = health(settings)  # the rest of the fleet is still missing
        assert code == 1 and "worker:vader" not in said and "aggregator: never seen" in said
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    time.sleep(settings.heartbeat_ttl_s + 0.5)
    code, said = health(settings, "--role", "worker:vader")
    assert code == 1 and "worker:vader: last heartbeat" in said


def test_local_counts_only_this_hosts_consumers(settings: Settings) -> None:
    redis = connect(settings)
    redis.zadd(Keys(settings.namespace).heartbeats, {"judge@elsewhere:7": time.time()})
    assert health(settings, "--role", "judge")[0] == 0
    code, said = health(settings, "--role", "judge", "--local")
    assert code == 1 and f"never seen on {socket.gethostname()}" in said


def test_unreachable_redis_is_unhealthy_at_once(settings: Settings) -> None:
    for url in ("redis://127.0.0.1:1/0", "redis+cluster://127.0.0.1:1/0"):
        started = time.monotonic()
        code, said = health(settings, url=url)
        assert code == 3 and "cannot read Redis" in said, said
        assert "Traceback" not in said
        assert time.monotonic() - started < 15


def test_a_role_no_consumer_can_have_is_a_usage_error(settings: Settings) -> None:
    code, said = health(settings, "--role", "bogus")
    assert code == 2, said
    assert said.strip().startswith("error: no such role 'bogus' (this fleet's: worker:vader,")
    assert health(settings, "--role", "worker:")[0] == 2
    assert health(settings, "--role", "labels")[0] == 1  # a real role, just not running
