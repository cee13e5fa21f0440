"""The server-side steps that must be atomic: adding items, casting votes, settling items,
reading votes, and who holds a pending entry.

They are small Lua scripts, not the decision rule (that stays in Python, in
``consumers.decision``): they only make "add the item once", "store the vote, notify
once", "move the item to its final stream exactly once" and "renew my claim only
on what is still mine" race-free across replicas, re-deliveries and crashes. Each
call carries a whole batch, so the hot path costs one command per batch instead of
one per item; every key is passed in KEYS and all of them share the partition's
hash tag (one cluster slot).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from string import Template
from typing import Any, NamedTuple

from redis import Redis
from redis.client import Pipeline

from common import keys as wire
from common.keys import Keys


def _lua(name: str) -> str:
    """A script of ``common/lua/``, with the wire's field names (``common.keys``) filled in,
    so Python and Lua cannot spell a field differently."""
    source = resources.files("common").joinpath(f"lua/{name}.lua").read_text()
    fields = {
        "RECORD": wire.RECORD_FIELD.decode(),
        "ITEM_ID": wire.ITEM_ID_FIELD.decode(),
        "ITEM_IN_VOTES": wire.ITEM_IN_VOTES.decode(),
        "SAMPLING_RATE_IN_VOTES": wire.SAMPLING_RATE_IN_VOTES.decode(),
        "READY_IDS": wire.READY_IDS_FIELD.decode(),
    }
    return Template(source).substitute(fields)


CAST_VOTES = _lua("cast_votes")  # store votes, notify the aggregator once per item
SETTLE = _lua("settle")  # move items to their final stream exactly once
PRODUCE = _lua("produce")  # add items unless known, once per chunk
RENEW = _lua("renew")  # reset the idle time of entries a consumer still holds
FORGET = _lua("forget")  # remove a consumer that holds nothing from its group
GATHER = _lua("gather")  # read many vote hashes in one round trip
ADVANCE = _lua("advance")  # send open items on to a later tier of workers, once
HEARTBEAT = _lua("heartbeat")  # say a consumer is alive, on the server's clock

ESCALATED = "judge"
DONE = "done"
# How long a chunk's marker is kept: a producer sends a chunk again within seconds of losing
# its reply (its retries back off to 2 s); one per chunk per partition, so not a day's worth.
CHUNK_TTL_S = 600


class Ballot(NamedTuple):  # a tuple: built and hashed per vote, as the key of its group
    """What one script call of votes shares: one worker's votes with one label's counter."""

    worker: str
    notify_at: int  # votes an item needs before the aggregator is notified
    timeout_s: float  # the vote timeout of an item this call votes on first, from Redis's TIME
    counter: str


class Settlement(NamedTuple):
    """What one settle call shares: where its items go and the state change it makes."""

    stream: str
    counter: str
    expect: str = ""  # the state they must be in: unsettled, or ESCALATED for the judge
    new: str = DONE
    also: str = ""  # a second stream written only for items given a payload for it


class Scripts:
    """The scripts of one partition; writes go into the caller's pipeline.

    They are sent with EVAL, not EVALSHA: the server caches them by digest all the same,
    a pipeline needs no SCRIPT EXISTS round trip before each batch, and a replica just
    promoted by a cluster failover (whose script cache is empty) runs them at once.
    """

    def __init__(self, keys: Keys, done_ttl_s: int) -> None:
        self.keys = keys
        self.done_ttl_s = done_ttl_s

    def cast_votes(
        self, pipe: Pipeline, ballot: Ballot, votes: Sequence[tuple[str, bytes, bytes]]
    ) -> None:
        """Cast ``(item id, vote json, item json)`` triples that share ``ballot``."""
        k = self.keys
        keys: list[Any] = [k.ready, k.deadlines, k.stats]
        args: list[Any] = [ballot.worker, ballot.notify_at, f"{ballot.timeout_s:.3f}"]
        args.append(ballot.counter)
        for item_id, vote, item in votes:
            keys += [k.votes(item_id), k.state(item_id)]
            args += [item_id, vote, item]
        _eval(pipe, CAST_VOTES, keys, args)

    def settle(
        self, pipe: Pipeline, settlement: Settlement, items: Sequence[tuple[str, bytes, bytes]]
    ) -> None:
        """Settle ``(item id, payload, payload for the second stream or b"")`` triples, each
        once."""
        k, s = self.keys, settlement
        keys: list[Any] = [k.deadlines, k.stats, s.stream, s.also or s.stream]
        ttl = self.done_ttl_s if s.new == DONE else 0
        args: list[Any] = [s.expect, s.new, ttl, s.counter]
        for item_id, payload, also in items:
            keys += [k.state(item_id), k.votes(item_id), k.queued(item_id)]
            args += [item_id, payload, also]
        _eval(pipe, SETTLE, keys, args)

    def produce(
        self, client: Redis | Pipeline, chunk: str, items: Sequence[tuple[str, bytes]]
    ) -> Any:
        """Add ``(item id, payload)`` pairs of this partition unless their id is known, once
        per ``chunk`` however often it is sent; the reply is "<new> <known>"."""
        k = self.keys
        keys: list[Any] = [k.items, k.produced(chunk)]
        for item_id, _ in items:
            keys += [k.state(item_id), k.votes(item_id), k.queued(item_id)]
        args: list[Any] = [self.done_ttl_s, CHUNK_TTL_S]
        args += [payload for _, payload in items]
        return _eval(client, PRODUCE, keys, args)

    def advance(
        self,
        pipe: Pipeline,
        tier: int,
        counter: str,
        timeout_s: float,
        items: Sequence[tuple[str, bytes, float | None]],
    ) -> None:
        """Send ``(item id, item json, sampling rate)`` on to tier ``tier``'s stream, each
        once however often it is asked; each item's vote timeout starts again (``timeout_s``
        from now, by Redis's clock). A rate (an item sent on as one of a sample) stays in the
        item's votes hash as ``SAMPLING_RATE_IN_VOTES``, the first one only."""
        k = self.keys
        keys: list[Any] = [k.tier(tier), k.deadlines, k.stats]
        args: list[Any] = [tier, counter, self.done_ttl_s, f"{timeout_s:.3f}"]
        for item_id, item, rate in items:
            keys += [k.state(item_id), k.queued(item_id), k.votes(item_id)]
            args += [item_id, item, "" if rate is None else repr(rate)]
        _eval(pipe, ADVANCE, keys, args)

    def heartbeat(self, redis: Redis, consumer: str, forget_after_s: float) -> None:
        """Stamp ``consumer`` alive now by Redis's clock; forget those silent longer than
        ``forget_after_s``."""
        _eval(redis, HEARTBEAT, [self.keys.heartbeats], [consumer, forget_after_s])

    def gather_votes(self, redis: Redis, item_ids: Sequence[str]) -> list[dict[bytes, bytes]]:
        """The vote hash of each item (empty once settled), in one round trip."""
        if not item_ids:
            return []
        keys = [self.keys.votes(i) for i in item_ids]
        reply: Any = _eval(redis, GATHER, keys, [])
        return [dict(zip(flat[::2], flat[1::2], strict=True)) for flat in reply]


