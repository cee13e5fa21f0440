"""A fleet's life: its Redis, its model servers and processes, and their stop in order.

``fleet_life`` is the one sequence every command that runs a fleet goes through (``run``,
``demo``, ``evaluate``, bench/models.py; the benches that run several fleets on one valkey
drive ``Fleet`` themselves): the fleet starts on a Redis — the embedded valkey the
caller started, whose stop it then owns, or a given URL — and on the way out the members
get their own grace to finish their batch, then the model servers stop, then valkey.
Signals stay the caller's: ``run`` loops on a stop flag, a one-job command takes Ctrl-C as
``KeyboardInterrupt``.

``running_fleet`` is that life for one job (the demo, an evaluation): an embedded valkey in
a temporary directory (or, with ``TRIBUNAL_REDIS_URL``, that server in a fresh namespace),
logs kept only when something went wrong; ``wait_until_live`` waits until every process
reads its stream.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from redis import Redis
from rich.console import Console

from common.connection import redact
from common.keys import Keys
from common.settings import Settings
from tribunal.fleet.supervisor import STOPPING, Fleet, check_fleet, log_file
from tribunal.ops.health import missing_roles
from tribunal.ops.queues import expected_roles, read_heartbeats
from tribunal.processes.embedded import EmbeddedRedis


@contextmanager
def fleet_life(
    settings: Settings,
    url: str,
    embedded: EmbeddedRedis | None = None,
    *,
    log_to: IO[bytes] | None = None,
    log_dir: Path | None = None,
    extra_env: dict[str, str] | None = None,
    warm_tasks: Collection[str] | None = None,
    announce: Callable[[Fleet], None] = lambda fleet: None,
) -> Iterator[Fleet]:
    """Within: the fleet started on the Redis at ``url`` (``embedded``, if given, is the
    started valkey behind it: stopped last, whatever happens). ``announce(fleet)`` runs
    once the fleet is built, before anything of it starts. On exit the members get
    ``shutdown_grace_s + 5`` s to finish their batch (then SIGKILL), then the model servers
    and valkey stop. Raises what ``Fleet.start`` raises (``ConfigurationError``s)."""
    try:
        fleet = Fleet(
            settings,
            url,
            log_to=log_to,
            extra_env=extra_env,
            log_dir=log_dir,
            warm_tasks=warm_tasks,
        )
        announce(fleet)
        try:
            fleet.start()
            yield fleet
        finally:
            # The members' own grace (a model batch may take that long), then SIGKILL; a
            # second Ctrl-C cuts it short (the atexit hard stop kills what is left).
            fleet.stop(timeout=settings.shutdown_grace_s + 5)
    finally:
        if embedded is not None:
            embedded.stop()


@dataclass
class FleetSession:
    settings: Settings  # with the URL and namespace the fleet really uses
    fleet: Fleet
    workdir: Path
    keep: bool = False  # keep the logs and data (set when something went wrong)


@contextmanager
def running_fleet(
    settings: Settings,
    console: Console,
    title: str,
    extra_env: dict[str, str] | None = None,
    tasks: Collection[str] | None = None,
) -> Iterator[FleetSession]:
    """The fleet as separate processes on an embedded valkey (or, with TRIBUNAL_REDIS_URL, on
    that server in a fresh namespace); stopped on exit, logs kept only when ``keep`` is set.
    The processes read their settings as usual (environment, fleet file) plus ``extra_env``;
    ``tasks``: the tasks the job will send (the model servers warm their prompt for those)."""
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (`timeout`, a service manager) must stop the fleet as Ctrl-C does: its
        # processes run in sessions of their own and would outlive a plain default exit.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        # Ctrl-C is KeyboardInterrupt even when started with SIGINT ignored (a job started
        # with `&` by a script): Python then installs no handler of its own, as `run` does.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    check_fleet(settings)  # a typo: one line before valkey, servers or processes start
    workdir = Path(tempfile.mkdtemp(prefix="tribunal-"))
    embedded = (
        None
        if settings.redis_url
        else EmbeddedRedis(workdir / "valkey", appendfsync=settings.embedded_appendfsync).start()
    )
    url = settings.redis_url or embedded.url  # type: ignore[union-attr]
    namespace = f"run{uuid.uuid4().hex[:8]}" if settings.redis_url else settings.namespace
    settings = settings.model_copy(update={"redis_url": url, "namespace": namespace})
    console.print(
        f"[bold]{title}[/], Redis {redact(url)}"
        + (" (embedded valkey, AOF on)" if embedded else f", namespace {namespace}")
    )
    with log_file(workdir) as logs:

        def announce(fleet: Fleet) -> None:
            console.print(
                f"starting {len(fleet.children)} processes "
                f"({', '.join(c.role for c in fleet.children)}); "
                f"logs in {logs.name} (kept only if something goes wrong)"
            )

        life = fleet_life(
            settings,
            url,
            embedded,
            log_to=logs,
            log_dir=workdir,
            extra_env=extra_env,
            warm_tasks=tasks,
            announce=announce,
        )
        keep = False
        try:
            with life as fleet:  # inside: a model server that fails keeps its logs
                session = FleetSession(settings, fleet, workdir)
                try:
                    yield session
                except KeyboardInterrupt:
                    console.print(STOPPING)  # before the stop, which takes a while
                    raise
                finally:
                    keep = session.keep
        except KeyboardInterrupt:
            raise
        except BaseException:
            keep = True
            raise
        finally:
            if keep:  # also when an error ends the session: then they matter
                console.print(f"the fleet's logs and data are kept in {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def wait_until_live(redis: Redis, settings: Settings, fleet: Fleet, console: Console) -> None:
    """Produce only once every process reads its stream, so the latencies measure labeling,
    not Python start-up (items produced earlier would simply wait: nothing is lost)."""
    deadline = time.monotonic() + 60
    roles, keys, ttl = expected_roles(settings), Keys(settings.namespace), settings.heartbeat_ttl_s
    with console.status("starting the fleet ..."):
        while missing_roles(read_heartbeats(redis, keys), roles, ttl):
            fleet.supervise()
            if time.monotonic() > deadline:
                console.print("[yellow]not every process is up after 60s; producing anyway")
                return
            time.sleep(0.2)
