"""``tribunal labels``, ``dlq``, ``acl``, ``status``, ``exporter``, ``health``: operating a
running fleet."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from common.connection import connect
from common.keys import all_partitions
from tribunal.cli.base import clear_errors, needs_redis, runtime, say, settings

dlq_app = typer.Typer(
    help="Inspect and replay dead letters (entries given up on after max_deliveries failed "
    "deliveries, or at once when no retry can help: an item of a task the judge's backend "
    "does not handle).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="Show at most this many.")] = 50,
    json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Show dead letters, oldest first: item id, where it died, deliveries, the error."""
    from tribunal.ops.dlq import as_json, dead_letters

    s = needs_redis(settings(ctx))
    with clear_errors(s):
        letters = dead_letters(connect(s), all_partitions(s.namespace, s.partitions), limit)
    for _, entry_id, letter in letters:
        if json:
            sys.stdout.buffer.write(as_json(letter) + b"\n")
        else:
            say(
                "",
                f"{letter.id}  {letter.group} on {letter.stream} after {letter.deliveries} "
                f"deliver{'y' if letter.deliveries == 1 else 'ies'} (entry {entry_id}): "
                f"{letter.error}",
            )
    if not json:
        say("", f"{len(letters)} dead letters shown")


@dlq_app.command("replay")
def dlq_replay(
    ctx: typer.Context,
    ids: Annotated[
        list[str] | None, typer.Option("--id", help="Item id to replay (repeatable).")
    ] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
) -> None:
    """Put dead-lettered items back on the items stream to be labeled afresh."""
    from tribunal.ops.dlq import replay

    if not ids and not replay_all:
        say("[red]error:[/]", "name items with --id ID (repeatable) or pass --all")
        raise typer.Exit(2)
    s = needs_redis(settings(ctx))
    partitions = all_partitions(s.namespace, s.partitions)
    with clear_errors(s):
        report = replay(connect(s), partitions, None if replay_all else set(ids or ()))
    for item_id, why in report.skipped:
        say("[yellow]skipped[/]", f"{item_id}: {why}")
    say("", f"replayed {len(report.replayed)}: {', '.join(report.replayed) or '-'}")
    raise typer.Exit(1 if report.skipped and not report.replayed else 0)


def acl(
    namespace: Annotated[str, typer.Option(help="Key namespace the fleet uses.")] = "tribunal",
) -> None:
    """Print a Redis ACL users file with the least each role needs (producer, serve, worker,
    aggregator, judge, labels, monitor). Passwords come from TRIBUNAL_ACL_<ROLE>_PASSWORD
    and are written only as SHA-256. Load it with redis-server --aclfile FILE (add your own
    admin user, and consider "user default off")."""
    import os

    from tribunal.ops.acl import ROLES, user_line

    missing = [
        f"TRIBUNAL_ACL_{r.upper()}_PASSWORD"
        for r in ROLES
        if not os.environ.get(f"TRIBUNAL_ACL_{r.upper()}_PASSWORD")
    ]
    if missing:
        say("[red]error:[/]", f"set {', '.join(missing)}")
        raise typer.Exit(2)
    for role in ROLES:
        print(user_line(role, os.environ[f"TRIBUNAL_ACL_{role.upper()}_PASSWORD"], namespace))


def status(
    ctx: typer.Context,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh in place.")] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, help="Seconds between refreshes with --watch.")
    ] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the snapshot as JSON.")] = False,
    stall_after: Annotated[
        float | None,
        typer.Option(
            help="Flag a group whose consumers are all idle this long, in seconds "
            "(default: heartbeat_ttl_s, 60).",
            min=0.1,
        ),
    ] = None,
) -> None:
    """Show every stream's length and every group's lag, pending entries and consumers,
    read from Redis now; throughput, judge-call rate, share settled by workers, rejects, dead
    letters, live consumers per role. Stalled groups are flagged."""
    from tribunal.ops.status import run_status

    s = needs_redis(settings(ctx))
    raise typer.Exit(run_status(s, watch, interval, as_json, stall_after))


def exporter(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port to serve /metrics on.")] = 9464,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "0.0.0.0",
) -> None:
    """Serve Prometheus metrics at /metrics: queue depth, lag, live consumers, fleet
    counters and histograms, all read from Redis at scrape time (tribunal_up 0 when
    Redis is down)."""
    from tribunal.ops.exporter import serve

    serve(needs_redis(settings(ctx)), port, host)


def health(
    ctx: typer.Context,
    role: Annotated[
        list[str] | None,
        typer.Option(
            "--role",
            help="Role to check (repeatable): worker:NAME, aggregator, judge, labels, serve.",
        ),
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="Count only consumers on this host (container).")
    ] = False,
) -> None:
    """Exit 0 when each role (default: every worker, the aggregator and the judge of the
    fleet file) has a live consumer per heartbeats, else 1 naming what is missing (2: a
    role no consumer can have; 3: Redis unreachable); for compose and Kubernetes
    healthchecks."""
    from tribunal.ops.health import run_health

    raise typer.Exit(run_health(needs_redis(settings(ctx)), role or (), local))


def labels(
    ctx: typer.Context,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write JSONL here (default stdout).")
    ] = None,
    follow: Annotated[bool, typer.Option(help="Keep waiting for new labels.")] = False,
    group: Annotated[
        str, typer.Option(help="Consumer group of this reader: each group gets every label once.")
    ] = "labels",
    forget: Annotated[
        bool,
        typer.Option(
            help="Instead of reading: delete this reader's group, so retention no longer "
            "keeps labels for a reader that is gone."
        ),
    ] = False,
) -> None:
    """Write final labels as JSONL: each label once per reader's group (--group), from where
    that group left off.

    The first read creates the group, and the final streams then keep every label until the
    group has read it (and retention_s has passed), whether or not you read again: a group
    you will not read again holds them until `labels --forget --group NAME`.

    Into a pipe, a label counts once the pipe's reader took it: closed early (| head -n 2) it
    ends quietly (exit 141) with those labels read, and the rest stay for the group's next
    reader."""
    from consumers.labels import OutputClosed, forget_reader, read_labels

    rt = runtime(settings(ctx))
    if forget:
        with clear_errors(rt.settings):  # a reader still reading (Busy): one line, exit 1
            deleted = forget_reader(rt, group)
        if not deleted:
            say("[red]error:[/]", f"no label reader's group {group!r} on the output stream")
            raise typer.Exit(1)
        say("", f"forgot the label reader {group!r}: retention no longer waits for it")
        return
    try:
        sink = open(output, "ab") if output else sys.stdout.buffer  # noqa: SIM115 - closed below
    except OSError as exc:
        say("[red]error:[/]", f"cannot write {output}: {exc.strerror}")
        raise typer.Exit(2) from None
    with clear_errors(rt.settings):
        try:
            with sink as out:
                written = read_labels(rt, out, group, follow)
        except (OutputClosed, BrokenPipeError):  # `labels | head`: quietly, as `seq 9 | head -1`
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stdout's last flush at exit: no error
            raise typer.Exit(128 + signal.SIGPIPE) from None
    say("", f"wrote {written} labels" + (f" to {output}" if output else ""))
