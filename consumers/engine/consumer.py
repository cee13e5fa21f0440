"""The one stream-consumer loop every consumer runs; consumers differ only in their handler.

read a batch (own pending first, then new) → handler queues its results on a
``Writes`` → the loop adds XACK for what succeeded → one round trip. While a batch
runs, its entries are kept claimed (``consumers.engine.loop``'s keeper renews them), so however
slow the model, no other consumer takes them from a live one. A consumer that has not
touched its group for ``silent_after_ms`` is gone: its entries are taken over at once
and the consumer removed from the group once it holds nothing; entries idle longer
than ``reclaim_idle_s`` (a failed batch left for a retry) are reclaimed with
XAUTOCLAIM; past a second delivery they go one at a time (``redeliver``). An entry
delivered more than ``max_deliveries`` times goes to ``Handler.give_up``, so it still ends
somewhere final. Redis outages are waited out with capped backoff.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import redis
from redis import Redis
from redis.exceptions import RedisClusterException

from common import metrics
from common.connection import OUTAGE_BACKOFF, is_transient, text
from common.keys import claim_partitions
from common.scripts import forget_consumer, hand_back, renew_claims
from consumers.engine.handler import Entry, Handler, StopConsuming
from consumers.engine.runtime import Runtime
from consumers.engine.writes import Writes

log = logging.getLogger(__name__)


def ensure_group(client: Redis, stream: str, group: str) -> None:
    """Create the group (and stream) if missing; a group starts from the stream's beginning."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
        log.info("created consumer group %s on %s", group, stream)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def consumer_name(role: str) -> str:
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


