-- KEYS: vote hashes. Returns each as a flat field/value list: one round trip per batch.
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
