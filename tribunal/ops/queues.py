"""The fleet as Redis sees it now: streams, groups, lag, consumers, heartbeats and counters.

Every number about queues comes from the streams themselves at the moment of the call
(XLEN, XINFO STREAM / GROUPS / CONSUMERS): a counter kept by the consumers would drift
the first time one died between its work and its increment; the streams cannot. With
several partitions each stream is read per partition and merged (sums of lengths, lags
and pending entries). ``tribunal status`` and the exporter both read through here; the
readings are the frozen models of ``tribunal.ops.readmodels``.

Throughput is the number of ``output`` entries whose stream id (Redis's own clock, read
with TIME, so a skewed client clock does not matter) falls in the last 60 s: one
``XREVRANGE output + <now-60s> COUNT 1000`` per partition. It needs no state, so a single
``tribunal status`` answers it. The COUNT cap bounds the cost at high rates: when it is
hit, the rate is the cap over the time those newest entries span.

A group is *stalled* when work waits for it (lag or pending > 0) and nobody is taking
it: none of its consumers has a live heartbeat (``heartbeat_ttl_s``), or all have been
idle (no read attempt, XINFO's ``idle``) longer than the threshold. Groups the fleet file
implies (one per worker model, ``aggregator``, ``judge``) are listed even before their
first consumer created them, with the whole stream as lag: a fleet that never started
shows as stalled, not as nothing. A label reader's group (on the output stream) with no
consumer and nothing pending is not: its reader ended cleanly (``labels`` without --follow
reads what is there and leaves; a follower was stopped), and its lag is labels kept for
its next read. A reader that died is, while its consumer stays in the group: until the
janitor forgets an idle consumer with nothing pending (``forget_idle_consumers``, an hour);
then only the lag shows it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError
from redis.retry import Retry

from common import metrics
from common.connection import connect, server_time, text
from common.keys import (
    AGGREGATOR_GROUP,
    JUDGE_GROUP,
    Keys,
    all_partitions,
    worker_group,
)
from common.settings import Settings, fleet_roles
from tribunal.ops.readmodels import ConsumerReading, GroupReading, StreamReading, Throughput

# The streams status shows, in an item's order; the later tiers' streams ("tier:K") go
# after the items where the fleet has them (``stream_names``).
STREAMS = ("items", "ready", "judge", "output", "rejects", "dead", "audits", "review")
THROUGHPUT_WINDOW_S = 60
THROUGHPUT_CAP = 1000


def quick_client(settings: Settings, timeout_s: float = 3.0) -> Redis:
    """A client that fails within seconds: status, health and scrapes must answer, not wait
    out the consumers' long socket timeout (one retry rides over a dropped connection)."""
    return connect(settings, timeout_s=timeout_s, retry=Retry(NoBackoff(), 1))


def expected_groups(settings: Settings) -> dict[str, list[str]]:
    """Consumer groups the fleet file implies, by stream."""
    tiers = {
        ("items" if k == 0 else f"tier:{k}"): [worker_group(name) for name in tier]
        for k, tier in enumerate(settings.worker_tiers)
    }
    return {**tiers, "ready": [AGGREGATOR_GROUP], "judge": [JUDGE_GROUP]}


def stream_names(expected: Mapping[str, Sequence[str]]) -> list[str]:
    """``STREAMS`` with the later tiers' streams that ``expected`` names after the items."""
    tiers = [name for name in expected if name.startswith("tier:")]
    return [STREAMS[0], *tiers, *STREAMS[1:]]


def expected_roles(settings: Settings) -> list[str]:
    """Heartbeat roles the fleet file runs (replicas share their model's role)."""

    return list(dict.fromkeys(role.partition("#")[0] for role, _ in fleet_roles(settings)))


def role_of(consumer: str) -> str:
    """``worker:vader@host:123`` -> ``worker:vader`` (``consumer_name`` makes it)."""
    return consumer.partition("@")[0]


def read_heartbeats(redis: Redis, keys: Keys) -> dict[str, float]:
    """Consumer name -> seconds since its loop last came round (the set forgets after 1 h),
    by Redis's clock, which stamped them: this host's may be minutes off."""
    rows: Any = redis.zrange(keys.heartbeats, 0, -1, withscores=True)
    now = server_time(redis, keys.heartbeats)  # the clock that stamped them
    return {text(name): max(now - float(score), 0.0) for name, score in rows}


def live_by_role(heartbeats: Mapping[str, float], ttl_s: float) -> dict[str, list[str]]:
    live: dict[str, list[str]] = {}
    for name, age in sorted(heartbeats.items()):
        if age <= ttl_s:
            live.setdefault(role_of(name), []).append(name)
    return live


