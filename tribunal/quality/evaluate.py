"""``tribunal evaluate``: run a labeled file through the models and score what the rule trades.

Two ways to collect the answers:

- ``offline``: every worker model and the judge answer every item, in this process,
  batch by batch. Nothing is skipped, so every agreement scheme and threshold can be
  compared on the same answers; the timings are the models' own.
- ``fleet``: the items go through the real pipeline (Redis streams, one process per
  model) with ``audit_fraction = 1``, so the judge also answers every item the workers
  settled. This measures the deployment as configured; the votes are those present when
  each item was decided (a worker may not have voted yet), so the scheme comparison is
  exact only offline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.connection import connect
from common.errors import ConfigurationError
from common.keys import Keys, all_partitions
from common.schemas import Item, Vote
from common.settings import Settings
from common.validation import InvalidItem, validate_item
from consumers.backends import ask, backend_for
from consumers.decision import Rule
from consumers.judge import JUDGE_NAME
from producers.api import Producer, SourceRecord
from producers.mapping import Reading, UnusableSource
from producers.readers import records_of
from tribunal.quality.injection import score_injection
from tribunal.quality.scoring import (
    EvaluationReport,
    FleetReport,
    Observation,
    Skipped,
    evaluate_task,
)
from tribunal.serving.llama import serving

Progressed = Callable[[int], None]


@dataclass
class Collected:
    """The answers of a run, plus what could not be scored and why."""

    mode: str
    observations: list[Observation] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where or id, reason)
    seconds: float = 0.0


def load_items(
    records: Iterable[SourceRecord], settings: Settings
) -> tuple[list[Item], list[tuple[str, str]]]:
    """Validate records as the producer would; ids are required to match answers to items."""
    items: list[Item] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    rules = settings.input_rules
    for where, record in records:
        try:
            if isinstance(record, InvalidItem):
                raise record
            item = validate_item(record, rules)
        except InvalidItem as exc:
            skipped.append((where, str(exc)))
            continue
        if item.id in seen:
            skipped.append((where, f"duplicate id {item.id!r}"))
            continue
        seen.add(item.id)
        items.append(item)
    return items, skipped


def with_ids(records: Iterable[SourceRecord]) -> Iterable[SourceRecord]:
    """Records without an id get their row number: answers are matched to items by id."""
    for n, (where, record) in enumerate(records, 1):
        if isinstance(record, dict) and record.get("id") is None:
            record = {"id": f"row-{n}", **record}
        yield where, record


def tasks_named(source: str, reading: Reading, settings: Settings, sniff: int = 1000) -> set[str]:
    """The tasks the first ``sniff`` records name or default to (empty when the file cannot be
    read: ``run_evaluate`` says why)."""
    named: set[str] = set()
    try:
        for n, (_, record) in enumerate(records_of(source, reading.for_fleet(settings))):
            if n >= sniff:
                break
            if isinstance(record, dict) and isinstance(record.get("task"), str):
                named.add(record["task"])
    except (OSError, UnusableSource):
        pass
    return named


def collect_offline(
    items: Sequence[Item], settings: Settings, on_progress: Progressed = lambda n: None
) -> Collected:
    """Every worker and the judge on every item, in batches of ``batch_size``."""
    tasks = settings.all_tasks
    models = {**settings.workers, JUDGE_NAME: settings.judge}
    answers: dict[str, dict[str, Vote]] = {item.id: {} for item in items}
    started = time.perf_counter()
    for name, spec in models.items():
        backend = backend_for(spec, settings)
        backend.classify(items[:1])  # warm-up: lazy imports and lexicon loads are not timed
        for start in range(0, len(items), settings.batch_size):
            batch = items[start : start + settings.batch_size]
            call = ask(backend, name, batch, tasks)
            for item, vote in zip(batch, call.votes, strict=True):
                answers[item.id][name] = vote
            on_progress(len(batch))
    run = Collected("offline", seconds=time.perf_counter() - started)
    for item in items:
        judge = answers[item.id].pop(JUDGE_NAME)
        found = tasks[item.task].findings(item)
        twin, target = twin_of(item.metadata)
        run.observations.append(
            Observation(
                id=item.id,
                task=item.task,
                gold=item.gold,
                votes=list(answers[item.id].values()),
                judge=judge,
                twin_of=twin,
                target=target,
                flagged=[f.cue for f in found],
                escalate=bool(found) and tasks[item.task].injection == "review",
            )
        )
    return run


def twin_of(metadata: Mapping[str, object]) -> tuple[str | None, str | None]:
    """An injected twin's (``twin_of``, ``target``) from its metadata, as text (a value that
    is no label or id is reported by ``score_injection``, not dropped)."""
    twin, target = metadata.get("twin_of"), metadata.get("target")
    return (None if twin is None else str(twin)), (None if target is None else str(target))


def collect_fleet(
    items: Sequence[Item],
    settings: Settings,
    console: Console,
    on_progress: Progressed = lambda n: None,
    stall_s: float = 120.0,
) -> Collected:
    """The items through the real pipeline, every accepted label audited by the judge."""
    from tribunal.fleet.running import running_fleet, wait_until_live
    from tribunal.ops.finals import FinalRecords, collect, final_cursors

    audit_all = {"TRIBUNAL_AUDIT_FRACTION": "1"}
    outcome = FinalRecords()
    tasks = {item.task for item in items}
    title = "tribunal evaluate: the fleet"
    with running_fleet(settings, console, title, audit_all, tasks) as session:
        redis = connect(session.settings)
        wait_until_live(redis, session.settings, session.fleet, console)
        started = time.perf_counter()
        Producer(redis, session.settings).send([item.model_dump() for item in items])
        parts = all_partitions(session.settings.namespace, session.settings.partitions)
        cursors = final_cursors(session.settings, audits=True)
        last, seen = time.monotonic(), 0
        while True:
            session.fleet.supervise()
            collect(redis, cursors, outcome)
            audited = {a.id for a in outcome.audits}
            unaudited = sum(
                d.source == "workers" and d.id not in audited for d in outcome.decisions
            )
            done = outcome.ended - unaudited
            if done > seen:
                on_progress(done - seen)
                seen, last = done, time.monotonic()
            if outcome.ended >= len(items) and (not unaudited or _judge_idle(redis, parts)):
                break  # every audit in, or the judge is done (one it could not answer is dropped)
            if time.monotonic() - last > stall_s:
                session.keep = True
                raise RuntimeError(f"no progress for {stall_s:.0f}s: {outcome.ended} ended")
            time.sleep(0.1)
    run = Collected("fleet", seconds=time.perf_counter() - started)
    run.skipped += [(r.id, r.reason) for r in outcome.rejects]
    run.skipped += [(r.id, r.error) for r in outcome.dead]
    judged = {a.id: a.judge for a in reversed(outcome.audits)}  # the first audit wins
    for d in outcome.decisions:
        judge = d.judge if d.source == "judge" else judged.get(d.id)
        twin, target = twin_of(d.metadata)
        run.observations.append(
            Observation(
                id=d.id,
                task=d.task,
                gold=d.gold,
                votes=d.votes,
                judge=judge,
                twin_of=twin,
                target=target,
                flagged=[f.cue for f in d.flagged],
            )
        )
    return run


def _judge_idle(redis: Any, parts: Sequence[Keys]) -> bool:
    """No audit waits for the judge or is in its hands, in any partition."""
    for keys in parts:
        for group in redis.xinfo_groups(keys.judge) if redis.exists(keys.judge) else []:
            if group.get("lag") != 0 or group["pending"]:
                return False
    return True


def report(run: Collected, settings: Settings, source: str) -> EvaluationReport:
    """The report (written as JSON with ``model_dump(mode="json")``): one section per task,
    plus how the answers were collected."""
    rule = Rule.of(settings)
    by_task: dict[str, list[Observation]] = {}
    for o in run.observations:
        by_task.setdefault(o.task, []).append(o)
    return EvaluationReport(
        source=source,
        mode=run.mode,
        seconds=round(run.seconds, 3),
        fleet=FleetReport(
            workers={name: spec.backend for name, spec in settings.workers.items()},
            judge=settings.judge.backend,
            rule=rule.describe(),
            rule_params=rule,
            policy=settings.policy,
        ),
        skipped=[Skipped(where=w, reason=r) for w, r in run.skipped],
        tasks={
            task: evaluate_task(obs, rule, settings.all_tasks[task].labels)
            for task, obs in sorted(by_task.items())
        },
        observations=run.observations,
        injection={
            task: scored
            for task, obs in sorted(by_task.items())
            if (scored := score_injection(obs, rule, settings.all_tasks[task].labels)) is not None
        },
    )


def run_evaluate(
    settings: Settings,
    source: str,
    out_dir: Path,
    offline: bool = False,
    reading: Reading | None = None,
    console: Console | None = None,
) -> int:
    """The command: collect, score, print the summary, write JSON and HTML. Exit code."""
    from tribunal.ops.console import wide_console
    from tribunal.quality.report import print_evaluation
    from tribunal.quality.report_html import render_html

    console = console or wide_console()
    try:
        records = records_of(source, (reading or Reading()).for_fleet(settings))
        items, skipped = load_items(with_ids(records), settings)
    except OSError as exc:
        console.print(
            f"[red]error:[/] cannot read {escape(source)}: {exc.strerror}", soft_wrap=True
        )
        return 2
    except UnusableSource as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return 2
    if not items:
        console.print(f"[red]error:[/] no usable record in {escape(source)}", soft_wrap=True)
        by_reason: dict[str, list[str]] = {}
        for where, reason in skipped:
            by_reason.setdefault(reason, []).append(where)
        for reason, wheres in list(by_reason.items())[:10]:  # one line per reason, not per row
            more = f" (and {len(wheres) - 1} more)" if len(wheres) > 1 else ""
            console.print(f"  {escape(wheres[0])}{more}: {escape(reason)}", soft_wrap=True)
        return 2
    columns = (TextColumn("asking the models"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
        total = len(items) * (len(settings.workers) + 1) if offline else len(items)
        job = bar.add_task("evaluate", total=total)

        def advance(n: int) -> None:
            bar.advance(job, n)

        try:
            if offline:
                tasks = {item.task for item in items}
                with serving(settings, out_dir / "logs", tasks) as served:
                    run = collect_offline(items, served, advance)
            else:
                run = collect_fleet(items, settings, console, advance)
        except ConfigurationError as exc:
            console.print(f"[red]error:[/] {escape(str(exc))}")
            return 2
    run.skipped[:0] = skipped
    result = report(run, settings, source)
    print_evaluation(console, result)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "evaluation.json", out_dir / "evaluation.html"
    json_path.write_bytes(orjson.dumps(result.model_dump(mode="json"), option=orjson.OPT_INDENT_2))
    html_path.write_text(render_html(result), encoding="utf-8")
    console.print(
        f"wrote {json_path} and {html_path}; tune the rule with: tribunal calibrate {json_path}"
    )
    return 0
