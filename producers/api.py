"""The producer: validate records, give them ids, XADD them in pipelined chunks, with backpressure.

    from producers import Producer
    report = Producer(redis, settings).send([{"task": "sentiment", "text": "Thanks!"}])

A record that fails validation is reported (with where it came from) and skipped;
the rest still go. When the slowest worker group lags more than ``max_backlog``
entries behind, ``send`` waits instead of piling more onto Redis.
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

from common.consumer import is_cluster, is_transient
from common.keys import all_partitions, claim_partitions, partition_of
from common.schemas import Item, now
from common.settings import Settings
from common.validation import ITEM_FIELD, InvalidItem, validate_item

log = logging.getLogger(__name__)

# (where the record came from, e.g. a line number; the record or the reason it is unusable)
Record = tuple[str, "dict[str, Any] | InvalidItem"]


@dataclass
class ProduceReport:
    produced: int = 0
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    waited_s: float = 0.0  # time spent blocked by backpressure
    unreplicated: int = 0  # stored, but not confirmed by ``wait_replicas`` replicas in time


class Producer:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        chunk_size: int = 500,
        default_task: str | None = None,
        wait_for_redis: bool = False,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.partitions = all_partitions(settings.namespace, settings.partitions)
        self._claimed = False
        self.chunk_size = chunk_size
        self.default_task = default_task
        self.wait_for_redis = wait_for_redis  # else a Redis outage raises at once

    def prepare(self, record: dict[str, Any]) -> Item:
        """Validate one record; fill in the task default, an id if absent, and the time."""
        data = dict(record)
        if self.default_task is not None:
            data.setdefault("task", self.default_task)
        if data.get("id") is None:
            data["id"] = uuid.uuid4().hex
        data["produced_at"] = now()
        return validate_item(data, self.settings)

    def encode(self, record: dict[str, Any]) -> tuple[str, bytes]:
        """The items stream the record goes to (by its id's partition), and its payload."""
        item = self.prepare(record)
        try:
            payload = item.dump()
        except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate in the text
            raise InvalidItem(f"cannot be encoded as JSON: {exc}") from None
        return self.partitions[partition_of(item.id, len(self.partitions))].items, payload

    def send(
        self,
        records: Iterable[dict[str, Any]] | Iterable[Record],
        on_progress: Callable[[int], None] | None = None,
        rate: float | None = None,
    ) -> ProduceReport:
        """Produce every valid record; ``records`` are dicts or ``(where, dict)`` pairs. With
        ``rate``, at most that many items per second (a chunk at a time), for steady load."""
        report = ProduceReport()
        chunk: list[tuple[str, bytes]] = []
        started = time.monotonic()

        def flush() -> None:
            self._flush(chunk, report, on_progress)
            if rate:
                time.sleep(max(0.0, started + report.produced / rate - time.monotonic()))

        for where, record in _numbered(records):
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
        chunk: list[tuple[str, bytes]],
        report: ProduceReport,
        on_progress: Callable[[int], None] | None,
    ) -> None:
        if not chunk:
            return
        backoff = 0.2
        while True:
            try:
                if not self._claimed:
                    claim_partitions(self.redis, self.settings.namespace, len(self.partitions))
                    self._claimed = True
                report.waited_s += self.wait_for_room()
                report.unreplicated += self._send(chunk)
                break
            except (RedisError, RedisClusterException) as exc:
                if not is_transient(exc, self.redis):
                    raise
                if is_cluster(self.redis):  # a failover or a slot move: learn the new map
                    with contextlib.suppress(RedisError, RedisClusterException):
                        self.redis.nodes_manager.initialize()  # type: ignore[attr-defined]
                if not self.wait_for_redis:
                    raise
                # A chunk cut off mid-way is sent again: ids make the repeats harmless.
                log.warning("Redis unavailable (%s); retrying in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        report.produced += len(chunk)
        if on_progress is not None:
            on_progress(len(chunk))
        chunk.clear()

    def _send(self, chunk: list[tuple[str, bytes]]) -> int:
        """XADD the chunk in one round trip per server; with ``wait_replicas``, each server's
        pipeline ends with WAIT (it counts the writes of its own connection). Returns how
        many items were not confirmed on enough replicas: they are stored, but a failover
        right now could lose them, so they are reported, never silently trusted."""
        wanted = self.settings.wait_replicas
        by_server: dict[Any, list[tuple[str, bytes]]] = {}
        for stream, payload in chunk:  # without WAIT, the (cluster) client splits it up itself
            server = self._server_of(stream) if wanted else self.redis
            by_server.setdefault(server, []).append((stream, payload))
        unconfirmed = 0
        for server, rows in by_server.items():
            pipe = server.pipeline(transaction=False)
            for stream, payload in rows:
                pipe.xadd(stream, {ITEM_FIELD: payload})
            if wanted:
                pipe.execute_command("WAIT", wanted, self.settings.wait_timeout_ms)
            replies = pipe.execute()
            if wanted and int(replies[-1]) < wanted:
                unconfirmed += len(rows)
                log.warning(
                    "%d items not confirmed by %d replicas within %d ms",
                    len(rows),
                    wanted,
                    self.settings.wait_timeout_ms,
                )
        return unconfirmed

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
                log.info(
                    "backlog %d > %d: waiting for the workers", depth, self.settings.max_backlog
                )
                announced = True
            time.sleep(0.2)
        return time.monotonic() - started if announced else 0.0


def _numbered(records: Iterable[Any]) -> Iterator[Record]:
    for n, record in enumerate(records, 1):
        if isinstance(record, tuple):
            yield record
        else:
            yield f"record {n}", record
