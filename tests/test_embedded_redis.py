"""The embedded valkey-server: its config, restarts on one port, and the errors of a bad start."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from redis import Redis

from tribunal.processes.embedded import EmbeddedRedis, EmbeddedRedisError


def test_a_killed_server_restarts_on_its_port_with_what_the_aof_held(tmp_path: Path) -> None:
    data = tmp_path / "with space"
    server = EmbeddedRedis(data, appendfsync="always").start()
    try:
        config = (data / "valkey.conf").read_text().splitlines()
        assert "appendonly yes" in config and "appendfsync always" in config
        assert 'save ""' in config and f"port {server.port}" in config
        assert EmbeddedRedis.recorded_url(data) == server.url
        first = server.pid
        assert (
            first is not None and f"valkey-server (pid {first})" in (data / "run.lock").read_text()
        )
        Redis.from_url(server.url).set("kept", "1")

        server.kill()
        assert server.pid is None
        server.restart()
        assert server.pid not in (None, first)
        assert Redis.from_url(server.url).get("kept") == b"1"
    finally:
        server.stop()
    assert server.pid is None and EmbeddedRedis.recorded_url(data) == server.url


def test_a_taken_port_or_data_dir_is_an_error_naming_it(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(EmbeddedRedisError, match=f"port {port} .* taken by another program"):
            EmbeddedRedis(tmp_path / "a", port=port).start()
    with EmbeddedRedis(tmp_path / "a", port=port) as server:
        with pytest.raises(EmbeddedRedisError, match=f"is in use: locked by pid {os.getpid()}"):
            EmbeddedRedis(tmp_path / "a").start()
        assert Redis.from_url(server.url).ping()


def test_a_server_that_does_not_start_is_an_error_with_its_log(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "bad", appendfsync="sometimes")
    with pytest.raises(EmbeddedRedisError) as failed:
        server.start()
    log = tmp_path / "bad" / "valkey.log"
    assert str(failed.value) == f"valkey-server did not start: it exited with code 1 (log: {log})"
    assert "appendfsync sometimes" in "\n".join(failed.value.__notes__)
    assert server.pid is None
    with pytest.raises(EmbeddedRedisError) as again:  # the lock was released; only new lines
        server.start()
    assert "\n".join(again.value.__notes__).count("FATAL CONFIG FILE ERROR") == 1
