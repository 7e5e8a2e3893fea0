-- publish: ARGV = prefix, then runs of messages of one channel and lane: channel, lane,
--          k, then k pairs (id, message), where `message` is the binary header +
--          payload of wire.rs and `id` the message id, followed by
--          `|<deadline_ms>|<not_before_ms>` (either may be empty) when either is set.
--          Two arguments per message: each argument becomes a Lua string, and fewer
--          of them measurably cut the server's time per message.
-- Reply: {groups, r1, r2, ...}: `groups` is a flat {channel, group count, ...} of the
-- channels touched; ri is the sequence (a number) of a stored message, {1, seq, groups}
-- for a duplicate, {-1, messages, bytes, max_messages, max_bytes} for a full channel.
-- An error reply when an XADD failed (the counters are still written back first).
-- Each entry gets the explicit stream id `<ms>-<seq>`: `seq` is the channel sequence and
-- `ms` never goes back within the channel (the server's TIME, or the channel's last `ms`
-- if that is later), so ids increase across all four lanes of a channel together and the
-- sequence needs no field of its own.
-- A channel's settings and counters are read once per call and written back at the end
-- (the script is atomic, so nobody sees them in between).

local FIELDS = {'max_age', 'max_bytes', 'max_messages', 'discard', 'dedup', 'count', 'bytes', 'seq',
  'lastms'}
local states = {}
local touched = {}

local function create_channel(ch, ck)
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
end

local function remove(st, sk, eid, fields, floors)
  if redis.call('XDEL', sk, eid) == 0 then return end
  st.count = st.count - 1
  st.bytes = st.bytes - #(entry_field(fields, 'm') or '')
  if not settled(floors, eid) then st.dropped = st.dropped + 1 end
end

