-- KEYS: items stream, this chunk's marker, then per item: state, votes hash, queued marker
-- ARGV: queued ttl s, chunk marker ttl s, then per item: payload
-- Adds each item whose id the fleet does not know (no state: not settled or escalated; no
-- votes: not being voted on; not queued: waiting in the stream), marks it queued, and
-- records "<new> <known>" under the chunk's marker. The chunk sent again (its reply was lost
-- to a timeout or a dropped connection) finds that marker and adds nothing: it returns the
-- counts of the first time, and rewrites the marker so that a WAIT after it also covers
-- the first write. (Sent again after the marker expired, it still adds nothing: its items
-- are queued or settled by then; only the counts call them known.)
local done = redis.call('GET', KEYS[2])
if not done then
  local new, known = 0, 0
  for i = 0, (#KEYS - 2) / 3 - 1 do
    local queued = KEYS[5 + 3 * i]
    if redis.call('EXISTS', KEYS[3 + 3 * i], KEYS[4 + 3 * i], queued) == 0 then
      redis.call('XADD', KEYS[1], '*', '${RECORD}', ARGV[3 + i])
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
