"""``tribunal produce``: records from a file, a followed file or stdin onto the items stream."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from common.connection import connect
from producers.api import SourceRecord
from producers.follow import Idle
from producers.mapping import Reading
from tribunal.cli.base import Interrupt, clear_errors, err, needs_redis, say, settings, summarize
from tribunal.cli.quality import logs_above_the_bar, open_followed, reads_records


@reads_records
def produce(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="JSONL or CSV file, or - for stdin.")],
    follow: Annotated[
        bool, typer.Option(help="Keep reading as the file grows, through rotations (tail -F).")
    ] = False,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Save how far the file is stored here; a later produce with the same "
            "checkpoint resumes after it.",
            dir_okay=False,
        ),
    ] = None,
    chunk_size: Annotated[
        int, typer.Option(help="Most items per pipelined XADD round trip.", min=1)
    ] = 500,
    wait_for_redis: Annotated[
        bool | None,
        typer.Option(
            help="While Redis is unreachable, wait and retry instead of failing "
            "(default: with --follow, which runs unattended)."
        ),
    ] = None,
    *,
    reading: Reading,
) -> None:
    """Validate records and add them to the items stream.

    Each bad record is reported with its line and skipped; the rest still go. Records
    are stored as soon as no more input is ready, else in chunks. When the slowest
    worker falls more than max_backlog items behind, producing waits.
    Records: {"id": optional, "task": "sentiment", "text": "...", "text_b": for pair
    tasks, "metadata": {...}}. Fields and columns other than the mapped ones become
    metadata (--strict refuses them).
    """
    from producers.api import Producer, ProduceReport
    from producers.follow import Checkpoint

    s = needs_redis(settings(ctx))
    stop = Interrupt().install()
    name = "stdin" if source == "-" else source
    saved = Checkpoint(checkpoint) if checkpoint else None
    if saved is not None and source == "-":
        say("[red]error:[/]", "--checkpoint needs a file: stdin cannot be read again")
        raise typer.Exit(2)
    try:
        resume = saved.load() if saved is not None else None
    except (OSError, ValueError) as exc:
        say("[red]error:[/]", str(exc))
        raise typer.Exit(2) from None
    complete_only = saved is not None  # a checkpoint never points into an unfinished line
    records, lines = open_followed(source, reading, s, follow, stop.is_set, resume, complete_only)
    # Where the last record handed to the producer ends: when a chunk is stored, every
    # record handed on before it is (the producer sends all it holds).
    handed_up_to = [lines.checkpoint()]

    def handed(record: SourceRecord | Idle) -> None:
        if saved is not None and not isinstance(record, Idle):  # at IDLE a CSV row may be
            handed_up_to[0] = lines.checkpoint()  # half read: its lines are not a record yet

    def stored(count: int) -> None:  # after each chunk: what was handed on is stored
        progress.advance(job, count)
        if saved is not None:
            saved.save(handed_up_to[0])

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.completed} produced"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[wait]}"),
        console=err,
        transient=False,
        disable=not err.is_terminal,  # in a pipe or a log file the summary line says it all
    )
    with clear_errors(s), progress, logs_above_the_bar():
        job = progress.add_task(
            f"producing from {escape(name)}" + (" (following; Ctrl-C to stop)" if follow else ""),
            total=None,  # a count, not a share: with a total, rich stops the clock when it is met
            wait="",
        )

        def show_wait(backlog: int) -> None:
            wait = f"waiting for the workers (backlog {backlog} > {s.max_backlog})"
            progress.update(job, wait=wait if backlog else "")

        producer = Producer(
            connect(s),
            s,
            chunk_size=chunk_size,
            wait_for_redis=follow if wait_for_redis is None else wait_for_redis,
            on_wait=show_wait,
        )
        report = ProduceReport()  # kept when sending stops part-way
        try:
            with clear_errors(s):
                producer.send(stop.reading(records, handed), on_progress=stored, report=report)
            stored(0)  # the lines read after the last chunk were all invalid: read, too
        except typer.Exit:  # Redis failed: what went before it is stored
            summarize(report, s, stop, " before the error")
            raise
        except KeyboardInterrupt:  # a second Ctrl-C
            summarize(
                report,
                s,
                stop,
                "; stopped at once: the chunk being sent may be stored or "
                "not (produce again to be sure: known ids are not added twice)",
            )
            raise typer.Exit(stop.code) from None
    summarize(report, s, stop)
    if lines.unfinished:  # complete_only: a checkpoint never points into it
        say("note:", f"{name}'s last line has no newline yet: left for the next produce")
    if stop.is_set():
        raise typer.Exit(stop.code)
    raise typer.Exit(1 if report.invalid and not report.produced else 0)
