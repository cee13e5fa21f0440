-- KEYS: deadlines zset, stats hash, target stream, a second stream (the judge's, for an
--       audit), then per item: state, votes hash, queued marker
-- ARGV: expected state ('' = unsettled), new state, ttl s (0 = keep), counter fields (one per
--       line), then
--       per item: item id, payload, payload for the second stream ('' = none)
-- Settles each item whose state is as expected: one entry in the target stream (and one in
-- the second, only then: an audit is sent once however often the item is settled), the
-- votes, the queued marker and the deadline gone, the counter incremented once per call.
-- One call settles items of one kind (same target, states and counter): what they share
-- is sent once. Returns 1/0 per item.
local expect, new, ttl = ARGV[1], ARGV[2], ARGV[3]
local done, settled = {}, 0
for i = 0, (#KEYS - 4) / 3 - 1 do
  local state, votes, queued = KEYS[5 + 3 * i], KEYS[6 + 3 * i], KEYS[7 + 3 * i]
  local a = 4 + 3 * i
  local id = ARGV[a + 1]
  if (redis.call('GET', state) or '') == expect then
    if ttl == '0' then
      redis.call('SET', state, new)
    else
      redis.call('SET', state, new, 'EX', ttl)
    end
    redis.call('XADD', KEYS[3], '*', '${ITEM_ID}', id, '${RECORD}', ARGV[a + 2])
    if ARGV[a + 3] ~= '' then
      redis.call('XADD', KEYS[4], '*', '${ITEM_ID}', id, '${RECORD}', ARGV[a + 3])
    end
    redis.call('DEL', votes, queued)
    redis.call('ZREM', KEYS[1], id)
    settled = settled + 1
    done[i + 1] = 1
  else
    done[i + 1] = 0
  end
end
if settled > 0 then
  for counter in string.gmatch(ARGV[4], '[^\n]+') do
    redis.call('HINCRBY', KEYS[2], counter, settled)
  end
end
return done
