"""The two server-side steps that must be atomic: casting a vote and settling an item.

They are tiny Lua scripts, not the decision rule (that stays in Python, in
``common.decision``): they only make "store the vote, notify once" and
"move the item to its final stream exactly once" race-free across replicas,
re-deliveries and crashes. All keys of one call share a hash tag (one slot).
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from redis.client import Pipeline

from common import metrics
from common.keys import Keys
from common.schemas import Vote

# KEYS: votes hash, state, ready stream, deadlines zset, stats hash
# ARGV: worker, vote json, item json, item id, notify_at (votes), deadline (epoch s),
#       counter field to increment when the vote is new
# Returns the number of votes stored, or -1 when the item is already settled
# (a late or re-delivered vote is dropped, so no per-item key is re-created).
CAST_VOTE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local added = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSETNX', KEYS[1], '_item', ARGV[3])
local n = redis.call('HLEN', KEYS[1]) - 1
if added == 1 then
  redis.call('HINCRBY', KEYS[5], ARGV[7], 1)
  redis.call('ZADD', KEYS[4], 'NX', ARGV[6], ARGV[4])
  if n >= tonumber(ARGV[5]) then redis.call('XADD', KEYS[3], '*', 'id', ARGV[4]) end
end
return n
"""

# KEYS: state, votes hash, deadlines zset, target stream, stats hash
# ARGV: expected state ('' = unsettled), new state, ttl seconds (0 = keep), item id, payload,
#       counter field to increment when this call settles the item
# Returns 1 when this call settled the item, 0 when another call already had.
SETTLE = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return 0 end
if ARGV[3] == '0' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
redis.call('XADD', KEYS[4], '*', 'id', ARGV[4], 'd', ARGV[5])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[4])
redis.call('HINCRBY', KEYS[5], ARGV[6], 1)
return 1
"""

ESCALATED = "judge"
DONE = "done"


class Scripts:
    """Registered scripts; calls go into the caller's pipeline (EVALSHA, loaded on demand)."""

    def __init__(self, redis: Redis, keys: Keys, done_ttl_s: int) -> None:
        self.keys = keys
        self.done_ttl_s = done_ttl_s
        self._cast = redis.register_script(CAST_VOTE)
        self._settle = redis.register_script(SETTLE)

    def cast_vote(
        self,
        pipe: Pipeline,
        item_id: str,
        vote: Vote,
        item: bytes,
        notify_at: int,
        deadline: float,
    ) -> None:
        k = self.keys
        counter = metrics.field(
            metrics.VOTES, {"worker": vote.worker, "label": vote.label or "abstain"}
        )
        self._cast(
            keys=[k.votes(item_id), k.state(item_id), k.ready, k.deadlines, k.stats],
            args=[vote.worker, vote.dump(), item, item_id, notify_at, f"{deadline:.3f}", counter],
            client=pipe,
        )

    def settle(
        self, pipe: Pipeline, item_id: str, stream: str, payload: bytes, counter: str
    ) -> None:
        """Make the item final: one entry in ``stream`` (output, rejects or dead), once."""
        self._run(pipe, item_id, stream, payload, counter, expect="", new=DONE)

    def escalate(self, pipe: Pipeline, item_id: str, payload: bytes) -> None:
        """Hand the item to the judge, once; its votes travel in the payload."""
        self._run(
            pipe, item_id, self.keys.judge, payload, metrics.ESCALATIONS, expect="", new=ESCALATED
        )

    def settle_escalated(
        self, pipe: Pipeline, item_id: str, stream: str, payload: bytes, counter: str
    ) -> None:
        """The judge's (or a dead letter's) final word on an escalated item, once."""
        self._run(pipe, item_id, stream, payload, counter, expect=ESCALATED, new=DONE)

    def _run(
        self,
        pipe: Pipeline,
        item_id: str,
        stream: str,
        payload: bytes,
        counter: str,
        expect: str,
        new: str,
    ) -> None:
        k = self.keys
        ttl: Any = self.done_ttl_s if new == DONE else 0
        self._settle(
            keys=[k.state(item_id), k.votes(item_id), k.deadlines, stream, k.stats],
            args=[expect, new, ttl, item_id, payload, counter],
            client=pipe,
        )
