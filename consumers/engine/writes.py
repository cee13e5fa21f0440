"""Everything one batch writes, queued by the handler and sent in one round trip.

Votes go to Redis as one script call per batch and label, settlements as one per
batch and kind (not one command per item), and stat increments are summed per field
first: on the hot path the per-command and per-argument costs of the client and of
Redis are what limit a fleet.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Mapping
from functools import lru_cache

from redis import Redis
from redis.client import Pipeline
from redis.typing import EncodableT, FieldT

from common import metrics
from common.schemas import Vote
from common.scripts import DONE, ESCALATED, Ballot, Scripts, Settlement

Labels = tuple[tuple[str, str], ...]


class Writes:
    """A batch's writes, sent with ``flush().execute()`` (the engine adds the batch's XACK)."""

    def __init__(self, pipe: Pipeline, scripts: Scripts) -> None:
        self._pipe = pipe
        self.scripts = scripts
        self.keys = scripts.keys
        # Grouped by what a script call shares, so each call sends that once (usually one
        # call per batch and label); calls go in the order their group first appeared, items
        # in the order they were queued. (Settling one item twice in one batch, two ways,
        # would apply in group order; no handler does: each settles an item once a batch.)
        self._votes: dict[Ballot, list[tuple[str, bytes, bytes]]] = {}
        self._settles: dict[Settlement, list[tuple[str, bytes, bytes]]] = {}
        self._advances: dict[tuple[int, float], list[tuple[str, bytes, float | None]]] = {}
        self._counts: Counter[str] = Counter()
        self._observed: dict[tuple[str, Labels, tuple[float, ...]], list[float]] = {}

    def cast_vote(
        self, item_id: str, vote: Vote, item: bytes, notify_at: int, timeout_s: float
    ) -> None:
        """Store ``vote`` with the item (its JSON, as read), once per worker and item; the
        item's vote timeout ends ``timeout_s`` from now, by Redis's clock (one clock for
        every host), if this is its first vote."""
        labels = (("label", vote.label or "abstain"), ("worker", vote.worker))
        ballot = Ballot(vote.worker, notify_at, timeout_s, _field(metrics.VOTES, labels))
        self._votes.setdefault(ballot, []).append((item_id, vote.dump(), item))

    def settle(
        self,
        item_id: str,
        stream: str,
        payload: bytes,
        counter: str,
        also: tuple[str, bytes] | None = None,
        escalated: bool = False,
    ) -> None:
        """Make the item final: one entry in ``stream`` (output, rejects or dead), once; and,
        only if this call is the one that settles it, ``also`` (stream, payload).
        ``escalated``: the judge's (or a dead letter's) final word on an item it holds."""
        also_stream, also_payload = also or ("", b"")
        expect = ESCALATED if escalated else ""
        settlement = Settlement(stream, counter, expect, DONE, also=also_stream)
        self._settle(settlement, item_id, payload, also_payload)

    def escalate(self, item_id: str, payload: bytes) -> None:
        """Hand the item to the judge, once; its votes travel in the payload."""
        self._settle(
            Settlement(self.keys.judge, metrics.ESCALATIONS, new=ESCALATED), item_id, payload
        )

    def _settle(
        self, settlement: Settlement, item_id: str, payload: bytes, also: bytes = b""
    ) -> None:
        self._settles.setdefault(settlement, []).append((item_id, payload, also))

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

    def advance(
        self, item_id: str, tier: int, item: bytes, timeout_s: float, sampling_rate: float | None
    ) -> None:
        """Send the item (its JSON, as read) on to tier ``tier``'s workers, once however often
        this is asked; its vote timeout then ends ``timeout_s`` from now, by Redis's clock.
        ``sampling_rate``: the item goes on as one of a sample of that rate (exploration)."""
        self._advances.setdefault((tier, timeout_s), []).append((item_id, item, sampling_rate))

    def forget_deadline(self, item_id: str) -> None:
        """The item settled before its vote timeout: no sweep needs to decide it."""
        self._pipe.zrem(self.keys.deadlines, item_id)

    def incr(self, name: str, labels: Mapping[str, str] | None = None, n: int = 1) -> None:
        if n:
            self._counts[_field(name, tuple(labels.items()) if labels else ())] += n

    def observe(
        self,
        name: str,
        value: float,
        labels: Mapping[str, str] | None = None,
        buckets: tuple[float, ...] = metrics.SECONDS_BUCKETS,
    ) -> None:
        """One histogram observation; the batch's are put in buckets when flushed."""
        key = (name, tuple(labels.items()) if labels else (), buckets)
        self._observed.setdefault(key, []).append(value)

    def flush(self) -> Pipeline:
        """Queue everything on the pipeline (the caller adds XACK and executes it)."""
        for ballot, votes in self._votes.items():
            self.scripts.cast_votes(self._pipe, ballot, votes)
        for settlement, items in self._settles.items():
            self.scripts.settle(self._pipe, settlement, items)
        for (tier, timeout_s), advances in self._advances.items():
            self.scripts.advance(self._pipe, tier, metrics.TIEBREAKS, timeout_s, advances)
        sums: dict[str, float] = {}
        for (name, labels, buckets), values in self._observed.items():
            # Each observation counts in its bucket (not cumulative: the exporter sums them),
            # and in the histogram's count and sum.
            for value in values:
                index = bisect.bisect_left(buckets, value)
                le = "+Inf" if index == len(buckets) else f"{buckets[index]:g}"
                self._counts[_field(name, (*labels, ("le", le)))] += 1
            self._counts[_field(name, labels) + "|count"] += len(values)
            sum_field = _field(name, labels) + "|sum"
            sums[sum_field] = sums.get(sum_field, 0.0) + sum(values)
        for field, n in self._counts.items():
            self._pipe.hincrby(self.keys.stats, field, n)
        for field, total in sums.items():
            self._pipe.hincrbyfloat(self.keys.stats, field, total)
        self._votes, self._settles, self._counts, self._observed = {}, {}, Counter(), {}
        self._advances = {}
        return self._pipe


@lru_cache(maxsize=4096)
def _field(name: str, labels: Labels) -> str:
    """``metrics.field``, spelled once per name and labels: a batch repeats a few of them."""
    return metrics.field(name, dict(labels))
