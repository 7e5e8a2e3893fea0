-- publish: ARGV = prefix, then runs of messages of one channel and lane: channel, lane,
--          k, ids, then the k messages. With ids = '1' each message is two arguments:
--          its id, followed by `|<deadline_ms>|<not_before_ms>` (either may be empty)
--          when either is set, and the message (the binary header + payload of
--          wire.rs). With ids = '0' each is one argument, the message: the client sends
--          that only for a channel it was told has dedup off, and only for messages
--          without deadline and not-before — every script argument is a Lua string the
--          server must make, and the id is needed for nothing else.
-- Reply: {channels, r1, r2, ...}: `channels` is a flat {channel, group count, dedup
-- window ms, ...} of the channels touched (the client learns from it which channels
-- need no ids); ri is the sequence (a number) of a stored message, {1, seq, groups} for
-- a duplicate, {-1, messages, bytes, max_messages, max_bytes} for a full channel.
-- {'ids', channel} when a run without ids is for a channel whose dedup is on (the
-- client's knowledge is stale): then nothing of the call is stored, and the client
-- sends the call again with ids.
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
-- computed once per channel per call. Functions used per message are locals (a global
-- lookup and a field lookup less per use).
local format, call = string.format, redis.call

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
    stamp = ':' .. num(now_ms()), this_call = {}, pending = {}, npending = 0}
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

-- The first message a call stores in a channel fixes the `ms` of its ids.
local function start_ms(st)
  st.ms = math.max(now_ms(), st.lastms)
  st.lastms = st.ms
  -- The format of this call's ids, `<ms>-%d`: one new Lua string per id.
  st.idf = num(st.ms) .. '-%d'
end

-- Stores one message: limits, sequence, XADD. Returns its sequence, or nil and the
-- reply of a refused publish.
local function store(st, ch, sk, msg, dl, nb)
  local size = #msg
  if (st.max_msgs ~= nil and st.count + 1 > st.max_msgs) or
      (st.max_bytes ~= nil and st.bytes + size > st.max_bytes) then
    local refused = make_room(st, ch, size)
    if refused then return nil, refused end
  end
  -- `published` is `seq`: duplicates and refused publishes take no sequence.
  local seq = st.seq + 1
  st.seq = seq
  st.count = st.count + 1
  st.bytes = st.bytes + size
  if st.ms == nil then start_ms(st) end
  storing_st, storing_size = st, size
  if dl == '' and nb == '' then
    call('XADD', sk, format(st.idf, seq), 'm', msg)
  else
    xadd(sk, format(st.idf, seq), msg, dl, nb)
  end
  storing_st = nil
  return seq
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
  local seq, refused = store(st, ch, sk, msg, dl, nb)
  if refused then return refused end
  if dd then
    -- `seq:groups:ms`, one new string (the format is made once per channel and call).
    local vf = st.vf
    if vf == nil then
      vf = '%d:' .. num(st.ngroups) .. dd.stamp
      st.vf = vf
    end
    local v = format(vf, seq)
    dd.this_call[id] = v
    local n = dd.npending
    dd.pending[n + 1] = id
    dd.pending[n + 2] = v
    dd.npending = n + 2
  end
  return seq
end

local replies = {{}}
local nreplies = 1

-- A run of messages without ids under way in `store_fitting`: its channel, its first
-- argument and the reply count before it. Its counters live in locals until the run
-- ends, so a failed XADD recomputes them from the replies written so far.
local plain_st, plain_first, plain_base = nil, nil, nil

-- Stores the messages ARGV[first..last] of a run without ids (dedup off, no deadline or
-- not-before) while they fit the channel's limits: the common case, with the counters
-- in locals. Returns the index of the first message it did not store (last + 1 when
-- it stored them all).
local function store_fitting(st, sk, first, last)
  if st.ms == nil then start_ms(st) end
  local argv, idf = ARGV, st.idf
  local seq, count, bytes = st.seq, st.count, st.bytes
  local max_msgs, max_bytes = st.max_msgs or math.huge, st.max_bytes or math.huge
  local n = nreplies
  local stop = last + 1
  plain_st, plain_first, plain_base = st, first, n
  for j = first, last do
    local msg = argv[j]
    local size = #msg
    if count >= max_msgs or bytes + size > max_bytes then
      stop = j
      break
    end
    seq = seq + 1
    count = count + 1
    bytes = bytes + size
    call('XADD', sk, format(idf, seq), 'm', msg)
    n = n + 1
    nreplies = n
    replies[n] = seq
  end
  plain_st = nil
  st.seq, st.count, st.bytes = seq, count, bytes
  return stop
end

-- Set when a run without ids meets a channel whose dedup is on.
local needs_ids = nil
local function publish_all()
  -- First every channel's state, and whether a run without ids may go ahead: nothing
  -- is stored when one may not, so the client can send the whole call again.
  local i = 2
  while i <= #ARGV do
    local st = states[ARGV[i]] or state(ARGV[i])
    local k = tonumber(ARGV[i + 2])
    if ARGV[i + 3] == '1' then
      i = i + 4 + 2 * k
    else
      if st.dedup_on then
        needs_ids = ARGV[i]
        return
      end
      i = i + 4 + k
    end
  end
  i = 2
  while i <= #ARGV do
    local ch, lane, k = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    local st = states[ch]
    local sk = st.keys[lane] or skey(ch, lane)
    local ids = ARGV[i + 3] == '1'
    i = i + 4
    if ids then
      local seen = false
      if st.dedup_on then seen = lookup_run(dedup_buckets(st.dedup), i, k) end
      for j = i, i + 2 * k - 1, 2 do
        nreplies = nreplies + 1
        replies[nreplies] = publish_one(st, ch, sk, ARGV[j], ARGV[j + 1],
          seen and seen[(j - i) / 2 + 1])
      end
      i = i + 2 * k
    else
      local j, last = i, i + k - 1
      while j <= last do
        j = store_fitting(st, sk, j, last)
        if j <= last then
          -- Over a limit: trim or refuse (make_room), then go on with the rest.
          local seq, refused = store(st, ch, sk, ARGV[j], '', '')
          nreplies = nreplies + 1
          replies[nreplies] = seq or refused
          j = j + 1
        end
      end
      i = i + k
    end
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
if not ok and plain_st then
  -- Each message of the run stored so far has its reply.
  local st, stored = plain_st, nreplies - plain_base
  st.seq, st.count = st.seq + stored, st.count + stored
  for j = plain_first, plain_first + stored - 1 do st.bytes = st.bytes + #ARGV[j] end
end
-- Counters are written back also when nothing was stored: reading a channel's state
-- may have trimmed it (max_age).
local channels = replies[1]
for _, ch in ipairs(touched) do
  local st = states[ch]
  redis.call('HSET', st.ck, 'count', num(st.count), 'bytes', num(st.bytes), 'seq', num(st.seq),
    'lastms', num(st.lastms))
  if st.dropped > 0 then redis.call('HINCRBY', st.ck, 'dropped', st.dropped) end
  channels[#channels + 1] = ch
  channels[#channels + 1] = st.ngroups
  channels[#channels + 1] = st.dedup_on and st.dedup or 0
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
if needs_ids then return {'ids', needs_ids} end
return replies
