-- KEYS: stream. ARGV: group, consumer.
-- Removes a consumer from the group only if it holds nothing pending (XGROUP DELCONSUMER
-- would drop its pending entries, and they would never be delivered again).
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
