-- join: ARGV = prefix, group, pattern, ephemeral(0|1), ack_wait_ms, max_deliveries,
--              start kind (new|earliest|time|seq), start value, consumer, lease_ms
local g, pattern, eph, aw, md, kind, val, consumer =
  ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local existing = redis.call('HGET', P .. ':groups', g)
if existing then
  if existing ~= pattern then return {'pattern', existing} end
else
  redis.call('HSET', P .. ':groups', g, pattern)
  redis.call('HSET', gkey(g), 'pattern', pattern, 'ack_wait', aw, 'max_deliveries', md,
    'ephemeral', eph, 'delivered', 0, 'acked', 0, 'redelivered', 0, 'dead_lettered', 0)
  local function start_id(sk)
    if kind == 'earliest' then return '0' end
    if kind == 'time' then
      local t = tonumber(val)
      if t <= 0 then return '0' end
      return num(t - 1) .. '-18446744073709551615'
    end
    if kind == 'seq' then
      local s = tonumber(val)
      local last = '0'
      local from = '-'
      while true do
        local batch = redis.call('XRANGE', sk, from, '+', 'COUNT', 100)
        if #batch == 0 then return last end
        for _, e in ipairs(batch) do
          if pid(e[1])[2] >= s then return last end
          last = e[1]
        end
        from = '(' .. last
      end
    end
    return '$'
  end
  for _, ch in ipairs(redis.call('SMEMBERS', P .. ':channels')) do
    if matches(pattern, ch) then
      redis.call('SADD', cgkey(ch), g)
      for l = 0, 3 do
        local sk = skey(ch, l)
        redis.pcall('XGROUP', 'CREATE', sk, g, start_id(sk), 'MKSTREAM')
      end
    end
  end
end
redis.call('SADD', memkey(g), consumer)
if eph == '1' then redis.call('SET', P .. ':gl:' .. g, consumer, 'PX', ARGV[10]) end
local s = redis.call('HMGET', gkey(g), 'ack_wait', 'max_deliveries')
return {'ok', s[1], s[2]}
