"""The loop of a consumer process: one ``StreamConsumer`` per partition it reads.

Each round: a heartbeat, then per partition its periodic work, reclaim and its own
pending entries (after a start or an outage), then new entries from every partition.
Beside the loop, a keeper thread renews the claim on the batch being worked on (and the
heartbeat) every ``keep_every_s``, so a slow model call never looks like a dead consumer.
A Redis error that passes (server down or restarting, a cluster electing a primary or
moving a slot, too few replicas) puts only that partition into capped backoff: on a
cluster the partitions of a healthy primary go on while another fails over. Any other
error is a bug and ends the process (its supervisor restarts it; entries in flight are
reclaimed). The loop only schedules: each consumer keeps its own cursor, backoff and
batch in flight.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from common.connection import is_cluster, is_transient, text
from common.keys import Keys
from common.lifecycle import StopFlag
from consumers.engine.consumer import StreamConsumer, consumer_name, entries_of
from consumers.engine.handler import Handler
from consumers.engine.runtime import Runtime

log = logging.getLogger(__name__)


def consume(
    rt: Runtime,
    stream_of: Callable[[Keys], str],
    group: str,
    make_handler: Callable[[Runtime], Handler],
    role: str,
    drain: bool = False,
) -> None:
    """Run one consumer per partition of this process until a stop signal (or, with
    ``drain``, until idle): ``stream_of`` names the stream in a partition's keys,
    ``make_handler`` builds the handler of a partition."""
    name = consumer_name(role)
    consumers = []
    for p in rt.settings.my_partitions:
        prt = rt.partition(p)
        consumers.append(StreamConsumer(prt, stream_of(prt.keys), group, make_handler(prt), name))
    run_consumers(consumers, rt.stop, drain)


def run_consumers(consumers: Sequence[StreamConsumer], stop: StopFlag, drain: bool = False) -> None:
    """Until a stop signal (with ``drain``, also once no new entries come)."""
    first = consumers[0]
    streams = ", ".join(c.stream for c in consumers)
    log.info("%s reading %s as group %s", first.name, streams, first.group)
    done = threading.Event()
    keeper = threading.Thread(target=_keep, args=(consumers, done), name="keeper", daemon=True)
    keeper.start()
    try:
        _rounds(consumers, stop, drain)
    finally:  # also when a handler ends it (StopConsuming): not live any more, said at once
        done.set()
        for c in consumers:
            c.leave()
    log.info("%s stopped", first.name)


def _rounds(consumers: Sequence[StreamConsumer], stop: StopFlag, drain: bool) -> None:
    first = consumers[0]
    turn = 0
    while not stop.is_set():
        _heartbeat(first)
        now = time.monotonic()
        ready = [c for c in consumers if c.due(now)]
        if not ready:
            stop.wait(min(c.resume_at for c in consumers) - now)
            continue
        for c in ready:
            _guarded([c], drain, c.prepare)
        reading = [c for c in ready if c.due(now) and c.reading_new]
        if len(reading) < len(ready):
            continue  # own pending entries first (or a partition just failed): next round
        got = _read_new(reading, turn, drain)
        turn += 1
        if drain and got == 0 and len(reading) == len(consumers):
            break


def _keep(consumers: Sequence[StreamConsumer], done: threading.Event) -> None:
    """The keeper: while a batch runs, renew the claim on its entries and the heartbeat. A
    failure is only logged: the loop itself meets the same Redis and handles it."""
    first = consumers[0]
    while not done.wait(first.loop.keep_every_s):
        busy = [c for c in consumers if c.in_flight]
        if not busy:
            continue
        try:
            first.heartbeat()
            for c in busy:
                c.renew()
        except Exception as exc:  # never let the keeper die: the next round tries again
            level = logging.DEBUG if is_transient(exc, first.redis) else logging.WARNING
            log.log(level, "%s: could not renew its claim: %s", first.name, exc)


def _heartbeat(c: StreamConsumer) -> None:
    """Liveness is reported, never required: a failed heartbeat (its key's primary failing
    over) must not stop the partitions of healthy primaries."""
    try:
        c.heartbeat()
    except (RedisError, RedisClusterException) as exc:
        if not is_transient(exc, c.redis):
            raise
        log.debug("%s: heartbeat failed: %s", c.name, exc)


def _guarded(group: Sequence[StreamConsumer], drain: bool, step: Callable[[], Any]) -> Any:
    """Run ``step``; a passing Redis error backs off the partitions in ``group`` only, a lost
    group is recreated, anything else is raised. Returns what ``step`` returned (None
    after an error)."""
    try:
        result = step()
    except (RedisError, RedisClusterException) as exc:
        if "NOGROUP" in str(exc):
            log.warning("%s: %s; recreating the group", group[0].name, exc)
            for c in group:
                c.group_lost()
            return None
        if drain or not is_transient(exc, group[0].redis):
            raise  # a one-off read says so now; a bug is not waited out
        delays = [c.outage() for c in group]
        log.log(  # once per outage: it tries every 2 s at most, many times in a long one
            logging.WARNING if group[0].outage_began else logging.DEBUG,
            "%s: Redis unavailable for %s (%s); retrying from %.1fs on, until it is back",
            group[0].name,
            ", ".join(c.stream for c in group),
            exc,
            delays[0],
        )
        return None
    lasted = [c.succeeded() for c in group]
    if lasted[0] is not None:
        log.warning("%s: Redis is back after %.1fs", group[0].name, lasted[0])
    return result


def _read_new(consumers: Sequence[StreamConsumer], turn: int, drain: bool) -> int:
    """New entries from every partition without busy-looping; returns how many came.

    On one server a single blocking XREADGROUP covers every partition's stream (COUNT is
    per stream: the batch is shared out so one read stays one batch). On a cluster the
    streams sit in different slots and no command may span slots: each is polled without
    blocking, and only when all were empty does the loop block, on one partition in turn,
    for a share of ``block_ms`` (an idle fleet wakes a few times a second; a busy one never
    blocks)."""
    first = consumers[0]
    if len(consumers) == 1:
        return _guarded([first], drain, first.read_new) or 0
    if not is_cluster(first.redis):
        return _guarded(consumers, drain, lambda: _read_together(consumers)) or 0
    got = 0
    for c in consumers:
        got += _guarded([c], drain, partial(c.read_new, None)) or 0
    if not got:
        c = consumers[turn % len(consumers)]
        share = max(first.loop.block_ms // len(consumers), 10)
        got = _guarded([c], drain, lambda: c.read_new(share)) or 0
    return got


def _read_together(consumers: Sequence[StreamConsumer]) -> int:
    first = consumers[0]
    reply: Any = first.redis.xreadgroup(
        first.group,
        first.name,
        {c.stream: ">" for c in consumers},
        count=math.ceil(first.loop.batch_size / len(consumers)),
        block=first.loop.block_ms,
    )
    by_stream = {text(stream): batch for stream, batch in reply or ()}
    batches = [entries_of([(c.stream, by_stream.get(c.stream, []))]) for c in consumers]
    for c, entries in zip(consumers, batches, strict=True):
        c.hold(entries)
    try:
        for c, entries in zip(consumers, batches, strict=True):
            c.process(entries)
        return sum(len(entries) for entries in batches)
    finally:
        for c in consumers:
            c.release()
