"""What every ``tribunal`` command shares: the global options, settings, errors on stderr."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from common.lifecycle import StopFlag
from common.settings import Settings, load_settings

if TYPE_CHECKING:  # the consumers package is imported only by the commands that run one
    from consumers.runtime import Runtime

err = Console(stderr=True, soft_wrap=True)  # one line per message, even in a pipe
log = logging.getLogger("tribunal")


class State:
    fleet: Path | None = None
    redis_url: str | None = None


state = State()


def say(prefix: str, message: str) -> None:
    """A line on stderr: ``prefix`` may be styled, ``message`` (user data) is printed as is."""
    if prefix:
        err.print(prefix, escape(message))
    else:
        err.print(escape(message))


def settings(**overrides: Any) -> Settings:
    """The settings for this command, or a readable error and exit code 2."""
    if state.redis_url:
        overrides["redis_url"] = state.redis_url
    try:
        return load_settings(state.fleet, **overrides)
    except FileNotFoundError as exc:
        say("[red]error:[/]", str(exc))
    except ValidationError as exc:
        say("[red]invalid settings:[/]", f"\n{exc}")
    raise typer.Exit(2)


@contextmanager
def clear_errors(s: Settings) -> Iterator[None]:
    """A readable line and an exit code instead of a traceback: 2 for a fleet set up
    differently from the one in Redis or a model that cannot be built or served, 3 when
    Redis refuses or cannot be reached."""
    from redis import exceptions as rx

    from common.connection import redact
    from common.keys import PartitionMismatch
    from consumers.backends import BackendError
    from tribunal.serving.llama import ServerFailed
    from tribunal.serving.models import ModelUnavailable

    try:
        yield
    except (PartitionMismatch, BackendError, ServerFailed, ModelUnavailable) as exc:
        say("[red]error:[/]", str(exc))
        raise typer.Exit(2) from None
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


def runtime(s: Settings) -> Runtime:
    from consumers.runtime import Runtime

    return Runtime.create(needs_redis(s), StopFlag(s.shutdown_grace_s).install())
