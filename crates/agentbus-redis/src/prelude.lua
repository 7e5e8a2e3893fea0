-- Shared helpers, prepended to every agentbus script. ARGV[1] is the key prefix.
local P = ARGV[1]
local function skey(ch, lane) return P .. ':s:' .. ch .. ':' .. lane end
local function ckey(ch) return P .. ':c:' .. ch end
local function cgkey(ch) return P .. ':cg:' .. ch end
local function gkey(g) return P .. ':g:' .. g end
local function schedkey(g) return P .. ':gs:' .. g end
local function errkey(g) return P .. ':ge:' .. g end
local function memkey(g) return P .. ':gm:' .. g end
-- Integers as decimal strings. `%d` (every number here is a whole number below 2^53):
-- `%.0f` went through glibc's multi-precision float printing, a measurable share of a
-- publish's server time.
local function num(n) return string.format('%d', n) end

local function split(s)
  local t = {}
  for tok in string.gmatch(s, '[^%.]+') do t[#t + 1] = tok end
  return t
end

local function matches(pat, ch)
  local p = split(pat)
  local c = split(ch)
  for i = 1, #p do
    if p[i] == '>' then return #c >= i end
    if i > #c then return false end
    if p[i] ~= '*' and p[i] ~= c[i] then return false end
  end
  return #p == #c
end

local function tomap(flat)
  local m = {}
  for i = 1, #flat, 2 do m[flat[i]] = flat[i + 1] end
  return m
end

-- Stream ids as {ms, seq} numbers, compared lexicographically.
local function pid(id)
  local dash = string.find(id, '-', 1, true)
  if not dash then return {tonumber(id), 0} end
  return {tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))}
end
local function idlt(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end

-- For each consumer group on a stream: what it still needs. Returns nil when the
-- stream has no group (then nothing counts as settled).
local function group_floors(sk)
  if redis.call('EXISTS', sk) == 0 then return nil end
  local groups = redis.call('XINFO', 'GROUPS', sk)
  if #groups == 0 then return nil end
  local floors = {}
  for _, g in ipairs(groups) do
    local info = tomap(g)
    local f = {ld = pid(info['last-delivered-id'])}
    if tonumber(info['pending']) > 0 then
      local s = redis.call('XPENDING', sk, info['name'])
      f.minp = pid(s[2])
    end
    floors[#floors + 1] = f
  end
  return floors
end

-- Whether every group has settled entry `id` (read it and has nothing pending at or before it).
local function settled(floors, id)
  if floors == nil then return false end
  local p = pid(id)
  for _, f in ipairs(floors) do
    if idlt(f.ld, p) then return false end
    if f.minp and not idlt(p, f.minp) then return false end
  end
  return true
end

local function entry_field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end
