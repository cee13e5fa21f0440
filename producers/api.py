"""The producer: validate records, give them ids, XADD them in pipelined chunks, with backpressure.

    from producers import Producer
    report = Producer(redis, settings).send([{"task": "sentiment", "text": "Thanks!"}])

A record that fails validation is reported (with where it came from) and skipped;
the rest still go. When the slowest worker group lags more than ``max_backlog``
entries behind, ``send`` waits instead of piling more onto Redis.

An id the fleet already knows (waiting in the stream, being voted on, with the judge,
or labeled within ``decided_ttl_s``) is not added again: the report counts it as
``known``. Each chunk is added by one script per partition, which records it under a
chunk id, so a chunk sent again after a lost reply (a timeout, a dropped connection,
redis-py's own retry) adds nothing twice and is counted once.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from redis import Redis
from redis.exceptions import RedisClusterException, RedisError

from common.connection import OUTAGE_BACKOFF, is_cluster, is_transient, text
from common.keys import Keys, all_partitions, claim_partitions, partition_of
from common.schemas import Item, RawRecord, now
from common.scripts import Scripts
from common.settings import Settings
from common.validation import InvalidItem, validate_item
from producers.follow import Idle

log = logging.getLogger(__name__)
# Chunks that wait within this many seconds of each other make one wait, logged once.
QUIET_S = 10.0

# (where the record came from, e.g. a line number; the record or the reason it is unusable)
SourceRecord = tuple[str, "RawRecord | InvalidItem"]


@dataclass
class ProduceReport:
    produced: int = 0  # valid records stored, or found already known (``known``)
    known: int = 0  # ids the fleet already knew: dropped as duplicates, not added again
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    waited_s: float = 0.0  # time spent blocked by backpressure
    unreplicated: int = 0  # stored, but not confirmed by ``wait_replicas`` replicas in time

    @property
    def new(self) -> int:
        """Items added to the stream by this send."""
        return self.produced - self.known


# An encoded record: its partition's keys, its id, its payload.
Encoded = tuple[Keys, str, bytes]


class Producer:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        chunk_size: int = 500,
        default_task: str | None = None,
        wait_for_redis: bool = False,
        on_wait: Callable[[int], None] = lambda backlog: None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.rules = settings.input_rules
        self.partitions = all_partitions(settings.namespace, settings.partitions)
        self.scripts = [Scripts(keys, settings.decided_ttl_s) for keys in self.partitions]
        self._claimed = False
        self.chunk_size = chunk_size
        self.default_task = default_task
        self.wait_for_redis = wait_for_redis  # else a Redis outage raises at once
        # Called with the backlog at each check while ``send`` waits for the workers, and
        # with 0 when it goes on: a progress bar shows the wait there.
        self.on_wait = on_wait
        self._waited_until = float("-inf")  # when the last wait for the workers ended

    def prepare(self, record: RawRecord) -> Item:
        """Validate one record; fill in the task default, an id if absent, and the time."""
        data = dict(record)
        if self.default_task is not None:
            data.setdefault("task", self.default_task)
        if data.get("id") is None:
            data["id"] = uuid.uuid4().hex
        data["produced_at"] = now()
        return validate_item(data, self.rules)

    def encode(self, record: RawRecord) -> Encoded:
        """The partition the record goes to (by its id), its id and its payload."""
        item = self.prepare(record)
        try:
            payload = item.dump()
        except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate in the text
            raise InvalidItem(f"cannot be encoded as JSON: {exc}") from None
        return self.partitions[partition_of(item.id, len(self.partitions))], item.id, payload

    def send(
        self,
        records: Iterable[RawRecord] | Iterable[SourceRecord | Idle],
        on_progress: Callable[[int], None] | None = None,
        rate: float | None = None,
        report: ProduceReport | None = None,
    ) -> ProduceReport:
        """Produce every valid record; ``records`` are dicts or ``(where, dict)`` pairs. They
        are sent a chunk at a time, and at each ``IDLE`` among them: a record read from a
        trickle is stored as soon as its reader has nothing more ready. With ``rate``, at
        most that many items per second (a chunk at a time), for steady load.
        Counts go into ``report`` when given, so a caller interrupted mid-way still knows
        what was stored."""
        report = report if report is not None else ProduceReport()
        chunk: list[Encoded] = []
        started = time.monotonic()

        def flush() -> None:
            self._flush(chunk, report, on_progress)
            if rate:
                time.sleep(max(0.0, started + report.produced / rate - time.monotonic()))

        for numbered in _numbered(records):
            if isinstance(numbered, Idle):  # nothing more for now: what is held goes at once
                flush()
                continue
            where, record = numbered
            try:
                if isinstance(record, InvalidItem):
                    raise record
                chunk.append(self.encode(record))
            except InvalidItem as exc:
                report.invalid.append((where, str(exc)))
                log.warning("%s: %s", where, exc)
            if len(chunk) >= self.chunk_size:
                flush()
        flush()
        return report

    def _flush(
        self,
        chunk: list[Encoded],
        report: ProduceReport,
        on_progress: Callable[[int], None] | None,
    ) -> None:
        if not chunk:
            return
        first: dict[str, Encoded] = {}
        for row in chunk:
            first.setdefault(row[1], row)  # an id twice in one chunk: the first one goes
        rows, repeated = list(first.values()), len(chunk) - len(first)
        token = uuid.uuid4().hex  # the same on every retry of this chunk
        failures, since = 0, 0.0
        while True:
            try:
                if not self._claimed:
                    claim_partitions(self.redis, self.settings.namespace, len(self.partitions))
                    self._claimed = True
                report.waited_s += self.wait_for_room()
                known, unconfirmed = self._send(rows, token)
                break
            except (RedisError, RedisClusterException) as exc:
                if not is_transient(exc, self.redis):
                    raise
                if is_cluster(self.redis):  # a failover or a slot move: learn the new map
                    with contextlib.suppress(RedisError, RedisClusterException):
                        self.redis.nodes_manager.initialize()  # type: ignore[attr-defined]
                if not self.wait_for_redis:
                    raise
                # Sent again under the same chunk id: what the server already has stays once.
                delay = OUTAGE_BACKOFF.compute(failures)
                if not failures:  # said once per outage: it retries every 2 s at most
                    since = time.monotonic()
                    log.warning("Redis unavailable (%s); retrying until it is back", exc)
                failures += 1
                time.sleep(delay)
        if failures:
            log.warning("Redis is back after %.1fs", time.monotonic() - since)
        report.produced += len(chunk)
        report.known += known + repeated
        report.unreplicated += unconfirmed
        if on_progress is not None:
            on_progress(len(chunk))
        chunk.clear()

    def _send(self, rows: list[Encoded], token: str) -> tuple[int, int]:
        """Add the chunk in one round trip per server, one script call per partition; with
        ``wait_replicas``, each server's pipeline ends with WAIT (it counts the writes of its
        own connection). Returns how many ids were already known, and how many items were
        not confirmed on enough replicas: they are stored, but a failover right now could
        lose them, so they are reported, never silently trusted."""
        wanted = self.settings.wait_replicas
        by_server: dict[Any, dict[int, list[tuple[str, bytes]]]] = {}
        for keys, item_id, payload in rows:  # without WAIT, the (cluster) client splits it up
            server = self._server_of(keys.items) if wanted else self.redis
            parts = by_server.setdefault(server, {})
            parts.setdefault(keys.partition, []).append((item_id, payload))
        known = unconfirmed = 0
        for server, parts in by_server.items():
            pipe = server.pipeline(transaction=False)
            for partition, items in parts.items():
                self.scripts[partition].produce(pipe, token, items)
            if wanted:
                pipe.execute_command("WAIT", wanted, self.settings.wait_timeout_ms)
            replies = pipe.execute()
            known += sum(int(text(reply).split()[1]) for reply in replies[: len(parts)])
            stored = sum(len(items) for items in parts.values())
            if wanted and int(replies[-1]) < wanted:
                unconfirmed += stored
                log.warning(
                    "%d items not confirmed by %d replicas within %d ms",
                    stored,
                    wanted,
                    self.settings.wait_timeout_ms,
                )
        return known, unconfirmed

    def _server_of(self, stream: str) -> Redis:
        """The client of the server holding ``stream``: on a cluster, its slot's primary."""
        if not is_cluster(self.redis):
            return self.redis
        cluster: Any = self.redis
        return cast(Redis, cluster.get_redis_connection(cluster.get_node_from_key(stream)))

    def backlog(self) -> int:
        """Entries the slowest worker group has not read yet, summed over the partitions (the
        stream length before any group exists). Read from Redis each time: never a counter
        that could drift."""
        return sum(self._backlog(keys.items) for keys in self.partitions)

    def _backlog(self, stream: str) -> int:
        groups = self.redis.xinfo_groups(stream) if self.redis.exists(stream) else []
        if not groups:
            return int(self.redis.xlen(stream))
        lags: list[Any] = [g.get("lag") for g in groups]
        if None in lags:  # lag unknown after deletions: be conservative
            return int(self.redis.xlen(stream))
        return max(int(lag) for lag in lags)

    def wait_for_room(self) -> float:
        started = time.monotonic()
        announced = False
        while (depth := self.backlog()) > self.settings.max_backlog:
            if not announced:
                started = time.monotonic()
                if started - self._waited_until > QUIET_S:  # else it goes on the last wait
                    log.info(
                        "backlog %d > %d: waiting for the workers",
                        depth,
                        self.settings.max_backlog,
                    )
                announced = True
            self.on_wait(depth)
            time.sleep(0.2)
        if announced:
            self._waited_until = time.monotonic()
            self.on_wait(0)
        return time.monotonic() - started if announced else 0.0


def _numbered(records: Iterable[Any]) -> Iterator[SourceRecord | Idle]:
    for n, record in enumerate(records, 1):
        if isinstance(record, tuple | Idle):
            yield record
        else:
            yield f"record {n}", record
