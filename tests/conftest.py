"""Fixtures: a real Redis for every test (never a mock).

With ``TRIBUNAL_REDIS_URL`` set the tests use that server; otherwise one embedded
valkey is started for the session. Each test gets its own key namespace, so tests
never see each other's streams and nothing needs flushing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis

from common.connection import EmbeddedRedis, connect
from common.keys import Keys
from common.settings import Settings, load_settings


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("TRIBUNAL_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("valkey")) as server:
        yield server.url


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
