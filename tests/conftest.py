"""Fixtures: a real Redis for every test (never a mock).

With ``TRIBUNAL_REDIS_URL`` set the tests use that server. Otherwise every test that
needs Redis runs on an embedded valkey 9 and, where Debian's ``redis-server`` is
installed (CI installs it), again on Redis 7: the two servers tribunal supports.
Each test gets its own key namespace, so tests never see each other's streams.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from redis import Redis

from common.connection import connect
from common.keys import Keys
from common.settings import Settings, load_settings
from tribunal.processes.embedded import EmbeddedRedis


def _servers() -> list[str]:
    if os.environ.get("TRIBUNAL_REDIS_URL"):
        return ["configured"]
    return ["valkey9", "redis7"] if shutil.which("redis-server") else ["valkey9"]


@pytest.fixture(scope="session", params=_servers())
def redis_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "configured":
        yield os.environ["TRIBUNAL_REDIS_URL"]
    elif request.param == "valkey9":
        with EmbeddedRedis(tmp_path_factory.mktemp("valkey")) as server:
            yield server.url
    else:
        yield from _redis7(tmp_path_factory.mktemp("redis7"))


def _redis7(directory: Path) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis_lib.ConnectionError:
            time.sleep(0.05)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def make_settings(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Build settings on the test server in a fresh namespace; keyword args override."""
    monkeypatch.delenv("TRIBUNAL_FLEET_FILE", raising=False)
    namespace = f"t{uuid.uuid4().hex[:10]}"

    def build(**overrides: Any) -> Settings:
        return load_settings(**{"redis_url": redis_url, "namespace": namespace, **overrides})

    return build


@pytest.fixture
def settings(make_settings: Any) -> Settings:
    return make_settings()  # type: ignore[no-any-return]


@pytest.fixture
def redis(settings: Settings) -> Iterator[Redis]:
    client = connect(settings)
    yield client
    client.close()


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.namespace)
