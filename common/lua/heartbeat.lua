-- KEYS: heartbeats zset
-- ARGV: consumer name, seconds after which a silent consumer is forgotten
-- Stamps the consumer with the server's clock, not its host's: `tribunal health` on another
-- host judges liveness by the same clock (a host minutes behind must not look dead).
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1e6
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
