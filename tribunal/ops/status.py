"""``tribunal status``: queue depth, lag and liveness of the fleet, read from Redis at call time.

The readings come from ``tribunal.ops.queues`` (streams, groups, heartbeats, counters, all
partitions merged); this module turns them into one snapshot, as a table or as JSON.
Rates of outcomes (judge calls, agreement, audits) divide the fleet counters of
``common.metrics``, which the Lua scripts increment only when a step really happened.
"""

from __future__ import annotations

import sys
import time

from redis import Redis
from redis.exceptions import RedisClusterException, RedisError
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from common import metrics
from common.keys import Keys
from common.lifecycle import StopFlag
from common.settings import Settings
from consumers.reliability import wilson_lower
from tribunal.ops.console import error_console, wide_console
from tribunal.ops.learning import cost_of, read_learning
from tribunal.ops.queues import (
    StatSample,
    expected_roles,
    live_by_role,
    quick_client,
    read_fleet_streams,
    read_heartbeats,
    read_stats,
    recent_outputs,
)
from tribunal.ops.readmodels import (
    AuditCounts,
    Decisions,
    GroupReading,
    PromptCache,
    Snapshot,
    Throughput,
)


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def snapshot(redis: Redis, settings: Settings, stall_after_s: float | None = None) -> Snapshot:
    """Everything ``tribunal status`` shows (``Snapshot.to_json`` for its JSON); raises
    ``RedisError`` when Redis cannot be read. ``stall_after_s`` (seconds) defaults to
    ``heartbeat_ttl_s``."""
    keys = Keys(settings.namespace)
    ttl = settings.heartbeat_ttl_s
    beats = read_heartbeats(redis, keys)
    streams, stalled = read_fleet_streams(redis, settings, beats, stall_after_s or ttl)
    stats = read_stats(redis, settings)
    decisions = {
        s.labels.get("source", "?"): int(s.value) for s in stats if s.name == metrics.DECISIONS
    }
    escalations = int(sum(s.value for s in stats if s.name == metrics.ESCALATIONS))
    flagged = {s.labels.get("task", "?"): int(s.value) for s in stats if s.name == metrics.FLAGGED}
    votes: dict[str, dict[str, int]] = {}
    for s in stats:
        if s.name == metrics.VOTES:
            by_label = votes.setdefault(s.labels.get("worker", "?"), {})
            by_label[s.labels.get("label", "?")] = int(s.value)
    # A worker whose every vote came late has a row too, of none: where the counted voters are
    # workers of the fleet file status reads (another fleet's names would be no news).
    if votes and set(votes) <= set(settings.workers):
        for name in settings.workers:
            votes.setdefault(name, {})
    total = sum(decisions.values())
    by_outcome: dict[str, int] = {}
    for s in stats:
        if s.name == metrics.AUDITS:
            outcome = s.labels.get("outcome", "?")
            by_outcome[outcome] = by_outcome.get(outcome, 0) + int(s.value)
    audits = AuditCounts(
        agree=by_outcome.pop("agree", 0),
        disagree=by_outcome.pop("disagree", 0),
        failed=by_outcome.pop("failed", 0),
        other=by_outcome,
    )
    live = live_by_role(beats, ttl)
    by_name = {s.stream: s for s in streams}
    cost = cost_of(stats, settings.worker_tiers)
    voters, thresholds = read_learning(redis, settings)
    return Snapshot(
        namespace=settings.namespace,
        partitions=settings.partitions,
        time=round(time.time(), 3),
        streams=tuple(streams),
        stalled=tuple(stalled),
        throughput=recent_outputs(redis, settings),
        decisions=Decisions(total=total, by_source=decisions),
        escalations=escalations,
        judge_call_rate=_ratio(escalations, total),
        agreement_rate=_ratio(decisions.get("workers", 0), total),
        audits=audits,
        audit_disagreement=_ratio(audits.disagree, audits.judged),
        rejects=by_name["rejects"].entries_added,
        dead_letters=by_name["dead"].entries_added,
        votes=votes,
        live_consumers={role: len(live.get(role, [])) for role in expected_roles(settings)}
        | {role: len(names) for role, names in live.items()},
        heartbeat_ttl_s=ttl,
        prompt_cache=_prompt_cache(stats),
        flagged=flagged,
        reviews=int(sum(s.value for s in stats if s.name == metrics.REVIEWS)),
        reliability=voters,
        thresholds=thresholds,
        cost=cost,
        audit_agreement_at_least=(
            round(wilson_lower(audits.agree / audits.judged, audits.judged), 4)
            if audits.judged
            else None
        ),
    )


