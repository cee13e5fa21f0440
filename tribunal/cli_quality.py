"""``tribunal evaluate`` and ``tribunal calibrate``: is the rule good on my data, and which rule?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import redis
import typer
from pydantic import ValidationError

from common.connection import connect
from tribunal.cli_base import needs_redis, say, settings, state


def evaluate(
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
    fmt: Annotated[
        str | None, typer.Option("--format", help="jsonl or csv (default: by file extension).")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Task for records that name none.")] = None,
) -> None:
    """Score the fleet on a labeled file: each worker's accuracy and agreement with the
    judge, pairwise agreement, how many items the workers settle, accuracy of accepted vs
    judged items, overall vs judge-only and each single worker, a confusion matrix, the
    model-time speedup, and majority / weighted / unanimous side by side. Without
    --offline the items go through the real fleet (embedded valkey unless a Redis URL is
    set) with every accepted label audited by the judge. Writes JSON and an HTML report."""
    from tribunal.demo import DEMO_FLEETS
    from tribunal.evaluate import tasks_named

    if state.fleet is None and source != "-":  # the default fleet knows sentiment only
        named = tasks_named(source, fmt, task)
        if len(named) == 1 and (only := named.pop()) in DEMO_FLEETS:
            say("", f"{only} items and no fleet file: using {DEMO_FLEETS[only]}")
            state.fleet = DEMO_FLEETS[only]
    from tribunal.evaluate import run_evaluate

    raise typer.Exit(run_evaluate(settings(), source, out, offline, fmt, task))


def calibrate(
    report: Annotated[
        Path | None,
        typer.Argument(help="evaluation.json of `tribunal evaluate`; omit to use live audits."),
    ] = None,
    target: Annotated[
        float | None,
        typer.Option(min=0, max=1, help="Agreement with the judge accepted labels must reach."),
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

    from common.decision import Rule
    from tribunal.calibrate import (
        Goal,
        live_acceptance,
        observations_from_report,
        read_audits,
        rule_of_report,
        run_calibrate,
    )
    from tribunal.queues import partitions_of
    from tribunal.report import wide_console

    s = settings()
    if target is None and judge_budget is None:
        target = 0.9
    goal = Goal(target, judge_budget, min_accepted)
    console = wide_console()
    rate: float | None = None
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
