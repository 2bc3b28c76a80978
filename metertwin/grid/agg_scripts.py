"""Lua scripts of the aggregation (used by :mod:`metertwin.grid.aggregates`).

``METER`` runs in the meter's slot (``{meter_id}``), ``NODE`` in one tree node's slot
(``{grid:<level>:<node>}``): a reading is never one script across slots (Redis Cluster), but a
sequence ``METER`` → ``NODE`` (up to 8 calls) → ``ACK`` whose crash-safe order is explained in
:mod:`metertwin.grid.aggregates`.
"""

from __future__ import annotations

# KEYS: state outbox (the meter's slot)
# ARGV: 'reading', ts_ms, power_w, voltage_v, import_kwh, export_kwh, pred_ts, pred_imp, pred_exp,
#       succ_ts, succ_imp, succ_exp, interval_ms          (pred/succ '' when none)
#    or 'place', version, transformer, feeder, substation, region   ('' for a level not set)
#    or 'flush'
#    or 'ack', n
# Returns the outbox: the JSON entries not yet acknowledged, oldest first.
METER = r"""
local st, out = KEYS[1], KEYS[2]
local mode = ARGV[1]
local LEVELS = {'transformer', 'feeder', 'substation', 'region'}
if mode == 'ack' then
  redis.call('ZREMRANGEBYSCORE', out, '-inf', ARGV[2])
  return {}
end
local function path(prefix)
  local vals = redis.call('HMGET', st, prefix .. 'transformer', prefix .. 'feeder', prefix .. 'substation',
    prefix .. 'region')
  local p, any = {}, false
  for i, lv in ipairs(LEVELS) do
    if vals[i] and vals[i] ~= '' then p[lv] = vals[i]; any = true end
  end
  return p, any
end
-- The node operations that move the meter's counted path to its place: leave, then set.
local function relocate()
  local placed = path('p_')
  local counted = path('c_')
  local ops = {}
  for _, lv in ipairs(LEVELS) do
    local c, p = counted[lv], placed[lv]
    if c and c ~= p then ops[#ops + 1] = {lv, c, 'leave'} end
    if p then ops[#ops + 1] = {lv, p, 'set'} end
    redis.call('HSET', st, 'c_' .. lv, p or '')
  end
  return ops
end
local function push(entry)
  if #entry.ops == 0 then return end
  local n = redis.call('HINCRBY', st, 'n', 1)
  entry.n = n
  redis.call('ZADD', out, n, cjson.encode(entry))
end
local function current()
  local c = redis.call('HMGET', st, 'ts', 'pw', 'v')
  if not c[1] then return nil end
  return {tonumber(c[1]), tonumber(c[2]), tonumber(c[3])}
end

if mode == 'place' then
  local pv = tonumber(redis.call('HGET', st, 'p_v') or '-1')
  if tonumber(ARGV[2]) > pv then
    redis.call('HSET', st, 'p_v', ARGV[2], 'p_transformer', ARGV[3], 'p_feeder', ARGV[4],
      'p_substation', ARGV[5], 'p_region', ARGV[6])
    local cur = current()
    if cur then push({ops = relocate(), cur = cur, e = {}}) end
  end
elseif mode == 'reading' then
  local ts, pw, v = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local imp, exp = tonumber(ARGV[5]), tonumber(ARGV[6])
  local pts, pimp, pexp = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
  local sts, simp, sexp = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
  local I = tonumber(ARGV[13])
  -- interval of a segment or reading ending at t: (start, start + I]
  local function bucket(t) return math.floor((t - 1) / I) * I end
  local cur = current()
  if cur == nil or ts > cur[1] then
    redis.call('HSET', st, 'ts', ARGV[2], 'pw', ARGV[3], 'v', ARGV[4])
    cur = {ts, pw, v}
  end
  local _, placed = path('p_')
  local _, counted = path('c_')
  if placed or counted then
    -- energy: the new segments (pred, me] and (me, succ] replace the old one (pred, succ]
    local e = {}
    if pts then e[#e + 1] = {bucket(ts), imp - pimp, exp - pexp} end
    if sts then
      if pts then e[#e + 1] = {bucket(sts), pimp - imp, pexp - exp}
      else e[#e + 1] = {bucket(sts), simp - imp, sexp - exp} end
    end
    push({ops = relocate(), cur = cur, e = e, r = {bucket(ts), v}})
  end
end
return redis.call('ZRANGE', out, 0, -1)
"""

# KEYS: cur meters seen volt history buckets (one node's slot)
# ARGV: meter, n, op ('set'|'leave'), cur_ts, cur_pw, cur_v, reading_bucket ('' none), reading_v, now_ms,
#       then (bucket, d_import_kwh, d_export_kwh) triples
# Returns 1 applied, 0 already applied (n not above the node's for this meter).
NODE = r"""
local cur, meters, seen, volt, hist, hb = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local meter, n, op = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local old = redis.call('HGET', meters, meter)
local on, ots, opw, ov
if old then
  local f = {}
  for part in string.gmatch(old, '([^|]+)') do f[#f + 1] = tonumber(part) end
  on, ots, opw, ov = f[1], f[2], f[3], f[4]
end
local function contrib(p, sign)
  if p > 0 then redis.call('HINCRBYFLOAT', cur, 'import_w', sign * p)
  elseif p < 0 then redis.call('HINCRBYFLOAT', cur, 'export_w', -sign * p) end
end
if op == 'leave' then
  if old then
    contrib(opw, -1)
    redis.call('HDEL', meters, meter)
    redis.call('ZREM', seen, meter)
    redis.call('ZREM', volt, meter)
    redis.call('HSET', cur, 'at_ms', ARGV[9])
  end
  return 1
end
if old and n <= on then return 0 end
for i = 10, #ARGV, 3 do
  local b = ARGV[i]
  redis.call('HINCRBYFLOAT', hist, b .. ':i', ARGV[i + 1])
  redis.call('HINCRBYFLOAT', hist, b .. ':e', ARGV[i + 2])
  redis.call('ZADD', hb, b, b)
end
local ts, pw, v = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if old and ots > ts then ts, pw, v = ots, opw, ov end
if old then contrib(opw, -1) end
contrib(pw, 1)
redis.call('HSET', meters, meter, ARGV[2] .. '|' .. string.format('%d', ts) .. '|' .. string.format('%.17g', pw)
  .. '|' .. string.format('%.17g', v))
redis.call('ZADD', seen, ts, meter)
redis.call('ZADD', volt, v, meter)
redis.call('HSET', cur, 'at_ms', ARGV[9])
local rb = ARGV[7]
if rb ~= '' then
  local rv = tonumber(ARGV[8])
  redis.call('HINCRBY', hist, rb .. ':n', 1)
  local lo, hi = tonumber(redis.call('HGET', hist, rb .. ':lo')), tonumber(redis.call('HGET', hist, rb .. ':hi'))
  if lo == nil or rv < lo then redis.call('HSET', hist, rb .. ':lo', ARGV[8]) end
  if hi == nil or rv > hi then redis.call('HSET', hist, rb .. ':hi', ARGV[8]) end
  local c = redis.call('HMGET', cur, 'import_w', 'export_w')
  local net = (tonumber(c[1]) or 0) - (tonumber(c[2]) or 0)
  local pk = tonumber(redis.call('HGET', hist, rb .. ':pk'))
  if pk == nil or net > pk then redis.call('HSET', hist, rb .. ':pk', string.format('%.17g', net)) end
  redis.call('ZADD', hb, rb, rb)
end
return 1
"""
