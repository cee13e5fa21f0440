"""The one stream-consumer loop every consumer runs; consumers differ only in their handler.

read a batch (own pending first, then new) → handler queues its results on a
``Writes`` → the loop adds XACK for what succeeded → one round trip. While a batch
runs, its entries are kept claimed (``common.loop``'s keeper renews them), so however
slow the model, no other consumer takes them from a live one. A consumer that has not
touched its group for ``silent_after_ms`` is gone: its entries are taken over at once
and the consumer removed from the group once it holds nothing; entries idle longer
than ``reclaim_idle_s`` (a failed batch left for a retry) are reclaimed with
XAUTOCLAIM. An entry delivered more than ``max_deliveries`` times is handed to
``Handler.give_up`` so it still ends somewhere final. Redis outages are waited out
with capped backoff.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis import Redis
from redis.exceptions import AskError, RedisClusterException, RedisError

from common import metrics
from common.connection import text
from common.keys import Keys
from common.lifecycle import StopFlag
from common.scripts import Scripts, forget_consumer, renew_claims
from common.settings import Settings
from common.writes import Writes

log = logging.getLogger(__name__)

# Errors that pass: the server is down or restarting, or a cluster is moving slots or
# electing a new primary. Anything else is a bug and ends the process (its supervisor
# restarts it; entries in flight are reclaimed).
REDIS_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.TryAgainError,
    redis.exceptions.AskError,
    redis.exceptions.ReadOnlyError,
)


@dataclass
class Entry:
    id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1


class Handler:
    """What a consumer does with a batch. Subclasses implement ``handle``."""

    def handle(self, entries: Sequence[Entry], writes: Writes) -> dict[str, str]:
        """Queue the batch's results on ``writes``; return ``{entry_id: error}`` for entries
        to leave pending (they are retried after ``reclaim_idle_s``)."""
        raise NotImplementedError

    def give_up(self, entry: Entry, error: str, writes: Writes) -> bool:
        """Settle an entry that failed too often; return False to keep it pending."""
        return False

    def tick(self) -> None:
        """Called once per loop iteration, for periodic work (cheap when there is none)."""


def ensure_group(client: Redis, stream: str, group: str) -> None:
    """Create the group (and stream) if missing; a group starts from the stream's beginning."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
        log.info("created consumer group %s on %s", group, stream)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


# Error replies that say "not now", not "never": retried after a backoff.
TRANSIENT_REPLIES = ("TRYAGAIN", "NOREPLICAS", "CLUSTERDOWN", "MASTERDOWN", "LOADING", "OOM")


def is_transient(exc: BaseException, client: Any) -> bool:
    """Whether waiting and retrying can fix ``exc``."""
    if isinstance(exc, AskError) and not is_cluster(client):
        return False  # MOVED to a plain client: the URL names a cluster node (redis+cluster://)
    if isinstance(exc, REDIS_ERRORS):
        return True
    if isinstance(exc, RedisClusterException):
        return "cannot be connected" in str(exc)  # every node down; not a cross-slot bug
    # The reply behind the exception: a pipeline names the failed command first, an aborted
    # transaction its cause.
    reply = str(exc).split("caused error: ", 1)[-1].split("because of: ", 1)[-1]
    return isinstance(exc, RedisError) and reply.startswith(TRANSIENT_REPLIES)


def consumer_name(role: str) -> str:
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def keep_every_s(settings: Settings) -> float:
    """How often a consumer renews its claim on the batch it works on (and its heartbeat):
    well inside ``reclaim_idle_s``, so a live consumer's batch never looks abandoned."""
    return min(settings.heartbeat_every_s, settings.reclaim_idle_s / 4)


def silent_after_ms(settings: Settings) -> int:
    """A consumer that has not touched its group (a read, a claim, a renewal) for this long
    is gone. A live one touches it at least every ``block_ms`` while it reads and every
    ``keep_every_s`` while a batch runs, so this is five of the longer of the two."""
    return int(5000 * max(keep_every_s(settings), settings.block_ms / 1000))


