-- KEYS: deadlines zset, stats hash, then per item: state, votes hash, target stream, a
--       second stream (the judge's, for an audit), and its queued marker
-- ARGV: per item: expected state ('' = unsettled), new state, ttl s (0 = keep), item id,
--       payload, counter field, payload for the second stream ('' = none)
-- Settles each item whose state is as expected: one entry in its target stream (and one in
-- the second, only then: an audit is sent once however often the item is settled), the
-- votes, the queued marker and the deadline gone, the counter incremented. Returns 1/0
-- per item.
local done, counts = {}, {}  -- counters summed per field, written once per batch
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
    redis.call('XADD', target, '*', '${ITEM_ID}', ARGV[a + 4], '${RECORD}', ARGV[a + 5])
    if ARGV[a + 7] ~= '' then
      redis.call('XADD', KEYS[6 + 5 * i], '*', '${ITEM_ID}', ARGV[a + 4], '${RECORD}', ARGV[a + 7])
    end
    redis.call('DEL', votes, KEYS[7 + 5 * i])
    redis.call('ZREM', KEYS[1], ARGV[a + 4])
    counts[ARGV[a + 6]] = (counts[ARGV[a + 6]] or 0) + 1
    done[i + 1] = 1
  else
    done[i + 1] = 0
  end
end
for field, n in pairs(counts) do redis.call('HINCRBY', KEYS[2], field, n) end
return done
