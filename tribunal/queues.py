"""The fleet as Redis sees it now: streams, groups, lag, consumers, heartbeats and counters.

Every number about queues comes from the streams themselves at the moment of the call
(XLEN, XINFO STREAM / GROUPS / CONSUMERS): a counter kept by the consumers would drift
the first time one died between its work and its increment; the streams cannot. With
several partitions each stream is read per partition and merged (sums of lengths, lags
and pending entries). ``tribunal status`` and the exporter both read through here.

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
shows as stalled, not as nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError
from redis.retry import Retry

from common import metrics
from common.connection import connect, text
from common.keys import AGGREGATOR_GROUP, JUDGE_GROUP, Keys, all_partitions, worker_group
from common.settings import Settings

STREAMS = ("items", "tiebreak", "ready", "judge", "output", "rejects", "dead", "audits")
THROUGHPUT_WINDOW_S = 60
THROUGHPUT_CAP = 1000
Snapshot = dict[str, Any]


def quick_client(settings: Settings, timeout_s: float = 3.0) -> Redis:
    """A client that fails within seconds: status, health and scrapes must answer, not wait
    out the consumers' long socket timeout (one retry rides over a dropped connection)."""
    return connect(settings, timeout_s=timeout_s, retry=Retry(NoBackoff(), 1))


def expected_groups(settings: Settings) -> dict[str, list[str]]:
    """Consumer groups the fleet file implies, by stream."""
    backups = settings.backup_workers
    first = [worker_group(name) for name in settings.workers if name not in backups]
    return {
        "items": first,
        "tiebreak": [worker_group(name) for name in backups],
        "ready": [AGGREGATOR_GROUP],
        "judge": [JUDGE_GROUP],
    }


def expected_roles(settings: Settings) -> list[str]:
    """Heartbeat roles the fleet file runs (replicas share their model's role)."""
    from tribunal.fleet import fleet_roles as processes

    return list(dict.fromkeys(role.partition("#")[0] for role, _ in processes(settings)))


def role_of(consumer: str) -> str:
    """``worker:vader@host:123`` -> ``worker:vader`` (see ``common.consumer.consumer_name``)."""
    return consumer.partition("@")[0]


def read_heartbeats(redis: Redis, keys: Keys) -> dict[str, float]:
    """Consumer name -> seconds since its loop last came round (the set forgets after 1 h)."""
    now = time.time()
    rows: Any = redis.zrange(keys.heartbeats, 0, -1, withscores=True)
    return {text(name): max(now - float(score), 0.0) for name, score in rows}


def live_by_role(heartbeats: Mapping[str, float], ttl_s: float) -> dict[str, list[str]]:
    live: dict[str, list[str]] = {}
    for name, age in sorted(heartbeats.items()):
        if age <= ttl_s:
            live.setdefault(role_of(name), []).append(name)
    return live


def read_streams(
    redis: Redis, keys: Keys, expected: Mapping[str, Sequence[str]]
) -> list[dict[str, Any]]:
    """Length, entries ever added, and every group with its consumers, for each stream;
    three pipelined round trips whatever the number of groups."""
    pipe = redis.pipeline(transaction=False)
    for name in STREAMS:
        pipe.xinfo_stream(getattr(keys, name))
    streams: list[dict[str, Any]] = []
    for name, info in zip(STREAMS, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(info, ResponseError):  # "no such key": nothing was ever added
            info = None
        elif isinstance(info, Exception):
            raise info
        streams.append(
            {
                "stream": name,
                "key": getattr(keys, name),
                "exists": info is not None,
                "length": int(info["length"]) if info else 0,
                "entries_added": int(info.get("entries-added") or 0) if info else 0,
                "last_id": text(info["last-generated-id"]) if info else None,
                "groups": [],
            }
        )
    present = [s for s in streams if s["exists"]]
    pipe = redis.pipeline(transaction=False)
    for stream in present:
        pipe.xinfo_groups(stream["key"])
    group_rows: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (stream, row) for stream, rows in zip(present, pipe.execute(), strict=True) for row in rows
    ]
    pipe = redis.pipeline(transaction=False)
    for stream, row in group_rows:
        pipe.xinfo_consumers(stream["key"], row["name"])
    for (stream, row), consumers in zip(group_rows, pipe.execute(), strict=True):
        lag = row.get("lag")
        last_delivered = text(row["last-delivered-id"])
        stream["groups"].append(
            {
                "group": text(row["name"]),
                "exists": True,
                "lag": None if lag is None else int(lag),
                "lag_unknown": lag is None and last_delivered != stream["last_id"],
                "pending": int(row["pending"]),
                "entries_read": row.get("entries-read"),
                "last_delivered_id": last_delivered,
                "consumers": [
                    {
                        "name": text(c["name"]),
                        "pending": int(c["pending"]),
                        "idle_s": int(c["idle"]) / 1000,
                    }
                    for c in sorted(consumers, key=lambda c: int(c["idle"]))
                ],
            }
        )
    for stream in streams:
        have = {g["group"] for g in stream["groups"]}
        for group in expected.get(stream["stream"], ()):
            if group not in have:  # its consumers will create it at id 0: all of it is lag
                stream["groups"].append(
                    {
                        "group": group,
                        "exists": False,
                        "lag": stream["length"],
                        "lag_unknown": False,
                        "pending": 0,
                        "entries_read": 0,
                        "last_delivered_id": None,
                        "consumers": [],
                    }
                )
    return streams


