-- KEYS: stream. ARGV: group, consumer, entry ids.
-- Resets the idle time of those entries that this consumer still holds (XCLAIM to itself,
-- JUSTID: the delivery count stays), so a live consumer keeps what it works on however long
-- the model takes; an entry another consumer has taken meanwhile is left with it.
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