class StreamConsumer:
    """One consumer in one group on one partition's stream. It owns its state: where it is in
    its own pending entries, whether its group exists, its backoff after an outage, and the
    batch in flight; ``consumers.engine.loop`` only decides when each consumer runs."""

    def __init__(self, rt: Runtime, stream: str, group: str, handler: Handler, name: str) -> None:
        self.redis = rt.redis
        self.keys = rt.keys
        self.settings = rt.settings
        self.loop = rt.settings.loop
        self.stop = rt.stop
        self.scripts = rt.scripts
        self.stream = stream
        self.group = group
        self.handler = handler
        self.name = name
        self.in_flight: list[str] = []  # ids read and not yet acked or left: kept claimed
        self._next_heartbeat = 0.0
        self._errors: dict[str, str] = {}  # last error per pending entry, for dead letters
        self._next_reclaim = 0.0
        # Where we are in our own pending entries (None: done, read new ones): "0" after a
        # start or an outage, so what we held is handled before anything new.
        self._cursor: str | None = "0"
        self._group_ready = False
        self._resume_at = 0.0  # monotonic time before which this partition waits out an outage
        self._failures = 0  # outages in a row (the backoff's exponent)
        self._outage_since = 0.0  # monotonic: when the current outage began

    # --- what the loop asks ---------------------------------------------------------------
    @property
    def resume_at(self) -> float:
        return self._resume_at

    def due(self, now: float) -> bool:
        """Whether it may run now (not waiting out an outage)."""
        return self._resume_at <= now

    @property
    def reading_new(self) -> bool:
        """Its own pending entries are done: it reads new ones."""
        return self._cursor is None

    def prepare(self) -> None:
        """A round's work before new entries: the group (created once), the handler's periodic
        work, reclaiming, and one batch of its own pending entries if any are left."""
        if not self._group_ready:
            claim_partitions(self.redis, self.keys.namespace, self.settings.partitions)
            self.ensure_group()
            self._group_ready = True
        self._tick()
        self.maybe_reclaim()
        if self._cursor is not None:
            self._cursor = self.read_pending(self._cursor)

    def succeeded(self) -> float | None:
        """A Redis call went through: how long the outage it ends lasted (s; None: none)."""
        lasted = time.monotonic() - self._outage_since if self._failures else None
        self._failures = 0
        return lasted

    @property
    def outage_began(self) -> bool:
        """The last ``outage`` was the first of this outage: the one to say."""
        return self._failures == 1

    def group_lost(self) -> None:
        """The stream or group is gone (a Redis restarted without persistence, or deleted by
        hand): recreate it on the next round, and re-read what we held."""
        self._group_ready, self._cursor = False, "0"

    def outage(self) -> float:
        """Redis is unavailable for this partition: wait (returns how long), then re-read our
        own pending entries first."""
        if not self._failures:
            self._outage_since = time.monotonic()
        delay = OUTAGE_BACKOFF.compute(self._failures)
        self._failures += 1
        self._resume_at = time.monotonic() + delay
        self._cursor = "0"
        return delay

    def hold(self, entries: list[Entry]) -> None:
        """Keep ``entries`` claimed (the keeper renews them) until processed or released:
        a batch read for several partitions at once waits while the others are processed."""
        self.in_flight = [e.id for e in entries]

    def release(self) -> None:
        self.in_flight = []

    # --- the work -------------------------------------------------------------------------
    def leave(self) -> None:
        """On a clean exit: no longer live (heartbeat gone), and with nothing pending, out of
        the group, so status and XINFO list only consumers that exist (with entries pending
        it must stay: they are reclaimed from it later)."""
        try:
            self.redis.zrem(self.keys.heartbeats, self.name)
            mine: Any = self.redis.xpending_range(
                self.stream, self.group, min="-", max="+", count=1, consumername=self.name
            )
            if not mine:
                self.redis.xgroup_delconsumer(self.stream, self.group, self.name)
        except (redis.RedisError, RedisClusterException):
            pass  # Redis gone or group deleted: nothing to tidy

    def _tick(self) -> None:
        """The handler's periodic work; a bug there is logged, never fatal to the consumer."""
        try:
            self.handler.tick()
        except StopConsuming:
            raise
        except Exception as exc:
            if is_transient(exc, self.redis):
                raise
            log.exception("%s: periodic work failed; carrying on", self.name)
            self.stop.wait(1.0)

    def heartbeat(self) -> None:
        """Say this consumer's loop is alive (``tribunal health`` reads it); forget consumers
        silent for an hour."""
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.loop.heartbeat_every_s
        self.scripts.heartbeat(self.redis, self.name, forget_after_s=3600)

    def ensure_group(self) -> None:
        ensure_group(self.redis, self.stream, self.group)

    def maybe_reclaim(self) -> None:
        if time.monotonic() >= self._next_reclaim:
            self.take_over_silent()
            self.reclaim()
            self._next_reclaim = time.monotonic() + self.loop.reclaim_every_s

    def renew(self) -> int:
        """Keep the entries of the running batch claimed (called by the loop's keeper)."""
        ids = self.in_flight
        return renew_claims(self.redis, self.stream, self.group, self.name, ids)

    def take_over_silent(self) -> None:
        """Take over at once what consumers silent for ``silent_after_ms`` hold (killed, or
        hung past their ``shutdown_grace_s``), instead of after ``reclaim_idle_s``; remove
        such consumers from the group once they hold nothing, so only live ones are listed.
        XCLAIM with that idle time as its minimum: of two consumers taking over one entry,
        the second finds it just claimed and leaves it."""
        silent_ms = self.loop.silent_after_ms
        rows: Any = self.redis.xinfo_consumers(self.stream, self.group)
        for row in rows:
            name, pending = text(row["name"]), int(row["pending"])
            if name == self.name or int(row["idle"]) < silent_ms or self.stop.is_set():
                continue
            if not pending:
                if forget_consumer(self.redis, self.stream, self.group, name):
                    log.info("%s: removed consumer %s, silent and holding nothing", self.name, name)
                continue
            for _ in range(pending // self.loop.batch_size + 1):
                if not self._take_over(name, silent_ms) or self.stop.is_set():
                    break

    def _take_over(self, silent: str, silent_ms: int) -> bool:
        rows: Any = self.redis.xpending_range(
            self.stream, self.group, "-", "+", self.loop.batch_size, consumername=silent
        )
        if not rows:
            return False
        ids = [r["message_id"] for r in rows]
        claimed: Any = self.redis.xclaim(
            self.stream, self.group, self.name, silent_ms, ids, justid=True
        )
        if claimed:
            log.info("%s took over %d entries of %s (silent)", self.name, len(claimed), silent)
            self.redeliver([text(eid) for eid in claimed])
        return True

    def redeliver(self, ids: list[str]) -> None:
        """Process entries this consumer took over without counting a delivery (JUSTID):
        each delivery is counted as it is made. Entries delivered once before go as one batch
        again (most deaths are not an item's doing: a deploy, the OOM killer on a big batch).
        Delivered more often, they go one at a time: an item that kills the process handling
        it (a poison item: a model server or tokenizer crashing on it) then takes only itself
        down, and it alone reaches ``max_deliveries`` and is given up, saying so
        (bee-queue#106, bullmq#631)."""
        seen = [Entry(eid, {}) for eid in ids]
        self._count_deliveries(seen)
        alone = max(e.deliveries for e in seen) > 1
        for n in range(len(ids)) if alone else [0]:
            if self.stop.is_set():
                return
            taking: list[Any] = ids[n : n + 1] if alone else list(ids)
            # min idle 0 and no JUSTID: counts this delivery and returns the entries
            reply: Any = self.redis.xclaim(self.stream, self.group, self.name, 0, taking)
            entries = [Entry(text(eid), fields or {}) for eid, fields in reply if eid is not None]
            if entries:
                self._count_deliveries(entries)
                self.process(entries, reclaimed=True, holding=ids[n + 1 :] if alone else [])

    def read_new(self, block_ms: int | None = -1) -> int:
        """Read and process one batch of new entries, waiting up to ``block_ms`` for them
        (default ``settings.block_ms``; None: not at all); returns how many came."""
        block = self.loop.block_ms if block_ms == -1 else block_ms
        reply = self.redis.xreadgroup(
            self.group, self.name, {self.stream: ">"}, count=self.loop.batch_size, block=block
        )
        entries = entries_of(reply)
        self.process(entries)
        return len(entries)

    def read_pending(self, cursor: str) -> str | None:
        """Process one batch of our own pending entries after ``cursor``; returns where to go
        on, or None once they are done (then new entries are read)."""
        reply = self.redis.xreadgroup(
            self.group, self.name, {self.stream: cursor}, count=self.loop.batch_size
        )
        entries = entries_of(reply)
        if not entries:
            return None
        self._count_deliveries(entries)
        self.process(entries)
        return entries[-1].id

    def reclaim(self) -> None:
        """Take over entries idle longer than ``reclaim_idle_s`` in this group (our own failures
        left for a retry, or any entry nobody renewed), walking the pending list a batch at a
        time. XPENDING IDLE and XCLAIM JUSTID rather than XAUTOCLAIM, which would count a
        delivery of every entry it claims (redeliver counts them as they are made), and whose
        JUSTID reply redis-py reads without its cursor."""
        idle_ms = int(self.loop.reclaim_idle_s * 1000)
        start, size = "-", self.loop.batch_size
        while not self.stop.is_set():
            rows: Any = self.redis.xpending_range(
                self.stream, self.group, start, "+", size, idle=idle_ms
            )
            ids: list[Any] = [text(r["message_id"]) for r in rows]
            if ids:  # an entry deleted meanwhile (XDEL, XTRIM) is dropped from the list here
                claimed: Any = self.redis.xclaim(
                    self.stream, self.group, self.name, idle_ms, ids, justid=True
                )
                if claimed:
                    log.info("%s reclaimed %d idle entries", self.name, len(claimed))
                    self.redeliver([text(eid) for eid in claimed])
            if len(ids) < size:
                return
            start = f"({ids[-1]}"

    def process(
        self, entries: list[Entry], reclaimed: bool = False, holding: list[str] | None = None
    ) -> None:
        """Handle one batch; the keeper also keeps ``holding`` claimed (``redeliver``'s next)."""
        entries = self._drop_deleted(entries)
        if not entries:
            return
        self.in_flight = [e.id for e in entries] + (holding or [])
        try:
            self._process(entries, reclaimed)
        finally:
            self.in_flight = []

    def _drop_deleted(self, entries: list[Entry]) -> list[Entry]:
        """Pending entries deleted by an operator (XDEL, XTRIM) come back with no fields:
        acknowledged with a log line, no outcome."""
        gone = [e.id for e in entries if not e.fields]
        if not gone:
            return entries
        log.warning(
            "%s: %d pending entries of %s were deleted from the stream (XDEL/XTRIM); "
            "acknowledged without an outcome: %s",
            self.name,
            len(gone),
            self.stream,
            " ".join(gone[:10]),
        )
        self.redis.xack(self.stream, self.group, *gone)
        return [e for e in entries if e.fields]

    def _process(self, entries: list[Entry], reclaimed: bool) -> None:
        limit = self.loop.max_deliveries
        fresh = [e for e in entries if e.deliveries <= limit]
        writes = Writes.transaction(self.redis, self.scripts)
        failures: dict[str, str] = {}
        if fresh:
            try:
                failures = self.handler.handle(fresh, writes)
            except StopConsuming as stop:  # acks what it finished; the rest to the next reader
                rest = [e.id for e in fresh if e.id not in stop.done]
                idle = int(self.loop.reclaim_idle_s * 1000)
                hand_back(self.redis, self.stream, self.group, self.name, stop.done, rest, idle)
                raise
            except Exception as exc:  # a handler bug or a backend failure: retry later
                if is_transient(exc, self.redis):
                    raise  # Redis, not the entries: the loop backs off
                log.exception("%s failed on a batch of %d", self.name, len(fresh))
                failures = {e.id: f"{type(exc).__name__}: {exc}" for e in fresh}
                writes = Writes.transaction(self.redis, self.scripts)  # drop half-queued writes
                self.stop.wait(1.0)
        acked = [e.id for e in fresh if e.id not in failures]
        for entry in entries:
            if entry.deliveries > limit and self._give_up(entry, writes):
                acked.append(entry.id)
        if len(self._errors) > 10_000:  # entries another consumer finished: forget the oldest
            for stale in list(self._errors)[:5_000]:
                del self._errors[stale]
        for entry_id, error in failures.items():
            self._errors[entry_id] = error
            log.warning("%s: entry %s left pending for a retry: %s", self.name, entry_id, error)
        group = {"group": self.group}
        writes.incr(metrics.RETRIES, group, len(failures))
        writes.incr(metrics.RECLAIMED, group, len(entries) if reclaimed else 0)
        writes.observe(metrics.BATCH_SIZE, len(entries), group, metrics.SIZE_BUCKETS)
        pipe = writes.flush()
        if acked:
            pipe.xack(self.stream, self.group, *acked)
        pipe.execute()

    def _give_up(self, entry: Entry, writes: Writes) -> bool:
        died = entry.deliveries - 1
        error = self._errors.pop(
            entry.id,
            f"the consumer died or timed out while handling it, {died} times "
            "(the last times with this entry alone: it is the cause, not its batch)",
        )
        if not self.handler.give_up(entry, error, writes):
            return False
        log.error(
            "%s gave up on entry %s after %d deliveries: %s",
            self.name,
            entry.id,
            entry.deliveries,
            error,
        )
        return True

    def _count_deliveries(self, entries: list[Entry]) -> None:
        """Fill in how often each entry has been delivered (only needed off the hot path)."""
        rows: Any = self.redis.xpending_range(
            self.stream,
            self.group,
            min=entries[0].id,
            max=entries[-1].id,
            count=len(entries) * 2,
            consumername=self.name,
        )
        counts = {text(r["message_id"]): int(r["times_delivered"]) for r in rows}
        for entry in entries:
            entry.deliveries = counts.get(entry.id, entry.deliveries)


def entries_of(reply: Any) -> list[Entry]:
    """XREADGROUP's RESP2 reply ``[[stream, [(id, fields), ...]]]`` as entries."""
    return [Entry(text(eid), fields or {}) for _, batch in reply or () for eid, fields in batch]
