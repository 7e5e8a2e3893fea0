-- take: ARGV = prefix, group, consumer, room, now_ms, ack_wait_ms, max_deliveries,
--       mode (0: no ack-wait scan, 1: scan, 2: scan but read no new entries — the
--       consumer reads those natively, fast.rs), channels...
-- Hands out up to `room` deliveries, highest priority lane first; within a lane, due
-- redeliveries (scheduled, then ack-wait expired) before new entries. Also returns
-- entries the client must dead-letter (expired deadline, deliveries used up).
-- Reply: {status, chver, next_due, out..., last ids..., claims} where each out item is
-- {kind, stream, id, delivery_count, message} (the sequence is the id's second part,
-- `message` the binary header + payload of wire.rs) and `claims` the group's count of
-- ack-wait claims (see the fast ack in fast.rs).
local g, c = ARGV[2], ARGV[3]
local room = tonumber(ARGV[4])
local now = tonumber(ARGV[5])
local aw = tonumber(ARGV[6])
local md = tonumber(ARGV[7])
local scan = ARGV[8] ~= '0'
local read_new = ARGV[8] ~= '2'
local chans = {}
for i = 9, #ARGV do chans[#chans + 1] = ARGV[i] end
local gk, sched = gkey(g), schedkey(g)
if redis.call('EXISTS', gk) == 0 then return {'gone'} end

local out = {}
local delivered, redelivered = 0, 0
local function pending_count(sk, id)
  local p = redis.call('XPENDING', sk, g, id, id, 1)
  if #p == 0 then return 0 end
  return tonumber(p[1][4])
end
-- An entry now held by this consumer: deliver it, or report it for dead letters.
local function consider(sk, e, count, first)
  local fields = e[2]
  local d = tonumber(entry_field(fields, 'd') or '')
  local kind = 'deliver'
  if d and d <= now then
    kind = 'expired'
  elseif count > md then
    kind = 'maxed'
  else
    room = room - 1
    delivered = delivered + 1
    if count > 1 then redelivered = redelivered + 1 end
  end
  out[#out + 1] = {kind, sk, e[1], count, entry_field(fields, 'm') or ''}
end
local function claim(sk, id, min_idle)
  local r = redis.pcall('XCLAIM', sk, g, c, min_idle, id)
  if type(r) ~= 'table' or r.err or #r == 0 or not r[1] or r[1] == false then
    -- Trimmed away meanwhile (retention): forget it.
    redis.pcall('XACK', sk, g, id)
    return nil
  end
  return r[1]
end

local due = redis.call('ZRANGEBYSCORE', sched, '-inf', num(now), 'LIMIT', 0, 512)
local due_by_lane = {[0] = {}, [1] = {}, [2] = {}, [3] = {}}
for _, m in ipairs(due) do
  local bar = string.find(m, '|', 1, true)
  local sk = string.sub(m, 1, bar - 1)
  local lane = tonumber(string.sub(sk, -1))
  table.insert(due_by_lane[lane], {sk, string.sub(m, bar + 1), m})
end

for lane = 3, 0, -1 do
  -- 1. scheduled redeliveries and delayed first deliveries that are due
  for _, d in ipairs(due_by_lane[lane]) do
    if room <= 0 then break end
    redis.call('ZREM', sched, d[3])
    local e = claim(d[1], d[2], 0)
    if e then consider(d[1], e, pending_count(d[1], d[2]), false) end
  end
  -- 2. deliveries whose ack wait expired
  for _, ch in ipairs(chans) do
    if room <= 0 or not scan then break end
    local sk = skey(ch, lane)
    local ok, idle = pcall(redis.call, 'XPENDING', sk, g, 'IDLE', aw, '-', '+', room + 16)
    if ok then
      for _, p in ipairs(idle) do
        if room <= 0 then break end
        local id, owner = p[1], p[2]
        local member = sk .. '|' .. id
        if owner == '_parked' then
          local score = redis.call('ZSCORE', sched, member)
          if score == false or score == nil then
            redis.call('ZADD', sched, num(now), member)
          else
            -- not due yet: reset its idle time so the scan skips it for an ack wait
            redis.pcall('XCLAIM', sk, g, '_parked', 0, id, 'JUSTID')
          end
        else
          local e = claim(sk, id, aw)
          -- Taken from the consumer that held it: its bulk ack must not count on
          -- holding it any more (fast.rs).
          redis.call('HINCRBY', gk, 'claims', 1)
          if e then
            redis.call('ZREM', sched, member)
            consider(sk, e, pending_count(sk, id), false)
          end
        end
      end
    end
  end
  -- 3. new entries
  for _, ch in ipairs(chans) do
    if room <= 0 or not read_new then break end
    local sk = skey(ch, lane)
    local ok, r = pcall(redis.call, 'XREADGROUP', 'GROUP', g, c, 'COUNT', room, 'STREAMS', sk, '>')
    if ok and type(r) == 'table' and r[1] then
      for _, e in ipairs(r[1][2]) do
        local nb = tonumber(entry_field(e[2], 'n') or '')
        local d = tonumber(entry_field(e[2], 'd') or '')
        if nb and nb > now and not (d and d <= now) then
          redis.call('XCLAIM', sk, g, '_parked', 0, e[1], 'JUSTID', 'RETRYCOUNT', 0)
          redis.call('ZADD', sched, num(nb), sk .. '|' .. e[1])
        else
          consider(sk, e, 1, true)
        end
      end
    end
  end
end

if delivered > 0 then redis.call('HINCRBY', gk, 'delivered', delivered) end
if redelivered > 0 then redis.call('HINCRBY', gk, 'redelivered', redelivered) end

local reply = {'ok', redis.call('GET', P .. ':chver') or '0'}
local nd = redis.call('ZRANGE', sched, 0, 0, 'WITHSCORES')
reply[3] = nd[2] or ''
reply[4] = out
-- Where a waiting consumer's XREAD starts: after the group's last delivered entry of
-- each stream, so it wakes at once if an entry is there that the group has not read
-- (with mode 2 new entries are not read here, and may have come meanwhile).
local last = {}
if #out == 0 then
  for _, ch in ipairs(chans) do
    for l = 0, 3 do
      local sk = skey(ch, l)
      local from = nil
      local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', sk)
      if ok then
        for _, info in ipairs(groups) do
          local m = tomap(info)
          if m['name'] == g then from = m['last-delivered-id'] break end
        end
      end
      if from == nil then
        local top = redis.call('XREVRANGE', sk, '+', '-', 'COUNT', 1)
        from = (top[1] and top[1][1]) or '0-0'
      end
      last[#last + 1] = sk
      last[#last + 1] = from
    end
  end
end
reply[5] = last
reply[6] = redis.call('HGET', gk, 'claims') or '0'
return reply
