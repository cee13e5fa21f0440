-- KEYS: the tier's stream, deadlines zset, stats hash, then per item: state, queued marker,
-- votes hash
-- ARGV: tier, counter field, queued ttl s, vote timeout s, then per item: item id, item json,
-- sampling rate ('' for none)
-- Sends each open item on to a later tier of workers, once: its queued marker holds 1 + the
-- tier it was last sent to (1: the items stream, as produce.lua sets it), so a second
-- decision to send it there (another notice of the same votes, a replica, a re-delivery)
-- finds it sent and adds nothing. The item's vote timeout starts again (its state says it is
-- open, so it is awaited); the counter counts the items sent. An item sent on as one of a
-- sample (exploration) keeps the sample's rate in its votes hash, once: the judge's lesson
-- must weigh it by the rate it was sent at, whatever the aggregator decides later.
local tier = tonumber(ARGV[1])
local time = redis.call('TIME')  -- the server's clock: hosts' clocks disagree
local deadline = tonumber(time[1]) + tonumber(time[2]) / 1e6 + tonumber(ARGV[4])
local sent = 0
for i = 0, (#KEYS - 3) / 3 - 1 do
  local state, queued, votes = KEYS[4 + 3 * i], KEYS[5 + 3 * i], KEYS[6 + 3 * i]
  local a = 5 + 3 * i
  local marker = redis.call('GET', queued)
  if redis.call('EXISTS', state) == 0 and (tonumber(marker) or 1) < tier + 1 then
    if marker then
      redis.call('SET', queued, tier + 1, 'KEEPTTL')
    else  -- expired, or never set (an item added by hand): it expires like produce's
      redis.call('SET', queued, tier + 1, 'EX', ARGV[3])
    end
    redis.call('XADD', KEYS[1], '*', '${RECORD}', ARGV[a + 1])
    redis.call('ZADD', KEYS[2], deadline, ARGV[a])
    if ARGV[a + 2] ~= '' then
      redis.call('HSETNX', votes, '${SAMPLING_RATE_IN_VOTES}', ARGV[a + 2])
    end
    sent = sent + 1
  end
end
if sent > 0 then redis.call('HINCRBY', KEYS[3], ARGV[2], sent) end
return sent
