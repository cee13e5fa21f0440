"""What every consumer process shares: settings, one Redis client, key names, scripts, stop flag."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from redis import Redis

from common import metrics
from common.connection import connect
from common.consumer import Entry, Handler, StreamConsumer, consumer_name
from common.keys import Keys
from common.lifecycle import StopFlag
from common.schemas import DeadLetter, Decision, Item, Reject, is_item_id, now
from common.scripts import Scripts
from common.settings import Settings
from common.validation import ITEM_FIELD, InvalidItem
from common.writes import Writes


@dataclass
class Runtime:
    settings: Settings
    redis: Redis
    keys: Keys
    scripts: Scripts
    stop: StopFlag

    @classmethod
    def create(cls, settings: Settings, stop: StopFlag | None = None) -> Runtime:
        redis = connect(settings)
        keys = Keys(settings.namespace)
        scripts = Scripts(redis, keys, settings.decided_ttl_s)
        return cls(settings, redis, keys, scripts, stop or StopFlag())

    def consume(
        self, stream: str, group: str, handler: Handler, role: str, drain: bool = False
    ) -> None:
        """Run the shared consumer loop until a stop signal (or, with ``drain``, until idle)."""
        name = consumer_name(role)
        StreamConsumer(
            self.redis,
            self.keys,
            stream,
            group,
            handler,
            self.settings,
            self.stop,
            name,
            self.scripts,
        ).run(drain=drain)

    def reject(self, writes: Writes, stream: str, entry: Entry, error: InvalidItem) -> None:
        """Settle a bad entry as a reject, once, whichever consumer sees it first."""
        payload = entry.fields.get(ITEM_FIELD, b"")
        record = Reject(
            id=entry_item_id(entry),
            reason=str(error),
            stream=stream,
            entry_id=entry.id,
            raw=payload[:300].decode("utf-8", errors="replace"),
            rejected_at=now(),
        )
        writes.settle(record.id, self.keys.rejects, record.dump(), metrics.REJECTS)

    def publish(self, writes: Writes, decision: Decision, escalated: bool) -> None:
        """Settle an item with its final label, once, and record how long it took."""
        counter = metrics.field(metrics.DECISIONS, {"source": decision.source})
        settle = writes.settle_escalated if escalated else writes.settle
        settle(decision.id, self.keys.output, decision.dump(), counter)
        if decision.produced_at is not None:
            latency = max(decision.decided_at - decision.produced_at, 0.0)
            writes.observe(metrics.ITEM_LATENCY, latency, {"source": decision.source})

    def dead_letter(
        self,
        writes: Writes,
        stream: str,
        group: str,
        entry: Entry,
        item_id: str,
        error: str,
        item: Item | None,
        escalated: bool = False,
    ) -> None:
        record = DeadLetter(
            id=item_id,
            item=item,
            error=error,
            stream=stream,
            group=group,
            entry_id=entry.id,
            deliveries=entry.deliveries,
            fields={
                k.decode(errors="replace"): v.decode(errors="replace")
                for k, v in entry.fields.items()
            },
            dead_at=now(),
        )
        counter = metrics.field(metrics.DEAD_LETTERS, {"group": group})
        settle = writes.settle_escalated if escalated else writes.settle
        settle(item_id, self.keys.dead, record.dump(), counter)


def entry_item_id(entry: Entry) -> str:
    """The item id an entry claims, or one derived from the entry id when it has none usable."""
    try:
        claimed = orjson.loads(entry.fields.get(ITEM_FIELD, b""))["id"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        claimed = None
    return claimed if is_item_id(claimed) else f"entry-{entry.id}"
