-- ack: the bulk ack of fast.rs. KEYS = group hash, parked set, recorded errors.
-- ARGV = group, claims the deliveries were taken at, deliveries of native takes not
-- yet counted (added to `delivered` first, whatever happens next), stream count, then
-- per stream: stream, n, n ids; then `stream|id` members to clean up (entries
-- delivered before).
-- Returns how many entries were acked, -1 when an entry may have been claimed by
-- another consumer since it was taken (the group's `claims` counter moved: the client
-- then acks entry by entry, so each answer is exact), -2 when the group is gone.
-- Standalone (no prelude): it needs no key layout, only its keys.
local gk, sched, ek = KEYS[1], KEYS[2], KEYS[3]
local g = ARGV[1]
if ARGV[3] ~= '0' and redis.call('EXISTS', gk) == 1 then
  redis.call('HINCRBY', gk, 'delivered', ARGV[3])
end
local claims = redis.call('HGET', gk, 'claims')
if not claims then
  if redis.call('EXISTS', gk) == 0 then return -2 end
  claims = '0'
end
if claims ~= ARGV[2] then return -1 end
local acked = 0
local i = 5
for _ = 1, tonumber(ARGV[4]) do
  local sk, n = ARGV[i], tonumber(ARGV[i + 1])
  -- unpack has a stack limit: ack at most 1000 ids per command. The ids go straight
  -- from ARGV (a table of them first cost about 700 server instructions per id).
  for from = i + 2, i + 1 + n, 1000 do
    local ok, r = pcall(redis.call, 'XACK', sk, g, unpack(ARGV, from, math.min(from + 999, i + 1 + n)))
    if ok then acked = acked + r end
  end
  i = i + 2 + n
end
if i <= #ARGV then
  for from = i, #ARGV, 1000 do
    local to = math.min(from + 999, #ARGV)
    redis.call('ZREM', sched, unpack(ARGV, from, to))
    redis.call('HDEL', ek, unpack(ARGV, from, to))
  end
end
if acked > 0 then redis.call('HINCRBY', gk, 'acked', acked) end
return acked
