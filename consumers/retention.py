"""Keeping streams from growing forever without ever dropping work someone still needs.

Acked entries stay in a stream (and in memory) until trimmed. Trimming by length
(MAXLEN) could drop entries a slow group has not read yet, so tribunal only
trims by id (XTRIM MINID): below the oldest entry any expected group still has
pending or unread. The final streams (output, rejects, dead) are kept for a
retention period, and even then only once every group reading them has acked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from redis import Redis

from common.connection import server_time, text
from common.keys import AGGREGATOR_GROUP, JUDGE_GROUP, Keys, worker_group
from common.settings import Settings

log = logging.getLogger(__name__)


TRIM_LIMIT = 10_000


def _id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = text(value).partition("-")
    return int(ms), int(seq or 0)


def needed_floor(redis: Redis, stream: str, groups: Iterable[str] | None) -> tuple[int, int] | None:
    """The oldest entry id still needed by a group: the first pending entry, or the first not
    yet delivered. ``groups=None`` means whatever groups exist. None: nothing can be trimmed
    (an expected group does not exist yet, so it has read nothing)."""
    if not redis.exists(stream):
        return None
    info: Any = redis.xinfo_groups(stream)
    existing = {text(g["name"]): g for g in info}
    wanted = list(existing) if groups is None else list(groups)
    floors = []
    for name in wanted:
        group = existing.get(name)
        if group is None:
            return None
        # The group info is a moment old: entries may have been acked since (then XPENDING's
        # min is None) — its last-delivered id is then an older, so safe, floor.
        summary: Any = redis.xpending(stream, name) if group["pending"] else {"min": None}
        if summary["min"] is not None:
            floors.append(_id(summary["min"]))
        else:
            ms, seq = _id(group["last-delivered-id"])
            floors.append((ms, seq + 1))
    return min(floors) if floors else (2**63 - 1, 0)


def trim(
    redis: Redis,
    stream: str,
    groups: Iterable[str] | None,
    max_age_s: float | None,
    approximate: bool = True,
) -> int:
    """XTRIM MINID below what the groups still need (and, with ``max_age_s``, only entries
    older than that). Approximate trimming (``~``) may keep a little more, never less."""
    floor = needed_floor(redis, stream, groups)
    if floor is None:
        return 0
    if max_age_s is not None:  # entry ids are Redis's clock in ms: its clock, not ours
        floor = min(floor, (int((server_time(redis, stream) - max_age_s) * 1000), 0))
    minid = f"{floor[0]}-{floor[1]}"
    # An approximate XTRIM removes at most LIMIT entries per call (default 100 macro nodes,
    # 10,000 entries): keep going, or a fast stream would outgrow the janitor.
    trimmed = 0
    for _ in range(1000):
        limit = TRIM_LIMIT if approximate else None
        batch = int(redis.xtrim(stream, minid=minid, approximate=approximate, limit=limit))
        trimmed += batch
        if batch < TRIM_LIMIT // 2 or not approximate:  # whole nodes: a full call is ~LIMIT
            break
    if trimmed:
        log.debug("trimmed %d entries from %s", trimmed, stream)
    return trimmed


def forget_idle_consumers(redis: Redis, stream: str, group: str, idle_s: float = 3600) -> int:
    """Remove consumers with nothing pending that have been idle longer than ``idle_s`` (killed
    processes: a clean exit removes itself). A live one that is merely quiet loses nothing:
    its next read registers it again."""
    consumers: Any = redis.xinfo_consumers(stream, group)
    gone = [text(c["name"]) for c in consumers if not c["pending"] and c["idle"] > idle_s * 1000]
    for name in gone:
        redis.xgroup_delconsumer(stream, group, name)
    return len(gone)


def trim_all(redis: Redis, keys: Keys, settings: Settings) -> int:
    """One janitor pass over every stream of a partition."""
    done = 0
    tiers = settings.worker_tiers
    for k, tier in enumerate(tiers):
        done += trim(redis, keys.tier(k), [worker_group(name) for name in tier], None)
    done += trim(redis, keys.ready, [AGGREGATOR_GROUP], None)
    done += trim(redis, keys.judge, [JUDGE_GROUP], None)
    for stream in (*keys.final_streams, keys.audits, keys.review, keys.lessons):
        done += trim(redis, stream, None, settings.retention_s)
    later = [keys.tier(k) for k in range(1, len(tiers))]
    for stream in (keys.items, *later, keys.ready, keys.judge, keys.output):
        if redis.exists(stream):
            for group in redis.xinfo_groups(stream):
                forget_idle_consumers(redis, stream, text(group["name"]))
    return done