class StreamConsumer:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        stream: str,
        group: str,
        handler: Handler,
        settings: Settings,
        stop: StopFlag,
        name: str,
        scripts: Scripts,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.stream = stream
        self.group = group
        self.handler = handler
        self.settings = settings
        self.stop = stop
        self.name = name
        self.scripts = scripts
        self._next_heartbeat = 0.0
        self._errors: dict[str, str] = {}  # last error per pending entry, for dead letters
        self._next_reclaim = 0.0
        self.last_batch = 0  # size of the last batch of new entries
        self.in_flight: list[str] = []  # ids read and not yet acked or left: kept claimed
        # Driven by common.loop: where we are in our own pending entries (None: done, read
        # new ones), whether the group is known to exist, and this partition's backoff.
        self.cursor: str | None = "0"
        self.group_ready = False
        self.resume_at = 0.0
        self.backoff = 0.2

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
        except Exception as exc:
            if is_transient(exc, self.redis):
                raise
            log.exception("%s: periodic work failed; carrying on", self.name)
            self.stop.wait(1.0)

    def heartbeat(self) -> None:
        """Say this consumer's loop is alive (``tribunal health`` reads it); forget consumers
        silent for an hour."""
        now = time.time()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.settings.heartbeat_every_s
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.heartbeats, {self.name: now})
        pipe.zremrangebyscore(self.keys.heartbeats, "-inf", now - 3600)
        pipe.execute()

    def ensure_group(self) -> None:
        ensure_group(self.redis, self.stream, self.group)

    def maybe_reclaim(self) -> None:
        if time.monotonic() >= self._next_reclaim:
            self.take_over_silent()
            self.reclaim()
            self._next_reclaim = time.monotonic() + self.settings.reclaim_every_s

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
        silent_ms = silent_after_ms(self.settings)
        rows: Any = self.redis.xinfo_consumers(self.stream, self.group)
        for row in rows:
            name, pending = text(row["name"]), int(row["pending"])
            if name == self.name or int(row["idle"]) < silent_ms or self.stop.is_set():
                continue
            if not pending:
                if forget_consumer(self.redis, self.stream, self.group, name):
                    log.info("%s: removed consumer %s, silent and holding nothing", self.name, name)
                continue
            for _ in range(pending // self.settings.batch_size + 1):
                if not self._take_over(name, silent_ms) or self.stop.is_set():
                    break

    def _take_over(self, silent: str, silent_ms: int) -> bool:
        rows: Any = self.redis.xpending_range(
            self.stream, self.group, "-", "+", self.settings.batch_size, consumername=silent
        )
        if not rows:
            return False
        ids = [r["message_id"] for r in rows]
        reply: Any = self.redis.xclaim(self.stream, self.group, self.name, silent_ms, ids)
        entries = [Entry(text(eid), fields or {}) for eid, fields in reply if eid is not None]
        if entries:
            log.info("%s took over %d entries of %s (silent)", self.name, len(entries), silent)
            self._count_deliveries(entries)
            self.process(entries, reclaimed=True)
        return True

    def read_once(self, pending_cursor: str | None, block_ms: int | None = -1) -> str | None:
        """Read and process one batch; return where to continue in our own pending list.
        New entries are waited for up to ``block_ms`` (default ``settings.block_ms``)."""
        start = pending_cursor if pending_cursor is not None else ">"
        if pending_cursor is not None:
            block_ms = None
        elif block_ms == -1:
            block_ms = self.settings.block_ms
        reply = self.redis.xreadgroup(
            self.group,
            self.name,
            {self.stream: start},
            count=self.settings.batch_size,
            block=block_ms,
        )
        entries = _entries(reply)
        if pending_cursor is None:
            self.last_batch = len(entries)
            self.process(entries)
            return None
        if not entries:
            return None  # own backlog done: switch to new entries
        self._count_deliveries(entries)
        self.process(entries)
        return entries[-1].id

    def reclaim(self) -> None:
        """Take over entries idle longer than ``reclaim_idle_s`` in this group (our own failures
        left for a retry, or any entry nobody renewed), walking the whole pending list with
        the XAUTOCLAIM cursor."""
        cursor = "0-0"
        idle_ms = int(self.settings.reclaim_idle_s * 1000)
        while True:
            reply: Any = self.redis.xautoclaim(
                self.stream,
                self.group,
                self.name,
                min_idle_time=idle_ms,
                start_id=cursor,
                count=self.settings.batch_size,
            )
            # Redis >= 7 replies [cursor, entries, deleted ids]; 6.2 only the first two
            # and a nil in place of an entry that was deleted from the stream.
            cursor = text(reply[0])
            entries = [Entry(text(eid), fields or {}) for eid, fields in reply[1] if eid]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                log.warning("%s: %d pending entries were trimmed away", self.name, len(deleted))
            if entries:
                log.info("%s reclaimed %d idle entries", self.name, len(entries))
                self._count_deliveries(entries)
                self.process(entries, reclaimed=True)
            if cursor == "0-0" or self.stop.is_set():
                return

    def process(self, entries: list[Entry], reclaimed: bool = False) -> None:
        entries = self._drop_deleted(entries)
        if not entries:
            return
        self.in_flight = [e.id for e in entries]
        try:
            self._process(entries, reclaimed)
        finally:
            self.in_flight = []

    def _drop_deleted(self, entries: list[Entry]) -> list[Entry]:
        """Pending entries whose body was deleted (an operator's XDEL or XTRIM) come back with
        no fields: nothing to label, so they are acknowledged with a log line, no outcome."""
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
        limit = self.settings.max_deliveries
        fresh = [e for e in entries if e.deliveries <= limit]
        writes = self._writes()
        failures: dict[str, str] = {}
        if fresh:
            try:
                failures = self.handler.handle(fresh, writes)
            except Exception as exc:  # a handler bug or a backend failure: retry later
                if is_transient(exc, self.redis):
                    raise  # Redis, not the entries: the loop backs off
                log.exception("%s failed on a batch of %d", self.name, len(fresh))
                failures = {e.id: f"{type(exc).__name__}: {exc}" for e in fresh}
                writes = self._writes()  # drop half-queued writes
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

    def _writes(self) -> Writes:
        """A batch's results and its XACK go in one MULTI/EXEC: if Redis refuses any of them
        (a slot migrating, out of memory, too few replicas) none is applied and nothing is
        acked, so the entries stay pending and are retried. They all live in one partition,
        one cluster slot, so the transaction is valid on a cluster too."""
        return Writes(self.redis.pipeline(transaction=True), self.scripts)

    def _give_up(self, entry: Entry, writes: Writes) -> bool:
        error = self._errors.pop(entry.id, "the consumer died or timed out while handling it")
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


def is_cluster(client: Any) -> bool:
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def _entries(reply: Any) -> list[Entry]:
    """XREADGROUP's RESP2 reply ``[[stream, [(id, fields), ...]]]`` as entries."""
    return [Entry(text(eid), fields or {}) for _, batch in reply or () for eid, fields in batch]