def read_fleet_streams(
    redis: Redis, settings: Settings, heartbeats: Mapping[str, float], stall_after_s: float
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every stream of every partition, stalls flagged per partition (a healthy consumer on
    one partition must not hide a dead one pinned to another), then merged per stream: sums
    of lengths, lags and pending entries, a consumer reading several partitions listed
    once, a group stalled when it is in any partition. Returns (streams, stalled)."""
    expected = expected_groups(settings)
    ttl = settings.heartbeat_ttl_s
    parts = [read_streams(redis, keys, expected) for keys in partitions_of(settings)]
    for p, part in enumerate(parts):
        for name in flag_stalls(part, heartbeats, ttl, stall_after_s):
            for stream in part:
                for group in stream["groups"]:
                    if len(parts) > 1 and f"{stream['stream']}/{group['group']}" == name:
                        group["stall_reason"] = f"partition {p}: {group['stall_reason']}"
    if len(parts) == 1:
        streams = parts[0]
    else:
        streams = [_merge_stream(same) for same in zip(*parts, strict=True)]
    stalled = [f"{s['stream']}/{g['group']}" for s in streams for g in s["groups"] if g["stalled"]]
    return streams, stalled


def _merge_stream(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        for group in part["groups"]:
            groups.setdefault(group["group"], []).append(group)
    return {
        "stream": parts[0]["stream"],
        "key": parts[0]["key"].replace(":{0}:", ":{*}:"),
        "partitions": len(parts),
        "exists": any(p["exists"] for p in parts),
        "length": sum(p["length"] for p in parts),
        "entries_added": sum(p["entries_added"] for p in parts),
        "last_id": None,
        "groups": [_merge_group(same) for same in groups.values()],
    }


def _merge_group(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    consumers: dict[str, dict[str, Any]] = {}
    for part in parts:
        for c in part["consumers"]:
            seen = consumers.setdefault(c["name"], {**c, "pending": 0})
            seen["pending"] += c["pending"]
            seen["idle_s"] = min(seen["idle_s"], c["idle_s"])
    stalls = [p["stall_reason"] for p in parts if p["stalled"]]
    live = {c["name"] for p in parts for c in p["consumers"] if c["live"]}
    return {
        "group": parts[0]["group"],
        "stalled": bool(stalls),
        "stall_reason": "; ".join(stalls) or None,
        "live_consumers": len(live),
        "exists": all(p["exists"] for p in parts),
        "lag": _sum_or_none(p["lag"] for p in parts),
        "lag_unknown": any(p["lag_unknown"] for p in parts),
        "pending": sum(p["pending"] for p in parts),
        "entries_read": _sum_or_none(p["entries_read"] for p in parts),
        "last_delivered_id": None,
        "consumers": sorted(consumers.values(), key=lambda c: c["idle_s"]),
    }


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
    streams: list[dict[str, Any]], heartbeats: Mapping[str, float], ttl_s: float, after_s: float
) -> list[str]:
    """Mark each group ``stalled`` (with a reason) as defined above; return ``stream/group``
    of the stalled ones. Also counts each group's consumers with a live heartbeat."""
    stalled = []
    for stream in streams:
        for group in stream["groups"]:
            consumers = group["consumers"]
            for c in consumers:
                c["live"] = heartbeats.get(c["name"], float("inf")) <= ttl_s
            live = [c for c in consumers if c["live"]]
            group["live_consumers"] = len(live)
            waiting = group["lag_unknown"] or (group["lag"] or 0) > 0 or group["pending"] > 0
            reason = None
            if not waiting:
                pass
            elif not consumers:
                reason = "no consumer is reading it"
            elif not live:
                reason = f"no consumer with a heartbeat in the last {ttl_s:g}s"
            elif min(c["idle_s"] for c in consumers) > after_s:
                reason = f"every consumer idle for more than {after_s:g}s"
            group["stalled"], group["stall_reason"] = reason is not None, reason
            if reason is not None:
                stalled.append(f"{stream['stream']}/{group['group']}")
    return stalled


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


def recent_outputs(redis: Redis, settings: Settings) -> dict[str, Any]:
    """Final labels per second over the last minute, over every partition (see the module
    docstring)."""
    seconds, micros = redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    outputs, per_s, capped = 0, 0.0, False
    for keys in partitions_of(settings):
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
    return {
        "window_s": THROUGHPUT_WINDOW_S,
        "outputs": outputs,
        "capped": capped,
        "per_s": round(per_s, 3),
    }


@dataclass
class Outcome:
    decisions: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    dead: list[dict[str, Any]] = field(default_factory=list)
    audits: list[dict[str, Any]] = field(default_factory=list)  # not an end: the label stands

    @property
    def ended(self) -> int:
        return len(self.decisions) + len(self.rejects) + len(self.dead)


def final_cursors(settings: Settings) -> dict[str, str]:
    """A ``collect`` cursor at the start of every partition's final streams."""
    parts = all_partitions(settings.namespace, settings.partitions)
    return {stream: "0-0" for keys in parts for stream in keys.final_streams}


def collect(redis: Redis, cursors: dict[str, str], outcome: Outcome) -> None:
    """Read what reached the final streams (``cursors``' keys, every partition's, and maybe
    the audits streams) since the last call (plain XRANGE, no group)."""
    sinks = {"output": outcome.decisions, "rejects": outcome.rejects, "audits": outcome.audits}
    for stream in cursors:
        sink = sinks.get(stream.rsplit(":", 1)[1], outcome.dead)
        entries: Any = redis.xrange(stream, min=f"({cursors[stream]}", count=1000)
        for entry_id, fields in entries:
            sink.append(orjson.loads(fields[b"d"]))
            cursors[stream] = entry_id.decode()
