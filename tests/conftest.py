"""Fixtures: a real Redis for every test (never a mock).

With ``TRIBUNAL_REDIS_URL`` set the tests use that server. Otherwise every test that
needs Redis runs on an embedded valkey 9 and, where Debian's ``redis-server`` is
installed (CI installs it), again on Redis 7: the two servers tribunal supports.
Each test gets its own key namespace, so tests never see each other's streams.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from packaging.version import Version
from ports import free_port
from redis import Redis

from common.connection import connect
from common.keys import Keys
from common.settings import Settings, load_settings
from tribunal.processes.embedded import EmbeddedRedis, EmbeddedRedisError


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
        yield from _valkey9(tmp_path_factory)
    else:
        yield from _redis7(tmp_path_factory.mktemp("redis7"))


def _valkey9(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An embedded valkey; again on another port if another server took the one it found
    free before it could bind it (EmbeddedRedis says so rather than use that server)."""
    for attempt in range(5):
        server = EmbeddedRedis(tmp_path_factory.mktemp("valkey"))
        try:
            server.start()
        except EmbeddedRedisError:
            if attempt == 4:
                raise
            continue
        try:
            yield server.url
        finally:
            server.stop()
        return


def _redis7(directory: Path) -> Iterator[str]:
    """Debian's redis-server on a free port. The port is free when chosen, not when the
    server binds it: with the suite on several processes another server may take it first,
    and a ping would then reach that one. So the server that answers must be this process,
    or it starts again on another port."""
    for _ in range(5):
        port = free_port()
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--dir", str(directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        client = Redis.from_url(url)
        for _ in range(100):
            try:
                ours = client.info("server").get("process_id") == process.pid
                break
            except redis_lib.ConnectionError:
                time.sleep(0.05)
        else:
            ours = False
        if ours:
            break
        process.kill()
        process.wait(10)
    else:
        raise RuntimeError("redis-server did not start on a free port in five tries")
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


def pytest_configure(config: pytest.Config) -> None:
    """On several processes, refuse a run that would not keep grouped tests together (say
    why, in one line).

    Tests marked ``xdist_group`` share a module fixture that must exist once per run (the
    compose stack: two would fight over one compose project): they need ``--dist
    loadgroup`` (``python3 dev.py test`` passes it with ``-n``). xdist 3.8 groups by adding
    ``@group`` to a test's node id, which pytest 9.2 no longer lets it do
    (pytest-dev/pytest-xdist#1386), so on that pair the group's tests would be spread too.
    """
    if not config.getoption("numprocesses", default=None):
        return  # one process: nothing to group
    if config.getoption("dist") != "loadgroup":
        raise pytest.UsageError(
            "with -n, pass --dist loadgroup (python3 dev.py test does): tests that share one "
            "compose stack must run on one worker"
        )
    xdist = Version(version("pytest-xdist"))
    if Version(pytest.__version__) >= Version("9.2") and xdist < Version("3.9"):
        raise pytest.UsageError(
            f"pytest-xdist {xdist} does not keep xdist_group tests on one worker on pytest "
            f"{pytest.__version__} (pytest-dev/pytest-xdist#1386): install requirements.lock's "
            "pytest"
        )
