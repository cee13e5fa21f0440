"""The producer: validate records, give them ids, XADD them in pipelined chunks, with backpressure.

    from producers import Producer
    report = Producer(redis, settings).send([{"task": "sentiment", "text": "Thanks!"}])

A record that fails validation is reported (with where it came from) and skipped;
the rest still go. When the slowest worker group lags more than ``max_backlog``
entries behind, ``send`` waits instead of piling more onto Redis.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
from redis import Redis

from common.keys import Keys
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
        self.keys = Keys(settings.namespace)
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

    def encode(self, record: dict[str, Any]) -> bytes:
        item = self.prepare(record)
        try:
            return item.dump()
        except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate in the text
            raise InvalidItem(f"cannot be encoded as JSON: {exc}") from None

    def send(
        self,
        records: Iterable[dict[str, Any]] | Iterable[Record],
        on_progress: Callable[[int], None] | None = None,
        rate: float | None = None,
    ) -> ProduceReport:
        """Produce every valid record; ``records`` are dicts or ``(where, dict)`` pairs. With
        ``rate``, at most that many items per second (a chunk at a time), for steady load."""
        report = ProduceReport()
        chunk: list[bytes] = []
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
        self, chunk: list[bytes], report: ProduceReport, on_progress: Callable[[int], None] | None
    ) -> None:
        if not chunk:
            return
        backoff = 0.2
        while True:
            try:
                report.waited_s += self.wait_for_room()
                pipe = self.redis.pipeline(transaction=False)
                for payload in chunk:
                    pipe.xadd(self.keys.items, {ITEM_FIELD: payload})
                pipe.execute()
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
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

    def backlog(self) -> int:
        """Entries the slowest worker group has not read yet (the stream length before any
        group exists). Read from Redis each time: never a counter that could drift."""
        groups = (
            self.redis.xinfo_groups(self.keys.items) if self.redis.exists(self.keys.items) else []
        )
        if not groups:
            return int(self.redis.xlen(self.keys.items))
        lags: list[Any] = [g.get("lag") for g in groups]
        if None in lags:  # lag unknown after deletions: be conservative
            return int(self.redis.xlen(self.keys.items))
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