def _prompt_cache(stats: list[StatSample]) -> dict[str, PromptCache]:
    tokens: dict[str, dict[str, int]] = {}
    for s in stats:
        if s.name in (metrics.PROMPT_TOKENS, metrics.CACHED_TOKENS):
            by_kind = tokens.setdefault(s.labels.get("worker", "?"), {})
            by_kind[s.name] = by_kind.get(s.name, 0) + int(s.value)
    out = {}
    for worker, counts in sorted(tokens.items()):
        prompt, cached = counts.get(metrics.PROMPT_TOKENS, 0), counts.get(metrics.CACHED_TOKENS, 0)
        out[worker] = PromptCache(prompt, cached, _ratio(cached, prompt))
    return out


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def _audit_cell(snap: Snapshot) -> str:
    audits = snap.audits
    if not audits.judged and not audits.failed:
        return "none (set audit_fraction to sample accepted labels for the judge)"
    failed = f", {audits.failed} failed" if audits.failed else ""
    bound = snap.audit_agreement_at_least
    floor = f" (agreement >= {bound:.1%}, 95% Wilson bound)" if bound is not None else ""
    return (
        f"{audits.judged} judged, {_percent(snap.audit_disagreement)} disagree with the "
        f"accepted label{floor}{failed}"
    )


def _cost_cell(snap: Snapshot) -> str:
    cost = snap.cost
    if cost is None or cost.per_label_s is None:
        return "-"
    text = f"{cost.per_label_s:.3f} s of model time per label (every model call it took)"
    if cost.judge_per_item_s is not None and cost.ratio is not None:
        text += (
            f", the judge alone {cost.judge_per_item_s:.3f} s per item ({cost.ratio:.2f}x: "
            "below 1 the cascade costs less)"
        )
    if len(cost.by_tier) > 2:  # tiers: which of them the labels' model seconds went to
        text += "; by tier: " + ", ".join(f"{t.tier} {t.per_label_s:.3f}" for t in cost.by_tier)
    return text


def _throughput_cell(tp: Throughput) -> str:
    """The rate, and how many labels it counts. Past the read cap only the newest entries are
    read (``tribunal.ops.queues.recent_outputs``): the rate is theirs, and the minute held at
    least that many labels, maybe many more."""
    if tp.capped:
        return (
            f"{tp.per_s:.2f} labels/s over the newest {tp.outputs} labels (at least "
            f"{tp.outputs} in the last minute)"
        )
    return f"{tp.per_s:.2f} labels/s ({tp.outputs} in the last minute)"


def _consumers_cell(group: GroupReading, shown: int = 3) -> str:
    lines = [
        f"{c.name}  idle {c.idle_s:.1f}s  pending {c.pending}" for c in group.consumers[:shown]
    ]
    if len(group.consumers) > shown:
        lines.append(f"… {len(group.consumers) - shown} more, idle longer")
    return "\n".join(lines) or "-"


