"""``tribunal evaluate`` and ``tribunal calibrate``: is the rule good on my data, and which rule?"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import redis
import typer
from pydantic import ValidationError

from common.connection import connect
from common.settings import Settings
from producers.api import SourceRecord
from producers.follow import Idle, Lines, Position
from producers.mapping import HOLDS, CsvColumns, Reading, UnusableSource, flag_of
from producers.readers import FORMATS, followed, records_of
from tribunal.cli.base import CliConfig, clear_errors, needs_redis, say, settings

T = TypeVar("T")


def column_option(
    item_field: str, what: str, where: str = "CSV column with {what} (or JSONL field)."
) -> tuple[Any, str]:
    """The option naming where ``item_field`` is read from, ``where`` its help."""
    option = typer.Option(flag_of(item_field), help=where.format(what=what))
    return Annotated[str, option], getattr(CsvColumns(), item_field)


# The options of the one reader (``producers.readers.Reading``), defined once here and given
# to every command that reads records by ``reads_records``: name -> (annotation, default).
READ_OPTIONS: dict[str, tuple[Any, Any]] = {
    "fmt": (
        Annotated[
            str | None,
            typer.Option("--format", help=f"{' or '.join(FORMATS)} (default: by file extension)."),
        ],
        None,
    ),
    "task": (
        Annotated[
            str | None,
            typer.Option(
                "--task",
                help="Task of records that name none (default: the default_task setting, or "
                "the fleet file's task when it defines one only).",
            ),
        ],
        None,
    ),
    "strict": (
        Annotated[
            bool,
            typer.Option(
                "--strict",
                help="Refuse fields (JSONL) and columns (CSV) that are not item fields, "
                "instead of keeping them in metadata.",
            ),
        ],
        False,
    ),
    **{f"{field}_col": column_option(field, what) for field, what in HOLDS.items()},
}


def reads_records(
    command: Callable[..., None], options: dict[str, tuple[Any, Any]] = READ_OPTIONS
) -> Callable[..., None]:
    """Give ``command`` the reader's options (``READ_OPTIONS``, after its own); it receives
    them as one ``reading: Reading``. So produce and evaluate read a file the same way
    and cannot drift apart option by option. ``options``: those to offer (``serve`` reads
    no file: no --format)."""
    own = inspect.signature(command, eval_str=True)
    kept = [p for p in own.parameters.values() if p.name != "reading"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
        for name, (kind, default) in options.items()
    ]

    @functools.wraps(command)
    def with_reading(*args: Any, **kwargs: Any) -> None:
        given = {"fmt": None} | {name: kwargs.pop(name) for name in options}
        if given["fmt"] not in (None, *FORMATS):
            say("[red]error:[/]", f"--format {given['fmt']}: one of {', '.join(FORMATS)}")
            raise typer.Exit(2)
        columns = CsvColumns(**{field: given[f"{field}_col"] for field in HOLDS})
        reading = Reading(given["fmt"], columns, given["task"], given["strict"])
        command(*args, reading=reading, **kwargs)

    signature = own.replace(parameters=[*kept, *added])
    with_reading.__signature__ = signature  # type: ignore[attr-defined]
    with_reading.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    return with_reading


def open_records(source: str, reading: Reading, s: Settings) -> Iterator[SourceRecord]:
    """The records of ``source`` read for this fleet, or one line saying why not, exit 2."""
    return opened(source, lambda: records_of(source, reading.for_fleet(s)))


def open_followed(
    source: str,
    reading: Reading,
    s: Settings,
    follow: bool,
    stop: Callable[[], bool],
    resume: Position | None,
    complete_only: bool,
) -> tuple[Iterator[SourceRecord | Idle], Lines]:
    """``open_records`` for ``produce`` (``producers.readers.followed``)."""
    how = reading.for_fleet(s)
    return opened(source, lambda: followed(source, how, follow, stop, resume, complete_only))


def opened(source: str, open_source: Callable[[], T]) -> T:
    try:
        return open_source()
    except OSError as exc:
        say("[red]error:[/]", f"cannot read {source}: {exc.strerror}")
    except UnusableSource as exc:
        say("[red]error:[/]", str(exc))
    raise typer.Exit(2)


@contextmanager
def logs_above_the_bar() -> Iterator[None]:
    """Entered while a rich progress bar is live: log lines go through the stderr it redirects,
    which prints them above the bar. The handlers set up before hold the real stderr and
    would write through the bar."""
    proxy = sys.stderr  # a FileProxy once the bar is live on a terminal
    real = getattr(proxy, "rich_proxied_file", proxy)
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and h.stream is real and real is not proxy
    ]
    for handler in handlers:
        handler.setStream(proxy)
    try:
        yield
    finally:
        for handler in handlers:
            handler.setStream(real)


@reads_records
def evaluate(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="Labeled JSONL or CSV file (gold optional).")],
    offline: Annotated[
        bool,
        typer.Option(
            help="Ask every model directly in this process (no Redis): every model answers "
            "every item, so the schemes compare exactly."
        ),
    ] = False,
    out: Annotated[
        Path, typer.Option(help="Directory for evaluation.json and evaluation.html.")
    ] = Path("tribunal-evaluation"),
    *,
    reading: Reading,
) -> None:
    """Score the fleet on a labeled file: each worker's accuracy and agreement with the
    judge, pairwise agreement, how many items the workers settle, accuracy of accepted vs
    judged items, overall vs judge-only and each single worker, a confusion matrix, the
    model-time speedup, and majority / weighted / unanimous side by side. Without
    --offline the items go through the real fleet (embedded valkey unless a Redis URL is
    set) with every accepted label audited by the judge. A record whose metadata names
    "twin_of" (a clean item's id) and "target" (a label) is an injected twin: the prompt-
    injection table gives each model's flip rate (bench/adversarial/). Writes JSON and an
    HTML report."""
    from tribunal.demo import DEMO_FLEETS
    from tribunal.quality.evaluate import tasks_named

    config = CliConfig.of(ctx)
    if config.fleet is None and source != "-":  # the default fleet knows sentiment only
        named = tasks_named(source, reading, config.settings())
        if len(named) == 1 and (only := named.pop()) in DEMO_FLEETS:
            say("", f"{only} items and no fleet file: using {DEMO_FLEETS[only]}")
            config = config.with_fleet(DEMO_FLEETS[only])
    from consumers.decision import Rule
    from tribunal.quality.evaluate import run_evaluate

    s = config.settings()
    try:  # before minutes of labeling, not after
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        say("[red]error:[/]", f"--out {out}: cannot make a directory there ({exc.strerror})")
        raise typer.Exit(2) from None
    with clear_errors(s):
        Rule.of(s)  # an unknown agreement scheme: refused before minutes of labeling
        code = run_evaluate(s, source, out, offline, reading)
    raise typer.Exit(code)


@reads_records
def teach(
    ctx: typer.Context,
    source: Annotated[
        str, typer.Argument(help="Labeled JSONL or CSV file: each record's gold becomes a lesson.")
    ],
    *,
    reading: Reading,
) -> None:
    """Give the fleet's students gold labels to learn from (workers with backend "student"):
    each record's text with its gold label becomes a lesson, as the judge's labels do. A
    record without a gold label of its task's set is reported with its line and skipped."""
    import uuid

    from common.validation import InvalidItem, validate_item
    from consumers.lessons import Lesson
    from consumers.lessons import teach as add_lessons

    s = needs_redis(settings(ctx))
    with clear_errors(s):  # Redis gone: one line now, not after reading the whole file
        client = connect(s)
        client.ping()
    if not s.has_students:
        say("", 'note: no worker of this fleet is a student (backend "student"); storing anyway')
    lessons: list[Lesson] = []
    skipped = 0
    for where, record in open_records(source, reading, s):
        try:
            if isinstance(record, InvalidItem):
                raise record
            item = validate_item({"id": uuid.uuid4().hex, **record}, s.input_rules)
            if item.gold is None:  # a gold label outside the task's set is refused above
                raise InvalidItem("no gold label: nothing to teach")
        except InvalidItem as exc:
            say("[yellow]skipped[/]", f"{where}: {exc}")
            skipped += 1
            continue
        lessons.append(Lesson.of(item, item.gold, "gold"))
    with clear_errors(s):
        taught = add_lessons(client, s.namespace, s.partitions, lessons)
    noun = "lesson" if taught == 1 else "lessons"
    say("", f"taught {taught} {noun}" + (f", skipped {skipped}" if skipped else ""))
    raise typer.Exit(0 if taught or not skipped else 2)


def calibrate(
    ctx: typer.Context,
    report: Annotated[
        Path | None,
        typer.Argument(help="evaluation.json of `tribunal evaluate`; omit to use live audits."),
    ] = None,
    target: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=1,
            help="Share of accepted labels that must agree with the judge (default: 0.9).",
        ),
    ] = None,
    judge_budget: Annotated[
        float | None, typer.Option(min=0, max=1, help="Largest share of items for the judge.")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Only this task's items.")] = None,
    min_accepted: Annotated[
        int, typer.Option(min=1, help="Ignore rules accepting fewer items than this.")
    ] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Recommend the agreement rule, quorum and confidence threshold that let the workers
    settle the most items while their labels agree with the judge at least --target
    (default 0.9), or the most trustworthy rule within --judge-budget. Prints the
    trade-off table and the fleet-file lines to paste. Without REPORT it reads the live
    fleet's audits (set audit_fraction), which can only judge rules at least as strict."""
    import orjson

    from consumers.decision import Rule
    from tribunal.ops.console import wide_console
    from tribunal.ops.queues import partitions_of
    from tribunal.quality.calibrate import (
        Goal,
        live_acceptance,
        observations_from_report,
        read_audits,
        rule_of_report,
        run_calibrate,
    )

    s = settings(ctx)
    if target is None and judge_budget is None:
        target = 0.9
    goal = Goal(target, judge_budget, min_accepted)
    console = wide_console()
    rate: float | None = None
    with clear_errors(s):
        live = Rule.of(s)
    if report is not None:
        try:
            evaluation = orjson.loads(report.read_bytes())
            observations = observations_from_report(evaluation, task)
            live = rule_of_report(evaluation) or live
        except (OSError, ValueError, ValidationError) as exc:
            say("[red]error:[/]", f"cannot use {report}: {exc}")
            raise typer.Exit(2) from None
    else:
        redis_client = connect(needs_redis(s))
        try:
            observations = read_audits(redis_client, partitions_of(s), task)
            rate = live_acceptance(redis_client, s)
        except redis.RedisError as exc:
            say("[red]error:[/]", f"cannot read the audits from Redis: {exc}")
            raise typer.Exit(3) from None
        if rate is None or not observations:
            say(
                "[red]error:[/]",
                "no audits in this fleet yet: set audit_fraction (e.g. 0.05) and let it run, "
                "or calibrate from `tribunal evaluate`'s evaluation.json",
            )
            raise typer.Exit(2)
    code = run_calibrate(console, observations, live, goal, rate, as_json)
    raise typer.Exit(code)
