-- admin: ARGV = prefix, op, ...
--   leave: group, consumer, now_ms  -> hands the consumer's deliveries back (due now),
--          removes it; deletes an ephemeral group without members.
--   delete: group -> 1, or 0 when there is no such group
--   configure: pattern, json
--   error: group, stream, id -> the last error recorded for an entry, or false
--   lease: group, ms -> renews a private group's lease; 0 when the group is gone
--   sweep: -> deletes private groups whose lease ran out (their process died)
local op = ARGV[2]
local function destroy(g)
  local pattern = redis.call('HGET', P .. ':groups', g)
  if not pattern then return 0 end
  for _, ch in ipairs(redis.call('SMEMBERS', P .. ':channels')) do
    if matches(pattern, ch) then
      redis.call('SREM', cgkey(ch), g)
      for l = 0, 3 do redis.pcall('XGROUP', 'DESTROY', skey(ch, l), g) end
    end
  end
  redis.call('HDEL', P .. ':groups', g)
  redis.call('DEL', gkey(g), schedkey(g), errkey(g), memkey(g), P .. ':gl:' .. g)
  return 1
end
if op == 'leave' then
  local g, c, now = ARGV[3], ARGV[4], ARGV[5]
  local pattern = redis.call('HGET', P .. ':groups', g)
  if not pattern then return 0 end
  local handed = 0
  for _, ch in ipairs(redis.call('SMEMBERS', P .. ':channels')) do
    if matches(pattern, ch) then
      for l = 0, 3 do
        local sk = skey(ch, l)
        local ok, p = pcall(redis.call, 'XPENDING', sk, g, '-', '+', 100000, c)
        if ok then
          for _, e in ipairs(p) do
            redis.call('XCLAIM', sk, g, '_parked', 0, e[1], 'JUSTID')
            redis.call('ZADD', schedkey(g), now, sk .. '|' .. e[1])
            handed = handed + 1
          end
          redis.pcall('XGROUP', 'DELCONSUMER', sk, g, c)
        end
      end
    end
  end
  redis.call('SREM', memkey(g), c)
  if redis.call('HGET', gkey(g), 'ephemeral') == '1' and redis.call('SCARD', memkey(g)) == 0 then
    destroy(g)
  end
  return handed
end
if op == 'delete' then return destroy(ARGV[3]) end
if op == 'configure' then
  local pattern, json = ARGV[3], ARGV[4]
  redis.call('RPUSH', P .. ':cfg', json)
  local c = cjson.decode(json)
  for _, ch in ipairs(redis.call('SMEMBERS', P .. ':channels')) do
    if matches(pattern, ch) then
      redis.call('HSET', ckey(ch), 'max_age', c.max_age, 'max_bytes', c.max_bytes,
        'max_messages', c.max_messages, 'discard', c.discard, 'dedup', c.dedup)
    end
  end
  return 1
end
if op == 'error' then
  return redis.call('HGET', errkey(ARGV[3]), ARGV[4] .. '|' .. ARGV[5])
end
if op == 'lease' then
  if redis.call('HEXISTS', P .. ':groups', ARGV[3]) == 0 then return 0 end
  redis.call('SET', P .. ':gl:' .. ARGV[3], '1', 'PX', ARGV[4])
  return 1
end
if op == 'sweep' then
  local swept = 0
  local groups = redis.call('HKEYS', P .. ':groups')
  for _, g in ipairs(groups) do
    if redis.call('HGET', gkey(g), 'ephemeral') == '1' and redis.call('EXISTS', P .. ':gl:' .. g) == 0 then
      swept = swept + destroy(g)
    end
  end
  return swept
end
return redis.error_reply('unknown admin op ' .. op)
