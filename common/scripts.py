"""The server-side steps that must be atomic: adding items, casting votes, settling items,
reading votes, and who holds a pending entry.

They are small Lua scripts, not the decision rule (that stays in Python, in
``common.decision``): they only make "add the item once", "store the vote, notify
once", "move the item to its final stream exactly once" and "renew my claim only
on what is still mine" race-free across replicas, re-deliveries and crashes. Each
call carries a whole batch, so the hot path costs one command per batch instead of
one per item; every key is passed in KEYS and all of them share the partition's
hash tag (one cluster slot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline

from common.keys import Keys
from common.validation import ITEM_FIELD

# KEYS: ready stream, deadlines zset, stats hash, then per item: votes hash, state
# ARGV: per item: item id, worker, vote json, item json, notify_at, deadline, counter field
# For each item: store the vote unless the item is settled (late or re-delivered votes are
# dropped, and no per-item key is re-created); count it and start the vote timeout when it
# is new; notify the aggregator (one entry for the whole batch) once enough votes are in.
CAST_VOTES = """
local ready = {}
for i = 0, (#KEYS - 3) / 2 - 1 do
  local votes, state = KEYS[4 + 2 * i], KEYS[5 + 2 * i]
  local a = 7 * i
  local id = ARGV[a + 1]
  if redis.call('EXISTS', state) == 0 then
    local added = redis.call('HSET', votes, ARGV[a + 2], ARGV[a + 3])
    redis.call('HSETNX', votes, '_item', ARGV[a + 4])
    if added == 1 then
      local n = redis.call('HLEN', votes) - 1
      redis.call('HINCRBY', KEYS[3], ARGV[a + 7], 1)
      if n == 1 then redis.call('ZADD', KEYS[2], 'NX', ARGV[a + 6], id) end
      if n >= tonumber(ARGV[a + 5]) then ready[#ready + 1] = id end
    end
  end
end
if #ready > 0 then redis.call('XADD', KEYS[1], '*', 'ids', table.concat(ready, ' ')) end
return #ready
"""

# KEYS: deadlines zset, stats hash, then per item: state, votes hash, target stream, a
#       second stream (the judge's, for an audit), and its queued marker
# ARGV: per item: expected state ('' = unsettled), new state, ttl s (0 = keep), item id,
#       payload, counter field, payload for the second stream ('' = none)
# Settles each item whose state is as expected: one entry in its target stream (and one in
# the second, only then: an audit is sent once however often the item is settled), the
# votes, the queued marker and the deadline gone, the counter incremented. Returns 1/0
# per item.
SETTLE = """
local done = {}
for i = 0, (#KEYS - 2) / 5 - 1 do
  local state, votes, target = KEYS[3 + 5 * i], KEYS[4 + 5 * i], KEYS[5 + 5 * i]
  local a = 7 * i
  local cur = redis.call('GET', state) or ''
  if cur == ARGV[a + 1] then
    if ARGV[a + 3] == '0' then
      redis.call('SET', state, ARGV[a + 2])
    else
      redis.call('SET', state, ARGV[a + 2], 'EX', ARGV[a + 3])
    end
    redis.call('XADD', target, '*', 'id', ARGV[a + 4], 'd', ARGV[a + 5])
    if ARGV[a + 7] ~= '' then
      redis.call('XADD', KEYS[6 + 5 * i], '*', 'id', ARGV[a + 4], 'd', ARGV[a + 7])
    end
    redis.call('DEL', votes, KEYS[7 + 5 * i])
    redis.call('ZREM', KEYS[1], ARGV[a + 4])
    redis.call('HINCRBY', KEYS[2], ARGV[a + 6], 1)
    done[i + 1] = 1
  else
    done[i + 1] = 0
  end
end
return done
"""

# KEYS: items stream, this chunk's marker, then per item: state, votes hash, queued marker
# ARGV: queued ttl s, chunk marker ttl s, item field, then per item: payload
# Adds each item whose id the fleet does not know (no state: not settled or escalated; no
# votes: not being voted on; not queued: waiting in the stream), marks it queued, and
# records "<new> <known>" under the chunk's marker. The chunk sent again (its reply was lost
# to a timeout or a dropped connection) finds that marker and adds nothing: it returns the
# counts of the first time, and rewrites the marker so that a WAIT after it also covers
# the first write. (Sent again after the marker expired, it still adds nothing: its items
# are queued or settled by then; only the counts call them known.)
PRODUCE = """
local done = redis.call('GET', KEYS[2])
if not done then
  local new, known = 0, 0
  for i = 0, (#KEYS - 2) / 3 - 1 do
    local queued = KEYS[5 + 3 * i]
    if redis.call('EXISTS', KEYS[3 + 3 * i], KEYS[4 + 3 * i], queued) == 0 then
      redis.call('XADD', KEYS[1], '*', ARGV[3], ARGV[4 + i])
      redis.call('SET', queued, 1, 'EX', ARGV[1])
      new = new + 1
    else
      known = known + 1
    end
  end
  done = new .. ' ' .. known
end
redis.call('SET', KEYS[2], done, 'EX', ARGV[2])
return done
"""

# KEYS: stream. ARGV: group, consumer, entry ids.
# Resets the idle time of those entries that this consumer still holds (XCLAIM to itself,
# JUSTID: the delivery count stays), so a live consumer keeps what it works on however long
# the model takes; an entry another consumer has taken meanwhile is left with it.
RENEW = """
local mine, args = 0, {KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    args[#args + 1] = ARGV[i]
    mine = mine + 1
  end
  if #args == 1004 or (i == #ARGV and #args > 4) then
    args[#args + 1] = 'JUSTID'
    redis.call('XCLAIM', unpack(args))
    args = {KEYS[1], ARGV[1], ARGV[2], 0}
  end
end
return mine
"""

# KEYS: stream. ARGV: group, consumer.
# Removes a consumer from the group only if it holds nothing pending (XGROUP DELCONSUMER
# would drop its pending entries, and they would never be delivered again).
FORGET = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: vote hashes. Returns each as a flat field/value list: one round trip per batch.
GATHER = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
"""

ESCALATED = "judge"
DONE = "done"
# How long a chunk's marker is kept: a producer sends a chunk again within seconds of losing
# its reply (its retries back off to 10 s); one per chunk per partition, so not a day's worth.
CHUNK_TTL_S = 600


@dataclass(frozen=True)
class CastVote:
    item_id: str
    worker: str
    vote: bytes
    item: bytes
    notify_at: int
    deadline: float
    counter: str


@dataclass(frozen=True)
class Settle:
    item_id: str
    stream: str
    payload: bytes
    counter: str
    expect: str = ""  # the state it must be in: unsettled, or ESCALATED for the judge
    new: str = DONE
    also: tuple[str, bytes] | None = None  # (stream, payload) added only if it settles


class Scripts:
    """The scripts of one partition; writes go into the caller's pipeline.

    They are sent with EVAL, not EVALSHA: the server caches them by digest all the same,
    a pipeline needs no SCRIPT EXISTS round trip before each batch, and a replica just
    promoted by a cluster failover (whose script cache is empty) runs them at once.
    """

    def __init__(self, keys: Keys, done_ttl_s: int) -> None:
        self.keys = keys
        self.done_ttl_s = done_ttl_s

    def cast_votes(self, pipe: Pipeline, casts: Sequence[CastVote]) -> None:
        k = self.keys
        keys: list[Any] = [k.ready, k.deadlines, k.stats]
        args: list[Any] = []
        for c in casts:
            keys += [k.votes(c.item_id), k.state(c.item_id)]
            args += [
                c.item_id,
                c.worker,
                c.vote,
                c.item,
                c.notify_at,
                f"{c.deadline:.3f}",
                c.counter,
            ]
        _eval(pipe, CAST_VOTES, keys, args)

    def settle(self, pipe: Pipeline, settles: Sequence[Settle]) -> None:
        k = self.keys
        keys: list[Any] = [k.deadlines, k.stats]
        args: list[Any] = []
        for s in settles:
            also_stream, also_payload = s.also or (s.stream, b"")
            keys += [k.state(s.item_id), k.votes(s.item_id), s.stream, also_stream]
            keys.append(k.queued(s.item_id))
            ttl = self.done_ttl_s if s.new == DONE else 0
            args += [s.expect, s.new, ttl, s.item_id, s.payload, s.counter, also_payload]
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
        args: list[Any] = [self.done_ttl_s, CHUNK_TTL_S, ITEM_FIELD]
        args += [payload for _, payload in items]
        return _eval(client, PRODUCE, keys, args)

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


def forget_consumer(redis: Redis, stream: str, group: str, consumer: str) -> bool:
    """Delete ``consumer`` from the group if it holds no pending entry."""
    return bool(_eval(redis, FORGET, [stream], [group, consumer]))


def _eval(client: Redis | Pipeline, script: str, keys: list[Any], args: list[Any]) -> Any:
    """EVAL as a raw command: one spelling for clients, pipelines and their cluster kinds."""
    run: Any = client.execute_command
    return run("EVAL", script, len(keys), *keys, *args)
