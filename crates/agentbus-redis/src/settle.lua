-- settle: ARGV = prefix, group, op (nack|dead), then per op:
-- (acks are plain pipelined XACKs, see fast.rs)
--   nack: stream, id, due_ms, error|''            -> 1, or 0 when no longer pending
--   dead: stream, id, dead-letter id, channel, reason, json, expired(0|1) -> 1 or 0
local g, op = ARGV[2], ARGV[3]
local gk, sched, ek = gkey(g), schedkey(g), errkey(g)
local sk, id = ARGV[4], ARGV[5]
local member = sk .. '|' .. id
local ok, p = pcall(redis.call, 'XPENDING', sk, g, id, id, 1)
if not ok or #p == 0 then return 0 end
if op == 'nack' then
  if ARGV[7] ~= '' then redis.call('HSET', ek, member, ARGV[7]) end
  redis.call('XCLAIM', sk, g, '_parked', 0, id, 'JUSTID')
  redis.call('ZADD', sched, ARGV[6], member)
  return 1
end
-- dead
redis.call('XACK', sk, g, id)
redis.call('ZREM', sched, member)
redis.call('HDEL', ek, member)
redis.call('XADD', P .. ':dlq', 'MAXLEN', '~', 100000, '*', 'i', ARGV[6], 'c', ARGV[7], 'r', ARGV[8], 'j', ARGV[9])
if redis.call('EXISTS', gk) == 1 then redis.call('HINCRBY', gk, 'dead_lettered', 1) end
if ARGV[10] == '1' then redis.call('HINCRBY', P .. ':n', 'expired', 1) end
return 1