def renew_claims(redis: Redis, stream: str, group: str, consumer: str, ids: Sequence[str]) -> int:
    """Reset the idle time of the entries among ``ids`` that ``consumer`` still holds."""
    return int(_eval(redis, RENEW, [stream], [group, consumer, *ids])) if ids else 0


def hand_back(
    redis: Redis,
    stream: str,
    group: str,
    consumer: str,
    done: Sequence[str],
    rest: Sequence[str],
    idle_ms: int,
) -> None:
    """A consumer stopping mid-batch: ack ``done``, and make ``rest`` look idle for
    ``idle_ms`` (XCLAIM to itself with IDLE, no delivery counted), so the group's next
    consumer reclaims them at once instead of after ``reclaim_idle_s``."""
    pipe = redis.pipeline(transaction=False)
    if done:
        pipe.xack(stream, group, *done)
    if rest:
        pipe.xclaim(stream, group, consumer, 0, list(rest), idle=idle_ms, justid=True)
    pipe.execute()


def forget_consumer(redis: Redis, stream: str, group: str, consumer: str) -> bool:
    """Delete ``consumer`` from the group if it holds no pending entry."""
    return bool(_eval(redis, FORGET, [stream], [group, consumer]))


def _eval(client: Redis | Pipeline, script: str, keys: list[Any], args: list[Any]) -> Any:
    """EVAL as a raw command: one spelling for clients, pipelines and their cluster kinds."""
    run: Any = client.execute_command
    return run("EVAL", script, len(keys), *keys, *args)
