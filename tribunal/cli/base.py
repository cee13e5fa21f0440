"""What every ``tribunal`` command shares: the global options, settings, errors on stderr."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.markup import escape

from common.lifecycle import StopFlag
from common.settings import Settings, load_settings
from common.validation import problems
from tribunal.ops.console import error_console

if TYPE_CHECKING:  # the consumers package is imported only by the commands that run one
    from consumers.engine.runtime import Runtime
    from producers.api import ProduceReport

T = TypeVar("T")

err = error_console()
log = logging.getLogger("tribunal")


@dataclass(frozen=True)
class CliConfig:
    """The global options (``--fleet``, ``--redis-url`` or their environment variables), as
    rq's ``CliConfig``: the app's callback puts one in typer's context, each command takes it
    with ``CliConfig.of(ctx)`` and makes its settings from it. A command that picks another
    fleet (``demo``, ``evaluate``) makes a copy (``with_fleet``); nothing is set from outside."""

    fleet: Path | None = None
    redis_url: str | None = None

    @classmethod
    def of(cls, ctx: typer.Context) -> CliConfig:
        obj = ctx.find_root().obj
        return obj if isinstance(obj, CliConfig) else cls()

    def with_fleet(self, fleet: Path) -> CliConfig:
        return replace(self, fleet=fleet)

    def settings(self, **overrides: Any) -> Settings:
        """The settings for this command, or a readable error and exit code 2."""
        if self.redis_url:
            overrides["redis_url"] = self.redis_url
        import tomllib

        from pydantic_settings import SettingsError

        try:
            return load_settings(self.fleet, **overrides)
        except FileNotFoundError as exc:
            say("[red]error:[/]", str(exc))
        except tomllib.TOMLDecodeError as exc:
            say("[red]error:[/]", f"fleet file {self.fleet} is not valid TOML: {exc}")
        except SettingsError as exc:  # an environment value that does not parse (JSON maps)
            say("[red]error:[/]", f"{exc}{f': {exc.__cause__}' if exc.__cause__ else ''}")
        except ValidationError as exc:
            say("[red]invalid settings:[/]", problems(exc))
        raise typer.Exit(2)


def settings(ctx: typer.Context, **overrides: Any) -> Settings:
    """The settings of the command ``ctx`` runs (``CliConfig.of(ctx).settings``)."""
    return CliConfig.of(ctx).settings(**overrides)


def say(prefix: str, message: str) -> None:
    """A line on stderr: ``prefix`` may be styled, ``message`` (user data) is printed as is."""
    if prefix:
        err.print(prefix, escape(message))
    else:
        err.print(escape(message))


@contextmanager
def clear_errors(s: Settings) -> Iterator[None]:
    """A readable line and an exit code instead of a traceback: tribunal's own errors by
    their branch (``common.errors``: 2 for a fleet that cannot run as configured — a
    setting, a model, a backend, an agreement scheme, a partition count, a member stopped on
    such an error — or unusable input; 1 when another process holds what is needed), 3 when
    Redis refuses or cannot be reached."""
    from redis import exceptions as rx

    from common.connection import redact
    from common.errors import TribunalError, exit_code

    try:
        yield
    except TribunalError as exc:
        say("[red]error:[/]", str(exc))
        raise typer.Exit(exit_code(exc)) from None
    except (rx.ConnectionError, rx.TimeoutError) as exc:
        say("[red]error:[/]", f"cannot reach Redis at {redact(s.redis_url or '')}: {exc}")
        raise typer.Exit(3) from None
    except (rx.RedisError, rx.RedisClusterException) as exc:
        say("[red]error:[/]", f"Redis at {redact(s.redis_url or '')} refused: {exc}")
        raise typer.Exit(3) from None


def needs_redis(s: Settings) -> Settings:
    if not s.redis_url:
        err.print(
            "[red]error:[/] no Redis configured: set TRIBUNAL_REDIS_URL or --redis-url "
            "(or use `tribunal run` / `tribunal demo`, which start an embedded server)"
        )
        raise typer.Exit(2)
    return s


def runtime(s: Settings, who: str = "") -> Runtime:
    """The consumer's runtime; ``who`` ("worker vader") names it in its stop lines, with its
    pid, which tells a worker's replicas apart ("worker vader, pid 4711")."""
    from consumers.engine.runtime import Runtime

    named = f"{who}, pid {os.getpid()}" if who else ""
    return Runtime.create(needs_redis(s), StopFlag(s.shutdown_grace_s, who=named).install())


class Interrupt:
    """Ctrl-C (SIGINT) or SIGTERM for a command that reads records and stores them. The first
    signal ends the input, even a read waiting on stdin or on a followed file, and what was
    read is still stored; a second one stops at once (``KeyboardInterrupt``) wherever it is.
    Either way the command then says what was stored and exits 128 + the signal number."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.last: str | None = None  # where the last record read came from
        self._reading = False
        self._again = False

    def install(self) -> Interrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._again = self.signum is not None
        self.signum = self.signum or signum
        if self._again or self._reading:
            raise KeyboardInterrupt

    def is_set(self) -> bool:
        return self.signum is not None

    @property
    def code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def reading(
        self, records: Iterable[T], handed: Callable[[T], None] = lambda record: None
    ) -> Iterator[T]:
        """``records`` until the first signal, which also cuts short a read waiting for input.
        ``handed`` is called as each one is handed on, where no signal can cut in any more
        (a signal cuts a read short anywhere inside it: what it was reading is lost)."""
        iterator = iter(records)
        while not self.is_set():
            self._reading = True
            try:
                record = next(iterator)
            except StopIteration:
                return
            except KeyboardInterrupt:
                if self._again:
                    raise
                break
            finally:
                self._reading = False
            handed(record)
            if isinstance(record, tuple) and record and isinstance(record[0], str):
                self.last = record[0]
            yield record
        say("", "stopping: storing the records read so far (Ctrl-C again to stop at once)")


def summarize(report: ProduceReport, s: Settings, interrupt: Interrupt, ending: str = "") -> None:
    """What ``produce`` did: one line of counts, after the records skipped unless each was
    logged as it was read (a WARNING of ``producers.api``, live even while following)."""
    logged = logging.getLogger("producers.api").isEnabledFor(logging.WARNING)
    for where, reason in [] if logged else report.invalid[:50]:
        say("[yellow]skipped[/]", f"{where}: {reason}")
    if len(report.invalid) > 50 and not logged:
        err.print(f"... and {len(report.invalid) - 50} more")
    counts = f"produced {report.produced}"
    if report.known:  # an id labeled within decided_ttl_s, or being labeled, is not added twice
        counts = f"produced {report.new} new, {report.known} already known (not added again)"
    line = (
        f"{counts}, skipped {len(report.invalid)} invalid"
        + (" (each named above)" if logged and report.invalid else "")
        + (f", waited {report.waited_s:.1f}s for the workers" if report.waited_s else "")
        + ending
    )
    if interrupt.is_set():
        name = signal.Signals(interrupt.signum or signal.SIGINT).name
        line = f"interrupted ({name}): {line}" + (
            f"; stopped reading after {interrupt.last}" if interrupt.last else ""
        )
    say("", line)
    if report.unreplicated:
        say(
            "[yellow]warning:[/]",
            f"{report.unreplicated} items were stored but not confirmed by "
            f"{s.wait_replicas} replicas within {s.wait_timeout_ms} ms: a failover now "
            "could lose them (produce them again to be sure: known ids are not added twice)",
        )