def render(snap: Snapshot) -> RenderableType:
    """The snapshot as rich tables: queues first, then outcomes and the fleet."""
    parts = f" · {snap.partitions} partitions (summed)" if snap.partitions > 1 else ""
    title = f"tribunal · namespace {snap.namespace}{parts}"
    queues = Table(
        title=title,
        title_justify="left",
        # without it a newcomer reads ready's count as items and finds one too many
        caption="ready holds notices, not items: each names the items a batch of votes made "
        "decidable, and a later vote on an open item names it again",
        caption_justify="left",
    )
    for column in ("stream", "length", "added", "group", "lag", "pending", "live"):
        queues.add_column(column, justify="left" if column in ("stream", "group") else "right")
    queues.add_column("consumers (idle, pending)")
    queues.add_column("state")
    for stream in snap.streams:
        head = [stream.stream, str(stream.length), str(stream.entries_added)]
        for group in stream.groups or [None]:
            if group is None:
                queues.add_row(*head, "-", "", "", "", "", "")
                continue
            state = f"[red]STALLED[/] {group.stall_reason}" if group.stalled else "[green]ok"
            lag = "?" if group.lag is None else str(group.lag)
            queues.add_row(
                *head,
                group.group + ("" if group.exists else " [dim](not created)"),
                lag,
                str(group.pending),
                f"{group.live_consumers}/{len(group.consumers)}",
                _consumers_cell(group),
                state,
            )
            head = ["", "", ""]
    facts = Table.grid(padding=(0, 2))
    d = snap.decisions
    by_workers, by_judge = d.by_source.get("workers", 0), d.by_source.get("judge", 0)
    rows = [
        ("throughput", _throughput_cell(snap.throughput)),
        ("decisions", f"{d.total} ({by_workers} by workers, {by_judge} by the judge)"),
        (
            "judge-call rate",
            f"{_percent(snap.judge_call_rate)} ({snap.escalations} escalations per {d.total} "
            "decisions; one that ended as a dead letter counts too; audits below)",
        ),
        ("settled by workers", _percent(snap.agreement_rate)),
        ("audits", _audit_cell(snap)),
        ("cost", _cost_cell(snap)),
        ("rejects / dead letters", f"{snap.rejects} / {snap.dead_letters} (all time)"),
        ("injection flagged", _flagged_cell(snap.flagged, snap.reviews)),
        ("live consumers", ", ".join(f"{r} {n}" for r, n in snap.live_consumers.items())),
    ]
    for worker, labels in sorted(snap.votes.items()):
        detail = ", ".join(f"{label} {n}" for label, n in sorted(labels.items()))
        rows.append((f"votes {worker}", f"{sum(labels.values())} ({detail or 'none counted'})"))
    if snap.votes:  # why the counts differ between workers
        rows.append(
            (
                "",
                "a vote counts if it reaches Redis before its item is settled: one that came "
                "in while the decision was being made (early_exit: the slowest worker) is "
                "counted here though the label's record lists only the votes it was decided "
                "on; later ones are dropped; abstain: the model's answer held no usable label",
            )
        )
    for t in snap.thresholds:
        rule = (
            "accepts nothing yet: the judge decides (no threshold keeps the bound on the "
            "labels so far)"
            + (f"; {t.explored:.0%} of items still go past tier 0" if t.explored else "")
            if t.threshold is None
            else f"accepts at posterior >= {t.threshold:g}: agreement >= {t.bound:.1%} "
            f"(95% bound, {t.items:g} labeled items)"
        )
        rows.append((f"posterior rule {t.task}", rule))
    for row in snap.reliability:
        rows.append(
            (
                f"agrees with the judge {row.voter}",
                f"{_percent(row.agreement)} of {row.labels} judged items ({row.task})",
            )
        )
    for worker, cache in snap.prompt_cache.items():
        rows.append(
            (
                f"prompt cache {worker}",
                f"{_percent(cache.hit_rate)} of {cache.prompt_tokens:,} prompt tokens reused",
            )
        )
    for name, value in rows:
        facts.add_row(f"[bold]{name}", value)
    return Group(queues, facts)


def _render_or_error(
    redis: Redis, settings: Settings, stall_after_s: float | None
) -> RenderableType:
    try:
        return render(snapshot(redis, settings, stall_after_s))
    except (RedisError, RedisClusterException) as exc:
        return Panel(f"[red]cannot read Redis:[/] {escape(str(exc))}", title="tribunal")


def run_status(
    settings: Settings,
    watch: bool = False,
    interval_s: float = 2.0,
    as_json: bool = False,
    stall_after_s: float | None = None,
) -> int:
    """The command: one snapshot (a table, or JSON on stdout), or a live table until Ctrl-C.
    Returns the exit code: 3 when Redis cannot be read."""
    try:  # a cluster client reaches a node as it is made
        redis = quick_client(settings)
    except (RedisError, RedisClusterException) as exc:
        return _unreadable(exc)
    console = wide_console()
    if watch and not console.is_terminal:  # a pipe or a file: a table per refresh, appended
        stop = StopFlag().install()
        while True:  # a closed pipe ends it quietly (PipedConsole), as `vmstat 1 | head`
            console.print(_render_or_error(redis, settings, stall_after_s))
            if stop.wait(interval_s):  # and the state when stopped, as the live table ends
                console.print(_render_or_error(redis, settings, stall_after_s))
                return 0
    if watch:
        stop = StopFlag().install()
        with Live(_render_or_error(redis, settings, stall_after_s), console=console) as live:
            while not stop.wait(interval_s):
                live.update(_render_or_error(redis, settings, stall_after_s), refresh=True)
        return 0
    try:
        snap = snapshot(redis, settings, stall_after_s)
    except (RedisError, RedisClusterException) as exc:
        return _unreadable(exc)
    if as_json:
        sys.stdout.buffer.write(snap.to_json() + b"\n")
    else:
        console.print(render(snap))
    return 0


def _unreadable(exc: Exception) -> int:
    error_console().print(f"[red]error:[/] cannot read Redis: {escape(str(exc))}")
    return 3


def _flagged_cell(flagged: dict[str, int], reviews: int) -> str:
    """Final labels of items the injection detector flagged, by task (common.injection), and
    how many of them went to a person."""
    if not flagged:
        return "0"
    detail = ", ".join(f"{task} {n}" for task, n in sorted(flagged.items()))
    to_review = f"; {reviews} to review (the review stream)" if reviews else ""
    return f"{sum(flagged.values())} ({detail}){to_review}"