def read_streams(
    redis: Redis, keys: Keys, expected: Mapping[str, Sequence[str]]
) -> list[StreamReading]:
    """Length, entries ever added, and every group with its consumers, for each stream of
    ``stream_names(expected)`` (in that order) in the partition of ``keys``; the groups
    ``expected`` names by stream are added, not created, where missing. Not flagged yet
    (``flag_stalls``). Three pipelined round trips whatever the number of groups."""
    pipe = redis.pipeline(transaction=False)
    names = stream_names(expected)
    for name in names:
        pipe.xinfo_stream(keys.stream(name))
    streams: list[StreamReading] = []
    for name, info in zip(names, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(info, ResponseError):  # "no such key": nothing was ever added
            info = None
        elif isinstance(info, Exception):
            raise info
        streams.append(
            StreamReading(
                stream=name,
                key=keys.stream(name),
                partitions=None,
                exists=info is not None,
                length=int(info["length"]) if info else 0,
                entries_added=int(info.get("entries-added") or 0) if info else 0,
                last_id=text(info["last-generated-id"]) if info else None,
                groups=(),
            )
        )
    present = [s for s in streams if s.exists]
    pipe = redis.pipeline(transaction=False)
    for stream in present:
        pipe.xinfo_groups(stream.key)
    group_rows: list[tuple[StreamReading, Any]] = [
        (stream, row) for stream, rows in zip(present, pipe.execute(), strict=True) for row in rows
    ]
    pipe = redis.pipeline(transaction=False)
    for stream, row in group_rows:
        pipe.xinfo_consumers(stream.key, row["name"])
    groups: dict[str, list[GroupReading]] = {s.stream: [] for s in streams}
    for (stream, row), consumers in zip(group_rows, pipe.execute(), strict=True):
        groups[stream.stream].append(_group_reading(row, consumers, stream.last_id))
    for stream in streams:
        found = groups[stream.stream]
        have = {g.group for g in found}
        for group in expected.get(stream.stream, ()):
            if group not in have:  # its consumers will create it at id 0: all of it is lag
                found.append(_not_created(group, stream.length))
    return [replace(s, groups=tuple(groups[s.stream])) for s in streams]


def _group_reading(row: Any, consumers: Any, stream_last_id: str | None) -> GroupReading:
    """A group from its XINFO GROUPS row and XINFO CONSUMERS reply (redis-py's dicts)."""
    lag = row.get("lag")
    last_delivered = text(row["last-delivered-id"])
    entries_read = row.get("entries-read")
    return GroupReading(
        group=text(row["name"]),
        exists=True,
        lag=None if lag is None else int(lag),
        lag_unknown=lag is None and last_delivered != stream_last_id,
        pending=int(row["pending"]),
        entries_read=None if entries_read is None else int(entries_read),
        last_delivered_id=last_delivered,
        consumers=tuple(
            ConsumerReading(
                name=text(c["name"]), pending=int(c["pending"]), idle_s=int(c["idle"]) / 1000
            )
            for c in sorted(consumers, key=lambda c: int(c["idle"]))
        ),
    )


def _not_created(group: str, length: int) -> GroupReading:
    return GroupReading(
        group=group,
        exists=False,
        lag=length,
        lag_unknown=False,
        pending=0,
        entries_read=0,
        last_delivered_id=None,
        consumers=(),
    )


def read_fleet_streams(
    redis: Redis, settings: Settings, heartbeats: Mapping[str, float], stall_after_s: float
) -> tuple[list[StreamReading], list[str]]:
    """Every stream of every partition, stalls flagged per partition (a healthy consumer on
    one partition must not hide a dead one pinned to another), then merged per stream: sums
    of lengths, lags and pending entries, a consumer reading several partitions listed
    once, a group stalled when it is in any partition (its reason then names the partition).
    Returns (streams, ``stream/group`` of the stalled groups); ``heartbeats`` as
    ``read_heartbeats`` returns them, ``stall_after_s`` in seconds."""
    expected = expected_groups(settings)
    ttl = settings.heartbeat_ttl_s
    parts = [
        flag_stalls(read_streams(redis, keys, expected), heartbeats, ttl, stall_after_s)
        for keys in partitions_of(settings)
    ]
    if len(parts) == 1:
        streams = parts[0]
    else:
        streams = [_merge_stream(same) for same in zip(*parts, strict=True)]
    stalled = [f"{s.stream}/{g.group}" for s in streams for g in s.groups if g.stalled]
    return streams, stalled


def _merge_stream(parts: Sequence[StreamReading]) -> StreamReading:
    """One stream's readings, partition ``p`` at index ``p``, as one."""
    groups: dict[str, list[tuple[int, GroupReading]]] = {}
    for p, part in enumerate(parts):
        for group in part.groups:
            groups.setdefault(group.group, []).append((p, group))
    return StreamReading(
        stream=parts[0].stream,
        key=parts[0].key.replace(":{0}:", ":{*}:"),
        partitions=len(parts),
        exists=any(p.exists for p in parts),
        length=sum(p.length for p in parts),
        entries_added=sum(p.entries_added for p in parts),
        last_id=None,
        groups=tuple(_merge_group(same) for same in groups.values()),
    )


def _merge_group(parts: Sequence[tuple[int, GroupReading]]) -> GroupReading:
    """One group's flagged readings, each with its partition, as one."""
    consumers: dict[str, ConsumerReading] = {}
    for _, part in parts:
        for c in part.consumers:
            seen = consumers.setdefault(c.name, replace(c, pending=0))
            consumers[c.name] = replace(
                seen, pending=seen.pending + c.pending, idle_s=min(seen.idle_s, c.idle_s)
            )
    stalls = [f"partition {p}: {g.stall_reason}" for p, g in parts if g.stalled]
    groups = [g for _, g in parts]
    live = {c.name for g in groups for c in g.consumers if c.live}
    return GroupReading(
        group=groups[0].group,
        stalled=bool(stalls),
        stall_reason="; ".join(stalls) or None,
        live_consumers=len(live),
        exists=all(g.exists for g in groups),
        lag=_sum_or_none(g.lag for g in groups),
        lag_unknown=any(g.lag_unknown for g in groups),
        pending=sum(g.pending for g in groups),
        entries_read=_sum_or_none(g.entries_read for g in groups),
        last_delivered_id=None,
        consumers=tuple(sorted(consumers.values(), key=lambda c: c.idle_s)),
    )


def _sum_or_none(values: Iterable[int | None]) -> int | None:
    total = 0
    for v in values:
        if v is None:
            return None
        total += int(v)
    return total


def partitions_of(settings: Settings) -> list[Keys]:
    return all_partitions(settings.namespace, settings.partitions)


def flag_stalls(
    streams: Iterable[StreamReading], heartbeats: Mapping[str, float], ttl_s: float, after_s: float
) -> list[StreamReading]:
    """The streams with each consumer's ``live`` (heartbeat within ``ttl_s`` seconds), each
    group's ``live_consumers``, and ``stalled`` with its ``stall_reason`` as the module
    docstring defines (idle longer than ``after_s`` seconds)."""
    return [
        replace(
            s,
            groups=tuple(
                _flag_group(g, heartbeats, ttl_s, after_s, on_demand=s.stream == "output")
                for g in s.groups
            ),
        )
        for s in streams
    ]


def _flag_group(
    group: GroupReading,
    heartbeats: Mapping[str, float],
    ttl_s: float,
    after_s: float,
    on_demand: bool,
) -> GroupReading:
    consumers = tuple(
        replace(c, live=heartbeats.get(c.name, float("inf")) <= ttl_s) for c in group.consumers
    )
    live = [c for c in consumers if c.live]
    waiting = group.lag_unknown or (group.lag or 0) > 0 or group.pending > 0
    reason = None
    if not waiting or (on_demand and not consumers and not group.pending):
        pass  # a label reader that ended cleanly: the labels wait for its next read
    elif not consumers:
        reason = "no consumer is reading it"
    elif not live:
        reason = f"no consumer with a heartbeat in the last {ttl_s:g}s"
    elif min(c.idle_s for c in consumers) > after_s:
        reason = f"every consumer idle for more than {after_s:g}s"
    return replace(
        group,
        consumers=consumers,
        live_consumers=len(live),
        stalled=reason is not None,
        stall_reason=reason,
    )


@dataclass(frozen=True)
class StatSample:
    """One field of the stats hash: ``suffix`` is ``sum``/``count`` for histogram totals."""

    name: str
    labels: dict[str, str]
    suffix: str
    value: float


def read_stats(redis: Redis, settings: Settings) -> list[StatSample]:
    """The fleet counters, summed over the partitions' stats hashes."""
    totals: dict[str, float] = {}
    for keys in partitions_of(settings):
        raw: Any = redis.hgetall(keys.stats)
        for key, value in raw.items():
            totals[text(key)] = totals.get(text(key), 0.0) + float(value)
    samples = []
    for stat_field, value in totals.items():
        name_labels, suffix = stat_field, ""
        for tail in ("sum", "count"):
            if stat_field.endswith("|" + tail):
                name_labels, suffix = stat_field[: -len(tail) - 1], tail
        name, labels = metrics.parse_field(name_labels)
        samples.append(StatSample(name, labels, suffix, value))
    return samples


def recent_outputs(redis: Redis, settings: Settings) -> Throughput:
    """Final labels per second over the last minute, over every partition (see the module
    docstring)."""
    outputs, per_s, capped = 0, 0.0, False
    for keys in partitions_of(settings):
        now_ms = int(server_time(redis, keys.output) * 1000)
        rows: Any = redis.xrevrange(
            keys.output, "+", str(now_ms - THROUGHPUT_WINDOW_S * 1000), count=THROUGHPUT_CAP
        )
        span_s = float(THROUGHPUT_WINDOW_S)
        if len(rows) >= THROUGHPUT_CAP:
            capped = True
            oldest_ms = int(text(rows[-1][0]).split("-")[0])
            span_s = max((now_ms - oldest_ms) / 1000, 0.001)
        outputs += len(rows)
        per_s += len(rows) / span_s
    return Throughput(
        window_s=THROUGHPUT_WINDOW_S, outputs=outputs, capped=capped, per_s=round(per_s, 3)
    )
