-- KEYS: ready stream, deadlines zset, stats hash, then per item: votes hash, state
-- ARGV: worker, notify_at, vote timeout s, counter field, then per item: item id, vote json,
--       item json
-- One worker's votes that share a counter (its label): per item, store the vote with the
-- item unless the item is settled (late or re-delivered votes are dropped, and no per-item
-- key is re-created); count it and start the vote timeout when it is new; notify the
-- aggregator (one entry for the whole call) once enough votes are in. The header is sent
-- once per call, and a vote runs three commands (four for an item's first vote, or when more
-- than two votes are needed to notify) where it ran four or five: per argument and per
-- command costs are most of what Redis spends on a vote (INFO commandstats, perf).
local worker, notify_at = ARGV[1], tonumber(ARGV[2])
-- The deadline on the server's clock, not the worker's: hosts' clocks disagree.
local time = redis.call('TIME')
local deadline = tonumber(time[1]) + tonumber(time[2]) / 1e6 + tonumber(ARGV[3])
local ready, counted = {}, 0
for i = 0, (#KEYS - 3) / 2 - 1 do
  local votes, state = KEYS[4 + 2 * i], KEYS[5 + 2 * i]
  local a = 4 + 3 * i
  local id = ARGV[a + 1]
  if redis.call('EXISTS', state) == 0 then
    -- The item is stored once, with the first vote; 1 = this worker's vote is new.
    local first = redis.call('HSETNX', votes, '${ITEM_IN_VOTES}', ARGV[a + 3])
    if redis.call('HSET', votes, worker, ARGV[a + 2]) == 1 then
      counted = counted + 1
      local n = 1
      if first == 1 then
        redis.call('ZADD', KEYS[2], 'NX', deadline, id)
      elseif notify_at <= 2 then
        n = 2  -- a later vote: at least the second, which is all a quorum of two needs
      else  -- less the item (an explored item's rate field adds one more: that can only
        n = redis.call('HLEN', votes) - 1  -- notify early, and the aggregator counts votes)
      end
      if n >= notify_at then ready[#ready + 1] = id end
    end
  end
end
if counted > 0 then redis.call('HINCRBY', KEYS[3], ARGV[4], counted) end
if #ready > 0 then redis.call('XADD', KEYS[1], '*', '${READY_IDS}', table.concat(ready, ' ')) end
return #ready
