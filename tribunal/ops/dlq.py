"""Dead letters for operators: look at what was given up on, and put it back in line.

Replay re-injects the item itself (kept in each dead letter) into the items stream
and removes the dead letter in one MULTI/EXEC, clearing the item's settled state so
it can be labeled afresh: the item still ends exactly once (now by its new outcome).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis import Redis

from common.keys import RECORD_FIELD, Keys
from common.schemas import DeadLetter, Item, now


def dead_letters(
    redis: Redis, partitions: Sequence[Keys], limit: int | None = None
) -> list[tuple[Keys, str, DeadLetter]]:
    """(partition, entry id, dead letter) of every partition, oldest first."""
    letters = []
    for keys in partitions:
        entries: Any = redis.xrange(keys.dead, count=limit)
        letters += [
            (keys, eid.decode(), DeadLetter.model_validate_json(f[RECORD_FIELD]))
            for eid, f in entries
        ]
    letters.sort(key=lambda row: row[2].dead_at)
    return letters[:limit] if limit else letters


@dataclass
class ReplayReport:
    replayed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, why)


def replay(redis: Redis, partitions: Sequence[Keys], ids: Collection[str] | None) -> ReplayReport:
    """Re-inject the dead letters named by ``ids`` (all of them with ``None``). An item goes
    back into its own partition, where its dead letter is: one slot, one transaction."""
    report = ReplayReport()
    for keys, entry_id, letter in dead_letters(redis, partitions):
        if ids is not None and letter.id not in ids:
            continue
        if letter.item is None:
            report.skipped.append((letter.id, "the dead letter does not carry its item"))
            continue
        item: Item = letter.item.model_copy(update={"produced_at": now()})
        pipe = redis.pipeline(transaction=True)
        pipe.delete(keys.state(item.id), keys.votes(item.id))
        pipe.xadd(keys.items, {RECORD_FIELD: item.dump()})
        pipe.xdel(keys.dead, entry_id)
        pipe.execute()
        report.replayed.append(item.id)
    if ids is not None:
        missing = set(ids) - set(report.replayed) - {i for i, _ in report.skipped}
        report.skipped += [(i, "no dead letter with this id") for i in sorted(missing)]
    return report


def as_json(letter: DeadLetter) -> bytes:
    return orjson.dumps(letter.model_dump())
