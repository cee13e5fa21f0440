"""Run the whole fleet as separate processes: one per worker replica, the aggregator, the judge.

Separate processes because that is how the fleet runs in production (and how a
crash of one model must not take the others down). A child that dies is restarted
with backoff, unless it exits on a configuration error (exit 2: restarting would fail
the same way), which stops the fleet with ``ChildFailed``. Each child runs in a session
of its own (``tribunal.processes.children.start_child``): a terminal's Ctrl-C reaches only
the supervisor, which passes one SIGTERM to every child, so each finishes its batch; a
second signal to the supervisor stops them at once.
Local models (``[models.NAME]`` used by a ``llama-cpp`` worker or judge) get their
llama-server started first, and stopped last; their URLs reach the children in
``TRIBUNAL_MODEL_URLS``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import orjson
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError

from common.connection import connect, is_transient
from common.errors import ConfigurationError
from common.keys import claim_partitions
from common.settings import FLEET_FILE_ENV, Settings, fleet_roles
from tribunal.processes.children import Restarts, start_child, stop_processes
from tribunal.serving.llama import servers_for
from tribunal.serving.warm import warm_prompt_caches

log = logging.getLogger(__name__)


# How a child runs tribunal: this interpreter, without the current folder on sys.path (-P),
# so a folder named common/, consumers/ or producers/ where the fleet was started cannot
# shadow tribunal's packages in its children.
TRIBUNAL_COMMAND = (sys.executable, "-P", "-m", "tribunal")
# A child's exit code for a setup error (tribunal.cli.base.clear_errors: a partition count
# other than the namespace's, a backend that cannot be built, a model that cannot be served).
CONFIG_ERROR = 2
# What a graceful stop tells the operator (run, demo, evaluate).
STOPPING = "stopping: each process finishes its batch (Ctrl-C again to stop at once)"


class ChildFailed(ConfigurationError):
    """A fleet member exited on a configuration error; the message names it."""


@dataclass
class Child:
    role: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restart: Restarts = field(default_factory=Restarts)

    def exit_note(self) -> str:
        return f"{self.role} exited with {self.process and self.process.returncode}"


def check_fleet(settings: Settings) -> None:
    """What can be refused before anything starts: each worker's and the judge's backend and
    options (BackendError), the agreement scheme (UnknownScheme). ``Fleet.start`` checks it;
    commands call it first, so a typo ends them before a server or valkey starts."""
    from consumers.backends import check_options
    from consumers.decision import Rule

    for role, spec in [*settings.workers.items(), ("judge", settings.judge)]:
        check_options(spec, role)
    Rule.of(settings)


class Fleet:
    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        log_level: str = "INFO",
        log_to: IO[bytes] | None = None,
        extra_env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        warm_tasks: Collection[str] | None = None,
    ) -> None:
        """``log_dir``: where the model servers write their logs (default: the system's
        temporary directory, /tmp/tribunal-models); ``warm_tasks``: the tasks whose prompt
        prefix the servers compute at start (default: every task of the fleet)."""
        self.warm_tasks = warm_tasks
        self.settings = settings
        self.env = {
            **os.environ,
            "TRIBUNAL_REDIS_URL": redis_url,
            "TRIBUNAL_NAMESPACE": settings.namespace,
            "TRIBUNAL_PARTITIONS": str(settings.partitions),
            **(extra_env or {}),
        }
        if settings.fleet_file is not None:
            self.env[FLEET_FILE_ENV] = str(settings.fleet_file)
        self.log_to = log_to
        self.children = [
            Child(role, [*TRIBUNAL_COMMAND, "--log-level", log_level, *args])
            for role, args in fleet_roles(settings)
        ]
        self.stopping = False
        self.servers = servers_for(
            settings, log_dir or Path(tempfile.gettempdir()) / "tribunal-models"
        )

    def start(self) -> Fleet:
        """The model servers (each healthy before the next), then every child.
        Raises ServerFailed or ModelUnavailable when a model cannot be served, what
        ``check_fleet`` raises, PartitionMismatch when the namespace has another partition
        count."""
        check_fleet(self.settings)
        self._check_partitions()
        if self.servers.servers:
            self.servers.start()
            self.env["TRIBUNAL_MODEL_URLS"] = orjson.dumps(self.servers.urls()).decode()
            warm_prompt_caches(self.settings, self.servers.urls(), self.warm_tasks)
        for child in self.children:
            self._spawn(child)
        return self

    def _check_partitions(self) -> None:
        """Refuse a partition count other than the namespace's once, before anything starts:
        every child checks too, and would print the same reason and exit 2 each. When Redis
        cannot be reached yet the children wait for it and check as they connect."""
        try:
            with connect(self.settings, self.env["TRIBUNAL_REDIS_URL"], timeout_s=2.0) as client:
                claim_partitions(client, self.settings.namespace, self.settings.partitions)
        except (RedisError, RedisClusterException) as exc:
            if isinstance(exc, AuthenticationError) or not is_transient(exc, None):
                raise  # refused (password, ACL): every member would be too; clear_errors says so
            log.warning("cannot reach Redis yet (%s): the fleet waits for it", exc)

    def respawn(self, child: Child) -> None:
        """Start ``child`` again now (after it was stopped or killed)."""
        child.restart.cancel()
        self._spawn(child)

    def _spawn(self, child: Child) -> None:
        child.process = start_child(
            child.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log_to,
            stderr=subprocess.STDOUT if self.log_to else None,
        )
        child.restart.started()
        log.info("started %s (pid %d)", child.role, child.process.pid)

    def supervise(self) -> None:
        """Restart children and model servers that died; call this periodically. Raises
        ChildFailed when a child exited on a configuration error."""
        if self.stopping:
            return
        self.servers.supervise()
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.restart.running()
            if child.process is None or child.process.poll() is None:
                continue
            if child.process.returncode == CONFIG_ERROR:
                where = getattr(self.log_to, "name", None) or "the output above"
                raise ChildFailed(
                    f"{child.role} stopped on a configuration error (exit {CONFIG_ERROR}; its "
                    f"message is in {where}): restarting it would fail the same way"
                )
            if child.restart.after_exit(child.exit_note):
                self.respawn(child)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM everyone (they finish their batch), SIGKILL whoever is still there after
        ``timeout`` (their un-acked entries are reclaimed by the next fleet)."""
        self.stopping = True
        processes = [(c.role, c.process) for c in self.children if c.process is not None]
        for role, code in stop_processes(processes, timeout).items():
            # -SIGTERM: stopped while still starting, before its handler was set: as asked.
            asked = code in (0, -signal.SIGTERM)
            log.log(logging.INFO if asked else logging.WARNING, "%s exited (%d)", role, code)
        self.servers.stop()

    def pids(self) -> dict[str, int]:
        return {c.role: c.process.pid for c in self.children if c.process}


def log_file(directory: Path) -> IO[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    return open(directory / "fleet.log", "ab")
