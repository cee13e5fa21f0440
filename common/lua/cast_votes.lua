-- KEYS: ready stream, deadlines zset, stats hash, then per item: votes hash, state
-- ARGV: per item: item id, worker, vote json, item json, notify_at, deadline, counter field
-- For each item: store the vote unless the item is settled (late or re-delivered votes are
-- dropped, and no per-item key is re-created); count it and start the vote timeout when it
-- is new; notify the aggregator (one entry for the whole batch) once enough votes are in.
-- Counters are summed per field and written once per batch, not once per vote.
local ready, counts = {}, {}
for i = 0, (#KEYS - 3) / 2 - 1 do
  local votes, state = KEYS[4 + 2 * i], KEYS[5 + 2 * i]
  local a = 7 * i
  local id = ARGV[a + 1]
  if redis.call('EXISTS', state) == 0 then
    local added = redis.call('HSET', votes, ARGV[a + 2], ARGV[a + 3])
    redis.call('HSETNX', votes, '${ITEM_IN_VOTES}', ARGV[a + 4])
    if added == 1 then
      local n = redis.call('HLEN', votes) - 1
      counts[ARGV[a + 7]] = (counts[ARGV[a + 7]] or 0) + 1
      if n == 1 then redis.call('ZADD', KEYS[2], 'NX', ARGV[a + 6], id) end
      if n >= tonumber(ARGV[a + 5]) then ready[#ready + 1] = id end
    end
  end
end
for field, n in pairs(counts) do redis.call('HINCRBY', KEYS[3], field, n) end
if #ready > 0 then redis.call('XADD', KEYS[1], '*', '${READY_IDS}', table.concat(ready, ' ')) end
return #ready
