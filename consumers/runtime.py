"""What every consumer process shares: settings, one Redis client, key names, scripts, stop flag."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import orjson
from redis import Redis
from redis.exceptions import RedisClusterException, RedisError

from common import metrics
from common.connection import connect
from common.consumer import Entry, Handler, StreamConsumer, consumer_name, is_transient
from common.keys import Keys
from common.lifecycle import StopFlag
from common.loop import run_consumers
from common.schemas import DeadLetter, Decision, Item, Reject, is_item_id, now
from common.scripts import Scripts
from common.settings import Settings
from common.validation import ITEM_FIELD, InvalidItem
from common.writes import Writes

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    redis: Redis
    keys: Keys
    scripts: Scripts
    stop: StopFlag

    @classmethod
    def create(cls, settings: Settings, stop: StopFlag | None = None) -> Runtime:
        """The runtime of partition 0 (``partition(p)`` gives the others)."""
        keys = Keys(settings.namespace)
        scripts = Scripts(keys, settings.decided_ttl_s)
        stop = stop or StopFlag()
        return cls(settings, _connect_waiting(settings, stop), keys, scripts, stop)

    def partition(self, partition: int) -> Runtime:
        """The same process and connection, with the key names of another partition."""
        keys = Keys(self.settings.namespace, partition)
        return replace(self, keys=keys, scripts=Scripts(keys, self.settings.decided_ttl_s))

    def consume(
        self,
        stream_of: Callable[[Keys], str],
        group: str,
        make_handler: Callable[[Runtime], Handler],
        role: str,
        drain: bool = False,
    ) -> None:
        """Run the shared consumer loop over this process's partitions until a stop signal
        (or, with ``drain``, until idle): ``stream_of`` names the stream in a partition's
        keys, ``make_handler`` builds the handler of a partition."""
        name = consumer_name(role)
        consumers = []
        for p in self.settings.my_partitions:
            rt = self.partition(p)
            consumers.append(
                StreamConsumer(
                    rt.redis,
                    rt.keys,
                    stream_of(rt.keys),
                    group,
                    make_handler(rt),
                    rt.settings,
                    rt.stop,
                    name,
                    rt.scripts,
                )
            )
        run_consumers(consumers, self.stop, drain)

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

    def publish(
        self, writes: Writes, decision: Decision, escalated: bool, audit: bytes | None = None
    ) -> None:
        """Settle an item with its final label, once, and record how long it took; ``audit``
        (an escalation for the judge) is sent only if this call settles it."""
        counter = metrics.field(metrics.DECISIONS, {"source": decision.source})
        if escalated:
            writes.settle_escalated(decision.id, self.keys.output, decision.dump(), counter)
        else:
            also = (self.keys.judge, audit) if audit else None
            writes.settle(decision.id, self.keys.output, decision.dump(), counter, also)
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


def _connect_waiting(settings: Settings, stop: StopFlag) -> Redis:
    """A client; a cluster client must reach a node to start, so while none answers it is
    waited for (like an outage later on) instead of failing the process."""
    backoff = 0.5
    while True:
        try:
            return connect(settings)
        except (RedisError, RedisClusterException) as exc:
            if not is_transient(exc, None) or stop.is_set():
                raise
            log.warning("cannot reach the cluster (%s); retrying in %.1fs", exc, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 10.0)


def entry_item_id(entry: Entry) -> str:
    """The item id an entry claims, or one derived from the entry id when it has none usable."""
    try:
        claimed = orjson.loads(entry.fields.get(ITEM_FIELD, b""))["id"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        claimed = None
    return claimed if is_item_id(claimed) else f"entry-{entry.id}"
