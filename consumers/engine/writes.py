"""Everything one batch writes, queued by the handler and sent in one round trip.

Votes go to Redis as one script call per batch and settlements as another (not
one command per item), and stat increments are summed per field first: on the
hot path the per-command cost of the client, not Redis, is what limits a fleet.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Mapping

from redis import Redis
from redis.client import Pipeline
from redis.typing import EncodableT, FieldT

from common import metrics
from common.schemas import Vote
from common.scripts import DONE, ESCALATED, CastVote, Scripts, Settle


class Writes:
    """A batch's writes, sent with ``flush().execute()`` (the engine adds the batch's XACK)."""

    def __init__(self, pipe: Pipeline, scripts: Scripts) -> None:
        self._pipe = pipe
        self.scripts = scripts
        self.keys = scripts.keys
        self._casts: list[CastVote] = []
        self._settles: list[Settle] = []
        self._counts: Counter[str] = Counter()
        self._sums: dict[str, float] = {}

    def cast_vote(
        self, item_id: str, vote: Vote, item: bytes, notify_at: int, deadline: float
    ) -> None:
        counter = metrics.field(
            metrics.VOTES, {"worker": vote.worker, "label": vote.label or "abstain"}
        )
        self._casts.append(
            CastVote(item_id, vote.worker, vote.dump(), item, notify_at, deadline, counter)
        )

    def settle(
        self,
        item_id: str,
        stream: str,
        payload: bytes,
        counter: str,
        also: tuple[str, bytes] | None = None,
    ) -> None:
        """Make the item final: one entry in ``stream`` (output, rejects or dead), once; and,
        only if this call is the one that settles it, ``also`` (stream, payload)."""
        self._settles.append(Settle(item_id, stream, payload, counter, also=also))

    def escalate(self, item_id: str, payload: bytes) -> None:
        """Hand the item to the judge, once; its votes travel in the payload."""
        self._settles.append(
            Settle(item_id, self.keys.judge, payload, metrics.ESCALATIONS, new=ESCALATED)
        )

    def settle_escalated(self, item_id: str, stream: str, payload: bytes, counter: str) -> None:
        """The judge's (or a dead letter's) final word on an escalated item, once."""
        self._settles.append(Settle(item_id, stream, payload, counter, ESCALATED, DONE))

    @classmethod
    def transaction(cls, redis: Redis, scripts: Scripts) -> Writes:
        """Writes sent in one MULTI/EXEC: if Redis refuses any of them (a slot migrating, out
        of memory, too few replicas) none is applied and nothing is acked, so the entries
        stay pending and are retried. A partition's keys share one cluster slot, so the
        transaction is valid on a cluster too."""
        return cls(redis.pipeline(transaction=True), scripts)

    def add(self, stream: str, fields: Mapping[FieldT, EncodableT]) -> None:
        """An entry for another consumer group (a backup worker, the judge's audits)."""
        self._pipe.xadd(stream, dict(fields))

    def forget_deadline(self, item_id: str) -> None:
        """The item settled before its vote timeout: no sweep needs to decide it."""
        self._pipe.zrem(self.keys.deadlines, item_id)

    def incr(self, name: str, labels: Mapping[str, str] | None = None, n: int = 1) -> None:
        if n:
            self._counts[metrics.field(name, labels)] += n

    def observe(
        self,
        name: str,
        value: float,
        labels: Mapping[str, str] | None = None,
        buckets: tuple[float, ...] = metrics.SECONDS_BUCKETS,
    ) -> None:
        """One histogram observation: its bucket (not cumulative), sum and count."""
        index = bisect.bisect_left(buckets, value)
        le = "+Inf" if index == len(buckets) else f"{buckets[index]:g}"
        base = dict(labels or {})
        self._counts[metrics.field(name, {**base, "le": le})] += 1
        self._counts[metrics.field(name, base) + "|count"] += 1
        total = metrics.field(name, base) + "|sum"
        self._sums[total] = self._sums.get(total, 0.0) + value

    def flush(self) -> Pipeline:
        """Queue everything on the pipeline (the caller adds XACK and executes it)."""
        if self._casts:
            self.scripts.cast_votes(self._pipe, self._casts)
        if self._settles:
            self.scripts.settle(self._pipe, self._settles)
        for name, n in self._counts.items():
            self._pipe.hincrby(self.keys.stats, name, n)
        for name, total in self._sums.items():
            self._pipe.hincrbyfloat(self.keys.stats, name, total)
        self._casts, self._settles, self._counts, self._sums = [], [], Counter(), {}
        return self._pipe
