"""The server-side steps that must be atomic: casting votes, settling items, reading votes.

They are small Lua scripts, not the decision rule (that stays in Python, in
``common.decision``): they only make "store the vote, notify once" and "move the
item to its final stream exactly once" race-free across replicas, re-deliveries
and crashes. Each call carries a whole batch, so the hot path costs one command
per batch instead of one per item; every key is passed in KEYS and all of them
share the partition's hash tag (one cluster slot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline

from common.keys import Keys

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

# KEYS: deadlines zset, stats hash, then per item: state, votes hash, target stream, and
#       a second stream (the judge's, for an audit)
# ARGV: per item: expected state ('' = unsettled), new state, ttl s (0 = keep), item id,
#       payload, counter field, payload for the second stream ('' = none)
# Settles each item whose state is as expected: one entry in its target stream (and one in
# the second, only then: an audit is sent once however often the item is settled), the
# votes and the deadline gone, the counter incremented. Returns 1/0 per item.
SETTLE = """
local done = {}
for i = 0, (#KEYS - 2) / 4 - 1 do
  local state, votes, target = KEYS[3 + 4 * i], KEYS[4 + 4 * i], KEYS[5 + 4 * i]
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
      redis.call('XADD', KEYS[6 + 4 * i], '*', 'id', ARGV[a + 4], 'd', ARGV[a + 7])
    end
    redis.call('DEL', votes)
    redis.call('ZREM', KEYS[1], ARGV[a + 4])
    redis.call('HINCRBY', KEYS[2], ARGV[a + 6], 1)
    done[i + 1] = 1
  else
    done[i + 1] = 0
  end
end
return done
"""

# KEYS: vote hashes. Returns each as a flat field/value list: one round trip per batch.
GATHER = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
"""

ESCALATED = "judge"
DONE = "done"


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
            ttl = self.done_ttl_s if s.new == DONE else 0
            args += [s.expect, s.new, ttl, s.item_id, s.payload, s.counter, also_payload]
        _eval(pipe, SETTLE, keys, args)

    def gather_votes(self, redis: Redis, item_ids: Sequence[str]) -> list[dict[bytes, bytes]]:
        """The vote hash of each item (empty once settled), in one round trip."""
        if not item_ids:
            return []
        keys = [self.keys.votes(i) for i in item_ids]
        reply: Any = _eval(redis, GATHER, keys, [])
        return [dict(zip(flat[::2], flat[1::2], strict=True)) for flat in reply]


def _eval(client: Redis | Pipeline, script: str, keys: list[Any], args: list[Any]) -> Any:
    """EVAL as a raw command: one spelling for clients, pipelines and their cluster kinds."""
    run: Any = client.execute_command
    return run("EVAL", script, len(keys), *keys, *args)