local function state(ch)
  local st = states[ch]
  if st then return st end
  local ck = ckey(ch)
  local cfg = redis.call('HMGET', ck, unpack(FIELDS))
  if not cfg[4] then
    create_channel(ch, ck)
    cfg = redis.call('HMGET', ck, unpack(FIELDS))
  end
  st = {
    ck = ck,
    max_age = tonumber(cfg[1]), max_bytes = tonumber(cfg[2]), max_msgs = tonumber(cfg[3]),
    raw_max_bytes = cfg[2] or '', raw_max_msgs = cfg[3] or '',
    discard = cfg[4], dedup = tonumber(cfg[5]),
    count = tonumber(cfg[6] or '0'), bytes = tonumber(cfg[7] or '0'), seq = tonumber(cfg[8] or '0'),
    lastms = tonumber(cfg[9] or ''), ms = nil,
    dropped = 0,
    ngroups = redis.call('SCARD', cgkey(ch)),
    keys = {['0'] = skey(ch, 0), ['1'] = skey(ch, 1), ['2'] = skey(ch, 2), ['3'] = skey(ch, 3)},
  }
  st.dedup_on = st.dedup ~= nil and st.dedup > 0
  if st.lastms == nil then
    -- A channel without `lastms` (new, or written by an older version whose entries
    -- have server-assigned ids): start after every id its lanes ever had.
    st.lastms = 0
    for l = 0, 3 do
      local sk = skey(ch, l)
      if redis.call('EXISTS', sk) == 1 then
        local info = tomap(redis.call('XINFO', 'STREAM', sk))
        local last = pid(info['last-generated-id'])
        if last[1] + 1 > st.lastms then st.lastms = last[1] + 1 end
      end
    end
  end
  states[ch] = st
  touched[#touched + 1] = ch
  -- Age limit: entries stored before now - max_age go, counted as dropped if unread.
  if st.max_age then
    local t = redis.call('TIME')
    local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - st.max_age
    for l = 0, (cutoff > 1 and 3 or -1) do
      local sk = skey(ch, l)
      local floors = group_floors(sk)
      while true do
        local old = redis.call('XRANGE', sk, '-', num(cutoff - 1), 'COUNT', 100)
        if #old == 0 then break end
        for _, e in ipairs(old) do remove(st, sk, e[1], e[2], floors) end
      end
    end
  end
  return st
end

-- Makes room for one more entry of `size` bytes: trims what every group settled,
-- then applies the discard policy. Returns a reply for a refused publish, else nil.
local function make_room(st, ch, size)
  local function over()
    return (st.max_msgs ~= nil and st.count + 1 > st.max_msgs) or
      (st.max_bytes ~= nil and st.bytes + size > st.max_bytes)
  end
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
          if settled(floors, e[1]) then remove(st, sk, e[1], e[2], floors) else done = true break end
        end
      end
    end
  end
  while over() do
    if st.discard == 'drop_oldest' then
      local best = nil
      for l = 0, 3 do
        local first = redis.call('XRANGE', skey(ch, l), '-', '+', 'COUNT', 1)
        if #first > 0 then
          local q = pid(first[1][1])[2]
          if best == nil or q < best.q then best = {q = q, lane = l, e = first[1]} end
        end
      end
      if best == nil then break end
      remove(st, skey(ch, best.lane), best.e[1], best.e[2], floors_by_lane[best.lane])
    else
      redis.call('HINCRBY', P .. ':n', 'rejected_full', 1)
      return {-1, st.count, st.bytes, st.raw_max_msgs, st.raw_max_bytes}
    end
  end
  return nil
end

-- The server's clock in ms, read once per call.
local clock = nil
local function now_ms()
  if clock == nil then
    local t = redis.call('TIME')
    clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return clock
end

-- The common case (no duplicate, room left) costs one XADD per message (with dedup, one
-- HMGET per bucket and run and one HSET per bucket and call besides): everything else is
-- computed once per channel per call.
local function xadd(sk, eid, msg, dl, nb)
  if dl == '' and nb == '' then
    redis.call('XADD', sk, eid, 'm', msg)
  elseif nb == '' then
    redis.call('XADD', sk, eid, 'm', msg, 'd', dl)
  elseif dl == '' then
    redis.call('XADD', sk, eid, 'm', msg, 'n', nb)
  else
    redis.call('XADD', sk, eid, 'm', msg, 'd', dl, 'n', nb)
  end
end

-- The channel state and size of the message whose XADD is under way: if it fails, its
-- counts are taken back. (Two locals, not a table: one table per message was a
-- measurable share of the script's own work.)
local storing_st, storing_size = nil, nil

-- Dedup memory: the ids of one dedup window width live in hashes, one per time bucket
-- of that width: `P:dd:<window>:<n>` with n = floor(now / window), field = message id,
-- value `seq:groups:ms` (`ms` = when it was stored). A lookup reads the current and the
-- previous bucket and counts a hit only when it is younger than the window, so an id is
-- remembered exactly as long as the window; a bucket expires when no window can reach
-- it any more. A hash, unlike a key per id, can be read and written for a whole run of
-- messages with one command each (`HMGET`, `HSET`), which is what makes dedup cheap.
local buckets = {}
local function dedup_buckets(w)
  local dd = buckets[w]
  if dd then return dd end
  local n = math.floor(now_ms() / w)
  local base = P .. ':dd:' .. num(w) .. ':'
  dd = {cur = base .. num(n), prev = base .. num(n - 1), expire = (n + 2) * w,
    stamp = ':' .. num(now_ms()), this_call = {}, pending = {}}
  dd.prev_live = redis.call('EXISTS', dd.prev) == 1
  buckets[w] = dd
  return dd
end

-- The receipt of a duplicate from a remembered `seq:groups:ms`, or nil when that is
-- older than the window `w`.
local function remembered(seen, w)
  local a = string.find(seen, ':', 1, true)
  local b = string.find(seen, ':', a + 1, true)
  if now_ms() - tonumber(string.sub(seen, b + 1)) >= w then return nil end
  return {1, tonumber(string.sub(seen, 1, a - 1)), tonumber(string.sub(seen, a + 1, b - 1))}
end

-- What the dedup buckets remember of the `k` messages whose arguments start at ARGV[i]:
-- one HMGET per bucket for the whole run. Entry x is the value or false.
local function lookup_run(dd, i, k)
  local ids = {}
  for j = i, i + 2 * k - 2, 2 do ids[#ids + 1] = string.sub(ARGV[j], 1, 36) end
  local seen = {}
  -- unpack has a stack limit: at most 1000 fields per command.
  for from = 1, k, 1000 do
    local to = math.min(from + 999, k)
    local cur = redis.call('HMGET', dd.cur, unpack(ids, from, to))
    local old = dd.prev_live and redis.call('HMGET', dd.prev, unpack(ids, from, to))
    for x = from, to do seen[x] = cur[x - from + 1] or (old and old[x - from + 1]) end
  end
  return seen
end

local function publish_one(st, ch, sk, id, msg, seen)
  local dl, nb = '', ''
  if #id ~= 36 then
    -- `id|deadline|not_before`
    local a = string.find(id, '|', 1, true)
    local b = string.find(id, '|', a + 1, true)
    dl, nb = string.sub(id, a + 1, b - 1), string.sub(id, b + 1)
    id = string.sub(id, 1, a - 1)
  end
  local size = #msg
  local dd
  if st.dedup_on then
    dd = buckets[st.dedup]
    -- A message stored earlier in this call is not in the buckets yet.
    seen = dd.this_call[id] or seen
    if seen then
      local receipt = remembered(seen, st.dedup)
      if receipt then return receipt end
    end
  end
  if (st.max_msgs ~= nil and st.count + 1 > st.max_msgs) or
      (st.max_bytes ~= nil and st.bytes + size > st.max_bytes) then
    local refused = make_room(st, ch, size)
    if refused then return refused end
  end

  -- `published` is `seq`: duplicates and refused publishes take no sequence.
  local seq = st.seq + 1
  st.seq = seq
  st.count = st.count + 1
  st.bytes = st.bytes + size
  if st.ms == nil then
    st.ms = math.max(now_ms(), st.lastms)
    st.lastms = st.ms
    st.idp = num(st.ms) .. '-'
  end
  storing_st, storing_size = st, size
  if dl == '' and nb == '' then
    redis.call('XADD', sk, st.idp .. num(seq), 'm', msg)
  else
    xadd(sk, st.idp .. num(seq), msg, dl, nb)
  end
  storing_st = nil
  if dd then
    local v = num(seq) .. ':' .. st.ngroups .. dd.stamp
    dd.this_call[id] = v
    dd.pending[#dd.pending + 1] = id
    dd.pending[#dd.pending + 1] = v
  end
  return seq
end

local replies = {{}}
local nreplies = 1
local function publish_all()
  local i = 2
  while i <= #ARGV do
    local ch, lane, k = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    local st = states[ch] or state(ch)
    local sk = st.keys[lane] or skey(ch, lane)
    i = i + 3
    local seen = false
    if st.dedup_on then seen = lookup_run(dedup_buckets(st.dedup), i, k) end
    for j = i, i + 2 * k - 1, 2 do
      nreplies = nreplies + 1
      replies[nreplies] = publish_one(st, ch, sk, ARGV[j], ARGV[j + 1],
        seen and seen[(j - i) / 2 + 1])
    end
    i = i + 2 * k
  end
end
-- A command that fails (e.g. XADD when the server is out of memory) ends the call, but
-- only after the counters are written back: the messages stored before it keep their
-- sequences, and no later publish reuses one. (A message is remembered for dedup only
-- once it is stored, so a retry is never taken for a duplicate of a message that was
-- not stored.)
local ok, failure = pcall(publish_all)
if not ok and storing_st then
  local st = storing_st
  st.seq, st.count, st.bytes = st.seq - 1, st.count - 1, st.bytes - storing_size
end
local groups = replies[1]
for _, ch in ipairs(touched) do
  local st = states[ch]
  redis.call('HSET', st.ck, 'count', num(st.count), 'bytes', num(st.bytes), 'seq', num(st.seq),
    'lastms', num(st.lastms))
  if st.dropped > 0 then redis.call('HINCRBY', st.ck, 'dropped', st.dropped) end
  groups[#groups + 1] = ch
  groups[#groups + 1] = st.ngroups
end
-- The stored messages are remembered for dedup, one HSET per bucket, also after a failure.
for _, dd in pairs(buckets) do
  local pending = dd.pending
  if #pending > 0 then
    for from = 1, #pending, 1000 do
      redis.call('HSET', dd.cur, unpack(pending, from, math.min(from + 999, #pending)))
    end
    redis.call('PEXPIREAT', dd.cur, num(dd.expire))
  end
end
-- The messages before the failure are stored, which a failed publish allows ("may or
-- may not have been stored").
if not ok then
  return redis.error_reply(type(failure) == 'table' and failure.err or tostring(failure))
end
return replies
