"""``tribunal demo``: a real fleet labels the bundled tickets on an embedded Redis.

Starts valkey (unless ``TRIBUNAL_REDIS_URL`` is set; then a fresh namespace is
used), the consumers as separate processes, produces the sample, writes a few
malformed entries by hand to show rejects, waits until every item has ended
somewhere final, and prints what happened.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from redis import Redis
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.connection import connect
from common.keys import RECORD_FIELD, Keys
from common.schemas import Decision, RawRecord
from common.settings import Settings
from producers.api import Producer, ProduceReport
from tribunal.fleet.running import running_fleet, wait_until_live
from tribunal.fleet.supervisor import Fleet
from tribunal.ops.finals import FinalRecords, collect, final_cursors
from tribunal.ops.status import render, snapshot

SAMPLES = {"sentiment": "tickets.jsonl", "similar_ticket": "ticket_pairs.jsonl"}
FLEETS = Path(__file__).resolve().parent / "fleets"
# Real language models under llama.cpp, for both tasks (examples/local.toml is this file).
LOCAL_FLEET = FLEETS / "local.toml"
# A sample the real fleet labels in about 3 minutes on 2 cores, once the models are fetched.
LOCAL_LIMITS = {"sentiment": 40, "similar_ticket": 24}
# With --offline: the default fleet's lexicon models only know sentiment; pairs get their
# own offline fleet.
DEMO_FLEETS = {"similar_ticket": FLEETS / "similar_offline.toml"}

# Entries written to the items stream by hand, bypassing the producer's checks,
# to show that a consumer rejects them with a reason and keeps going.
BAD_ENTRIES: list[dict[bytes, bytes]] = [
    {RECORD_FIELD: b'{"id": "bad-json", "task": "sentiment", "text": "unterminated'},
    {RECORD_FIELD: b'{"id": "bad-empty", "task": "sentiment", "text": "   "}'},
    {RECORD_FIELD: b'{"id": "bad-task", "task": "horoscope", "text": "Will my refund come?"}'},
    {RECORD_FIELD: b'{"id": "bad-type", "task": "sentiment", "text": 42}'},
    {b"text": b"an entry without the item field"},
]


def load_sample(task: str, limit: int | None = None) -> list[RawRecord]:
    path = resources.files("producers") / "samples" / SAMPLES[task]
    records = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    return records[:limit] if limit else records


@dataclass(frozen=True)
class DemoOptions:
    task: str = "sentiment"
    limit: int | None = None
    rate: float | None = None  # items/s; None: all at once
    watch: bool = False  # show the live status table instead of a progress bar
    stall_s: float = 120.0


def run_demo(settings: Settings, options: DemoOptions, console: Console) -> bool:
    """Run the demo; True when every item ended as exactly one label, reject or dead letter."""
    title = f"tribunal demo: task {options.task}"
    with running_fleet(settings, console, title, tasks=[options.task]) as session:
        ok = _drive(session.settings, options, console, session.fleet)
        session.keep = not ok
    return ok


def _drive(settings: Settings, options: DemoOptions, console: Console, fleet: Fleet) -> bool:
    redis = connect(settings)
    records = load_sample(options.task, options.limit)
    wait_until_live(redis, settings, fleet, console)
    started = time.time()
    expected = len(records) + len(BAD_ENTRIES)
    produced = Produced()
    producing = threading.Thread(
        target=_produce, args=(redis, settings, records, options.rate, produced), daemon=True
    )
    producing.start()
    outcome = FinalRecords()
    cursors = final_cursors(settings)
    last_progress, seen = time.monotonic(), 0
    interrupted = False
    with _display(console, options.watch, expected) as show:
        try:
            while outcome.ended < expected:
                fleet.supervise()
                collect(redis, cursors, outcome)
                show(redis, settings, outcome.ended)
                if outcome.ended > seen or producing.is_alive():
                    seen, last_progress = outcome.ended, time.monotonic()
                elif time.monotonic() - last_progress > options.stall_s:
                    console.print(
                        f"[red]stalled: {expected - outcome.ended} items not settled "
                        f"after {options.stall_s:.0f}s without progress"
                    )
                    break
                time.sleep(0.1)
        except KeyboardInterrupt:  # Ctrl-C: what was labeled so far, then a graceful stop
            interrupted = True
    elapsed = time.time() - started
    if interrupted:  # the summary covers what was produced before the stop
        produced.stop.set()
        producing.join(10)  # it finishes the chunk it is sending
        collect(redis, cursors, outcome)
        tickets = produced.sample.produced
        console.print(
            f"[yellow]interrupted[/] after {elapsed:.0f}s of labeling: {tickets} of "
            f"{len(records)} tickets and {produced.malformed} of {len(BAD_ENTRIES)} malformed "
            f"entries produced, {outcome.ended} ended"
        )
        # (an item can end a moment before its chunk's count is in)
        records, expected = records[:tickets], max(tickets + produced.malformed, outcome.ended)
    print_summary(console, records, outcome, expected, elapsed)
    if interrupted:
        raise KeyboardInterrupt
    ids = (
        [d.id for d in outcome.decisions]
        + [r.id for r in outcome.rejects]
        + [d.id for d in outcome.dead]
    )
    every_sample_ended = {r["id"] for r in records} <= set(ids)
    return outcome.ended == expected and len(ids) == len(set(ids)) and every_sample_ended


@dataclass
class Produced:
    """What the producing thread has written so far (the sample's counts, then the
    malformed entries), for a summary cut short by Ctrl-C."""

    sample: ProduceReport = field(default_factory=ProduceReport)
    malformed: int = 0
    stop: threading.Event = field(default_factory=threading.Event)  # Ctrl-C: produce no more


def _produce(
    redis: Redis,
    settings: Settings,
    records: list[RawRecord],
    rate: float | None,
    produced: Produced,
) -> None:
    """The sample (at ``rate`` items/s, or all at once), then the malformed entries, until
    ``produced.stop`` is set."""
    chunk = max(1, int(rate / 10)) if rate else max(len(records), 1)
    until_stopped = itertools.takewhile(lambda _: not produced.stop.is_set(), records)
    Producer(redis, settings, chunk_size=chunk).send(
        until_stopped, rate=rate, report=produced.sample
    )
    keys = Keys(settings.namespace)
    for fields in BAD_ENTRIES:
        if produced.stop.is_set():
            return
        redis.xadd(keys.items, fields)  # type: ignore[arg-type]
        produced.malformed += 1


@contextmanager
def _display(console: Console, watch: bool, total: int) -> Iterator[Any]:
    """A progress bar, or with ``watch`` the live ``tribunal status`` table."""
    if watch:
        with Live(console=console, refresh_per_second=4) as live:

            def show(redis: Redis, settings: Settings, done: int) -> None:
                live.update(render(snapshot(redis, settings)))

            yield show
        console.print()
        return
    columns = (TextColumn("labeling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        job = bar.add_task("labeling", total=total)
        yield lambda redis, settings, done: bar.update(job, completed=done)


def _pct(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.0f}%)" if whole else "0"


def print_summary(
    console: Console,
    records: Sequence[RawRecord],
    outcome: FinalRecords,
    expected: int,
    elapsed: float,
) -> None:
    """The labels, a summary and the agreement with gold of a demo run: ``records`` are the
    sample as produced, ``expected`` the entries written (with the malformed ones)."""
    decisions = outcome.decisions
    texts = {r["id"]: r["text"] for r in records}
    sample = Table(title="Some labels", title_justify="left")
    for column in ("id", "ticket", "label", "by", "gold"):
        sample.add_column(
            column,
            overflow="ellipsis",
            no_wrap=column != "ticket",
            max_width=60 if column == "ticket" else None,
        )
    for d in decisions[:8]:
        sample.add_row(d.id, texts.get(d.id, "")[:120], d.label, d.source, d.gold or "-")
    console.print(sample)

    by_source = Counter(d.source for d in decisions)
    latencies = sorted(d.decided_at - d.produced_at for d in decisions if d.produced_at)
    summary = Table(title="Summary", title_justify="left", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row(
        "items", f"{expected} ({len(records)} tickets + {expected - len(records)} malformed)"
    )
    summary.add_row("accepted by workers", _pct(by_source["workers"], len(decisions)))
    summary.add_row("sent to judge", _pct(by_source["judge"], len(decisions)))
    summary.add_row("rejected", str(len(outcome.rejects)))
    summary.add_row("dead letters", str(len(outcome.dead)))
    summary.add_row("not settled", str(expected - outcome.ended))
    summary.add_row("throughput", f"{outcome.ended / elapsed:.1f} items/s over {elapsed:.1f}s")
    if latencies:
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
        summary.add_row(
            "latency p50 / p95",
            f"{statistics.median(latencies) * 1000:.0f} ms / {p95 * 1000:.0f} ms",
        )
    cost = cost_line(decisions)
    if cost:
        summary.add_row("model time per label", cost)
    console.print(summary)
    console.print(agreement_table(decisions))
    for r in outcome.rejects:
        console.print(f"  rejected {r.id}: {r.reason}", markup=False, soft_wrap=True)
    for dead in outcome.dead:
        console.print(f"  dead letter {dead.id}: {dead.error}", markup=False, soft_wrap=True)


def cost_line(decisions: Sequence[Decision]) -> str:
    """Model seconds per label (each record's ``model_seconds``) against the judge's seconds
    per item it decided: what a label would cost if the judge labeled all."""
    judged = [d.judge.latency_ms / 1000 for d in decisions if d.judge and d.judge.latency_ms]
    if not decisions or not judged:
        return ""
    per_label = sum(d.model_seconds for d in decisions) / len(decisions)
    judge_alone = sum(judged) / len(judged)
    return (
        f"{per_label:.2f} s (the judge alone: {judge_alone:.2f} s per item, "
        f"{per_label / judge_alone:.2f}x)"
    )


def agreement_table(decisions: Sequence[Decision]) -> Table:
    """Agreement with the gold labels, per worker, for the judge, and for the fleet's output."""
    hits: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    latency: defaultdict[str, list[float]] = defaultdict(list)  # each vote's ms per item
    for d in decisions:
        gold = d.gold
        if gold is None:
            continue
        voters = [v for v in d.votes if v.label is not None]
        if d.judge:
            voters.append(d.judge)
        for v in voters:
            seen[v.worker] += 1
            hits[v.worker] += v.label == gold
            latency[v.worker].append(v.latency_ms or 0.0)
        for name, ok in (
            ("fleet (final label)", d.label == gold),
            (f"fleet, {d.source}-decided", d.label == gold),
        ):
            seen[name] += 1
            hits[name] += ok
    table = Table(
        title="Agreement with gold labels",
        title_justify="left",
        caption="a worker counts only on items it voted on before two others settled them; "
        "items/s: the model's answers per second within its batches",
        caption_justify="left",
    )
    table.add_column("who")
    table.add_column("agree", justify="right")
    table.add_column("of", justify="right")
    table.add_column("rate", justify="right")
    table.add_column("items/s", justify="right")
    for who in sorted(seen, key=lambda w: (w.startswith("fleet"), w)):
        ms = statistics.fmean(latency[who]) if latency[who] else 0.0
        table.add_row(
            who,
            str(hits[who]),
            str(seen[who]),
            f"{hits[who] / seen[who]:.0%}",
            f"{1000 / ms:.1f}" if ms > 0 else "-",
        )
    return table
