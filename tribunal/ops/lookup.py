"""Where one item stands, by its id: waiting, being voted on, with the judge, or ended with
its final record (a decision, a reject or a dead letter); or unknown.

Read from the keys the fleet already keeps per item (``common.keys``), so asking costs a
handful of commands and writes nothing:

- ``state:{id}`` is ``judge`` while the judge has the item and ``done`` once it ended; the
  settle script sets ``done`` with the ``decided_ttl_s`` expiry in the same step as it
  adds the final entry, so the key's remaining time says when that entry was added, and
  the final streams are read only around that moment (their entry ids are milliseconds);
- ``votes:{id}`` exists while workers vote on it, ``queued:{id}`` while it waits in a stream.

An item ended more than ``decided_ttl_s`` ago has no state left: it is unknown here (its
final record may still be in the output stream, which ``tribunal labels`` reads in order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from redis import Redis

from common.connection import server_time
from common.keys import ITEM_ID_FIELD, RECORD_FIELD, Keys, partition_of
from common.schemas import DeadLetter, Decision, Reject
from common.scripts import DONE, ESCALATED
from common.settings import Settings

Stage = Literal["unknown", "queued", "voting", "judging", "labeled", "rejected", "dead", "ended"]
# Entries read around the moment an item ended (its state's age says when), in ms each way:
# the entry is added in the same script call, so only clock steps and slow scripts matter.
WINDOW_MS = 2000
# Where the state's age cannot be read (no expiry): the newest entries read, at most.
NEWEST = 10_000


@dataclass(frozen=True)
class ItemStatus:
    """One item's stage; once it ended, the final record found for it (None where the final
    streams no longer hold it: ``stage`` is then ``ended``)."""

    id: str
    stage: Stage
    decision: Decision | None = None
    reject: Reject | None = None
    dead: DeadLetter | None = None

    @property
    def known(self) -> bool:
        return self.stage != "unknown"


def item_status(redis: Redis, settings: Settings, item_id: str) -> ItemStatus:
    """The stage of ``item_id`` in the fleet of ``settings`` (its namespace, partitions and
    ``decided_ttl_s``, which must be the fleet's). Raises redis-py's errors."""
    keys = Keys(settings.namespace, partition_of(item_id, settings.partitions))
    pipe = redis.pipeline(transaction=False)
    pipe.get(keys.state(item_id))
    pipe.pttl(keys.state(item_id))
    pipe.exists(keys.votes(item_id), keys.queued(item_id))
    pipe.exists(keys.votes(item_id))
    state, ttl_ms, marked, voting = pipe.execute()
    state = state.decode() if state else None
    if state == ESCALATED:
        return ItemStatus(item_id, "judging")
    if state != DONE:
        if not marked:
            return ItemStatus(item_id, "unknown")
        return ItemStatus(item_id, "voting" if voting else "queued")
    since = None
    if ttl_ms > 0:  # set at the settle, with decided_ttl_s to run: ended this long ago
        server_ms = int(server_time(redis, keys.state(item_id)) * 1000)
        since = server_ms - (settings.decided_ttl_s * 1000 - int(ttl_ms))
    return _final(redis, keys, item_id, since)


def _final(redis: Redis, keys: Keys, item_id: str, since_ms: int | None) -> ItemStatus:
    wanted = item_id.encode()
    for stream in keys.final_streams:
        if since_ms is not None:
            entries: Any = redis.xrange(
                stream, min=str(max(0, since_ms - WINDOW_MS)), max=str(since_ms + WINDOW_MS)
            )
        else:
            entries = redis.xrevrange(stream, count=NEWEST)
        for _, fields in entries:
            if fields.get(ITEM_ID_FIELD) == wanted:
                return _parsed(item_id, stream, keys, fields[RECORD_FIELD])
    return ItemStatus(item_id, "ended")


def _parsed(item_id: str, stream: str, keys: Keys, record: bytes) -> ItemStatus:
    if stream == keys.output:
        return ItemStatus(item_id, "labeled", decision=Decision.model_validate_json(record))
    if stream == keys.rejects:
        return ItemStatus(item_id, "rejected", reject=Reject.model_validate_json(record))
    return ItemStatus(item_id, "dead", dead=DeadLetter.model_validate_json(record))
