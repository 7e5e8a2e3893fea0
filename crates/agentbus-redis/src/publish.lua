-- publish: ARGV = prefix, now_ms, then 8 per message: channel, lane, header json, id, size,
--          deadline_ms|'', not_before_ms|'', payload. One reply per message:
--          {0, seq, groups} stored, {1, seq, groups} duplicate, {-1, messages, bytes,
--          max_messages, max_bytes} full.
local function publish_one(ch, lane, hdr, id, size, dl, nb, payload)
  local ck = ckey(ch)
  local ddk = P .. ':dd:' .. id

  local fields = {'max_age', 'max_bytes', 'max_messages', 'discard', 'dedup', 'count', 'bytes'}
  local cfg = redis.call('HMGET', ck, unpack(fields))
  if not cfg[4] then
    -- A new channel.
    redis.call('SADD', P .. ':channels', ch)
    redis.call('INCR', P .. ':chver')
    -- Storage settings: the latest configure_channels whose pattern matches, else defaults.
    local cfgs = redis.call('LRANGE', P .. ':cfg', 0, -1)
    local chosen = nil
    for i = #cfgs, 1, -1 do
      local c = cjson.decode(cfgs[i])
      if matches(c.pattern, ch) then chosen = c break end
    end
    if chosen then
      redis.call('HSET', ck, 'max_age', chosen.max_age, 'max_bytes', chosen.max_bytes,
        'max_messages', chosen.max_messages, 'discard', chosen.discard, 'dedup', chosen.dedup)
    else
      redis.call('HSET', ck, 'max_age', '', 'max_bytes', 67108864, 'max_messages', 1000000,
        'discard', 'reject_new', 'dedup', 120000)
    end
    -- Every existing group whose pattern matches reads the new channel from its start.
    local groups = redis.call('HGETALL', P .. ':groups')
    for i = 1, #groups, 2 do
      if matches(groups[i + 1], ch) then
        redis.call('SADD', cgkey(ch), groups[i])
        for l = 0, 3 do
          redis.pcall('XGROUP', 'CREATE', skey(ch, l), groups[i], '0', 'MKSTREAM')
        end
      end
    end
    cfg = redis.call('HMGET', ck, unpack(fields))
  end
  local max_age, max_bytes, max_msgs = tonumber(cfg[1]), tonumber(cfg[2]), tonumber(cfg[3])
  local discard, dedup = cfg[4], tonumber(cfg[5])

  if dedup ~= nil and dedup > 0 then
    local seen = redis.call('GET', ddk)
    if seen then
      local sep = string.find(seen, ':', 1, true)
      return {1, tonumber(string.sub(seen, 1, sep - 1)), tonumber(string.sub(seen, sep + 1))}
    end
  end

  -- Counters read with the settings; re-read only after something was removed.
  local known_count, known_bytes = tonumber(cfg[6] or '0'), tonumber(cfg[7] or '0')

  local function remove(sk, eid, fields, floors)
    if redis.call('XDEL', sk, eid) == 0 then return end
    known_count, known_bytes = nil, nil
    redis.call('HINCRBY', ck, 'count', -1)
    redis.call('HINCRBY', ck, 'bytes', -(tonumber(entry_field(fields, 'z')) or 0))
    if not settled(floors, eid) then redis.call('HINCRBY', ck, 'dropped', 1) end
  end

  -- Age limit: entries stored before now - max_age go, counted as dropped if unread.
  if max_age then
    local t = redis.call('TIME')
    local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - max_age
    for l = 0, 3 do
      local sk = skey(ch, l)
      local floors = group_floors(sk)
      while true do
        local old = redis.call('XRANGE', sk, '-', num(cutoff - 1), 'COUNT', 100)
        if #old == 0 then break end
        for _, e in ipairs(old) do remove(sk, e[1], e[2], floors) end
      end
    end
  end

  local function count()
    if known_count == nil then known_count = tonumber(redis.call('HGET', ck, 'count') or '0') end
    return known_count
  end
  local function over()
    if known_bytes == nil then known_bytes = tonumber(redis.call('HGET', ck, 'bytes') or '0') end
    return (max_msgs ~= nil and count() + 1 > max_msgs) or
      (max_bytes ~= nil and known_bytes + size > max_bytes)
  end

  if over() then
    -- First what every group has settled (nothing when no group reads the channel).
    local floors_by_lane = {}
    for l = 0, 3 do
      local sk = skey(ch, l)
      local floors = group_floors(sk)
      floors_by_lane[l] = floors
      if floors then
        local done = false
        while not done do
          local batch = redis.call('XRANGE', sk, '-', '+', 'COUNT', 100)
          if #batch == 0 then break end
          for _, e in ipairs(batch) do
            if settled(floors, e[1]) then remove(sk, e[1], e[2], floors) else done = true break end
          end
        end
      end
    end
    while over() do
      if discard == 'drop_oldest' then
        local best = nil
        for l = 0, 3 do
          local first = redis.call('XRANGE', skey(ch, l), '-', '+', 'COUNT', 1)
          if #first > 0 then
            local q = tonumber(entry_field(first[1][2], 'q'))
            if best == nil or q < best.q then best = {q = q, lane = l, e = first[1]} end
          end
        end
        if best == nil then break end
        remove(skey(ch, best.lane), best.e[1], best.e[2], floors_by_lane[best.lane])
      else
        redis.call('HINCRBY', P .. ':n', 'rejected_full', 1)
        return {-1, count(), tonumber(redis.call('HGET', ck, 'bytes') or '0'),
          cfg[3] or '', cfg[2] or ''}
      end
    end
  end

  -- `published` is `seq`: duplicates and refused publishes take no sequence.
  local seq = redis.call('HINCRBY', ck, 'seq', 1)
  redis.call('HINCRBY', ck, 'count', 1)
  redis.call('HINCRBY', ck, 'bytes', size)
  if dl ~= '' and nb ~= '' then
    redis.call('XADD', skey(ch, lane), '*', 'h', hdr, 'p', payload, 'q', seq, 'z', size, 'd', dl, 'n', nb)
  elseif dl ~= '' then
    redis.call('XADD', skey(ch, lane), '*', 'h', hdr, 'p', payload, 'q', seq, 'z', size, 'd', dl)
  elseif nb ~= '' then
    redis.call('XADD', skey(ch, lane), '*', 'h', hdr, 'p', payload, 'q', seq, 'z', size, 'n', nb)
  else
    redis.call('XADD', skey(ch, lane), '*', 'h', hdr, 'p', payload, 'q', seq, 'z', size)
  end
  local ngroups = redis.call('SCARD', cgkey(ch))
  if dedup ~= nil and dedup > 0 then
    redis.call('SET', ddk, seq .. ':' .. ngroups, 'PX', dedup)
  end
  return {0, seq, ngroups}
end

local replies = {}
for i = 3, #ARGV, 8 do
  replies[#replies + 1] = publish_one(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
    tonumber(ARGV[i + 4]), ARGV[i + 5], ARGV[i + 6], ARGV[i + 7])
end
return replies
