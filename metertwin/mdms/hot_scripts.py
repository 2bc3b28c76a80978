"""The MDMS hot tier's Lua scripts (used by :mod:`metertwin.mdms.hot_store`).

Each touches the keys of one meter only (hash tag ``{meter_id}``), so one Redis Cluster slot;
the zone-wide sets (``MDMS_HOT_METERS``, ``MDMS_METERS``) are written by the caller after the
script (see ``hot_store._index_meters`` for why that order is safe).
"""

from __future__ import annotations

from metertwin.grid import aggregates

# Shared Lua: parse a member, find the nearest non-estimated neighbours, fill gaps.
LUA_COMMON = r"""
local function parse(m)
  local f = {}
  for part in string.gmatch(m .. '|', '([^|]*)|') do f[#f + 1] = part end
  return {ts = tonumber(f[1]), seq = f[2], imp = tonumber(f[3]), exp = tonumber(f[4]), q = f[7], raw = m}
end

local function neighbour(iv, ts, dir)
  local offset = 0
  while true do
    local batch
    if dir < 0 then
      batch = redis.call('ZREVRANGEBYSCORE', iv, '(' .. ts, '-inf', 'LIMIT', offset, 64)
    else
      batch = redis.call('ZRANGEBYSCORE', iv, '(' .. ts, '+inf', 'LIMIT', offset, 64)
    end
    if #batch == 0 then return nil end
    for _, m in ipairs(batch) do
      local r = parse(m)
      if r.q ~= 'E' then return r end
    end
    offset = offset + 64
  end
end

-- Estimated rows at each interval boundary strictly inside a gap between two reads,
-- registers linear between them; a gap is > 1.5 intervals and <= max_gap.
-- Only between two hot rows: the latest registers may stand for an archived read, and
-- between it and a hot row there may be cold rows that an estimate must not shadow.
-- Never across a register discontinuity: when the average demand over the gap is above
-- max_demand_w (W; nil: no bound), the gap stays missing and the caller flags the read suspect.
local function fill(iv, a, b, interval, max_gap, max_demand_w)
  if a == nil or b == nil or a.latest or b.latest then return 0 end
  local span = b.ts - a.ts
  if span <= interval * 1.5 or span > max_gap then return 0 end
  if max_demand_w and math.max(b.imp - a.imp, b.exp - a.exp) * 3.6e9 / span > max_demand_w then return 0 end
  local n = 0
  local t = (math.floor(a.ts / interval) + 1) * interval
  local pw = ((b.imp - a.imp) - (b.exp - a.exp)) * 3.6e9 / span
  while t < b.ts do
    local frac = (t - a.ts) / span
    local m = string.format('%d||%.17g|%.17g|%.6f||E', t, a.imp + (b.imp - a.imp) * frac,
      a.exp + (b.exp - a.exp) * frac, pw)
    redis.call('ZADD', iv, t, m)
    n = n + 1
    t = t + interval
  end
  return n
end

local function drop_estimates(iv, lo, hi)
  local lo_s = lo and ('(' .. string.format('%d', lo)) or '-inf'
  local hi_s = hi and ('(' .. string.format('%d', hi)) or '+inf'
  local n = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', iv, lo_s, hi_s)) do
    if string.sub(m, -1) == 'E' then redis.call('ZREM', iv, m); n = n + 1 end
  end
  return n
end

local function latest_point(latest)
  local lt = redis.call('HMGET', latest, 'ts_ms', 'import_kwh', 'export_kwh')
  if not lt[1] then return nil end
  return {ts = tonumber(lt[1]), imp = tonumber(lt[2]), exp = tonumber(lt[3]), latest = true}
end
"""

# KEYS: iv seqs latest counters registry, grid state, grid outbox (one meter's slot; the zone-wide sets:
#       hot_store._index_meters)
# ARGV: ts_ms seq imp exp power volt quality interval_ms seq_floor_ms max_gap_ms max_demand_w require_reg meter
#       grid_on grid_interval_ms (the grid's tail: metertwin.grid.aggregates)
INGEST = LUA_COMMON + aggregates.LUA_HELPERS + r"""
local iv, seqs, latest, counters, registry = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ts_s, seq = ARGV[1], ARGV[2]
local ts = tonumber(ts_s)
local imp_s, exp_s, pw_s, v_s, q = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local imp, exp = tonumber(imp_s), tonumber(exp_s)
local interval, seq_floor, max_gap = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local max_demand_w, meter = tonumber(ARGV[11]), ARGV[13]

local seen = redis.call('ZSCORE', seqs, seq)
if seen then
  if tonumber(seen) == ts then
    redis.call('HINCRBY', counters, 'duplicates', 1)
    return {'duplicate'}
  end
  redis.call('HINCRBY', counters, 'rejected', 1)
  return {'rejected', 'sequence_reused', 'sequence number ' .. seq .. ' was already accepted for timestamp '
    .. string.format('%d', tonumber(seen)) .. ' ms, not ' .. ts_s .. ' ms'}
end
local lat = latest_point(latest)
if ARGV[12] == '1' and lat == nil and redis.call('EXISTS', registry) == 0 then
  return {'rejected', 'unknown_meter', 'meter ' .. meter .. ' is not registered and has no MDMS data'}
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', iv, ts, ts)) do
  if string.sub(m, -1) ~= 'E' then
    redis.call('HINCRBY', counters, 'rejected', 1)
    return {'rejected', 'timestamp_taken', 'timestamp ' .. ts_s .. ' ms already has a reading (' .. m .. ')'}
  end
end
if lat and lat.ts == ts and redis.call('ZCOUNT', iv, ts, ts) == 0 then
  redis.call('HINCRBY', counters, 'rejected', 1)
  return {'rejected', 'timestamp_taken', 'timestamp ' .. ts_s .. ' ms already has a reading'}
end

local pred = neighbour(iv, ts, -1)
local succ = neighbour(iv, ts, 1)
if pred == nil and lat and lat.ts < ts then pred = lat end
if succ == nil and lat and lat.ts > ts then succ = lat end
local function backwards(reg, value, other, word)
  redis.call('HINCRBY', counters, 'rejected', 1)
  return {'rejected', 'register_backwards',
    reg .. ' ' .. value .. ' is ' .. word .. ' ' .. string.format('%.17g', other)}
end
if pred then
  if imp < pred.imp then return backwards('import_kwh', imp_s, pred.imp, 'below the earlier read') end
  if exp < pred.exp then return backwards('export_kwh', exp_s, pred.exp, 'below the earlier read') end
  if ts > pred.ts then
    local d = math.max(imp - pred.imp, exp - pred.exp) * 3.6e9 / (ts - pred.ts)
    if d > max_demand_w then q = 'S' end
  end
end
if succ then
  if imp > succ.imp then return backwards('import_kwh', imp_s, succ.imp, 'above the later read') end
  if exp > succ.exp then return backwards('export_kwh', exp_s, succ.exp, 'above the later read') end
  -- A read back-loaded before later registers it does not lead to (another baseline) is as
  -- implausible as a jump after an earlier one: flagged, and the gap between is not estimated.
  if succ.ts > ts and math.max(succ.imp - imp, succ.exp - exp) * 3.6e9 / (succ.ts - ts) > max_demand_w then
    q = 'S'
  end
end

local dropped = drop_estimates(iv, pred and pred.ts, succ and succ.ts)
local member = ts_s .. '|' .. seq .. '|' .. imp_s .. '|' .. exp_s .. '|' .. pw_s .. '|' .. v_s .. '|' .. q
redis.call('ZADD', iv, ts, member)
local me = {ts = ts, imp = imp, exp = exp}
-- n: estimated rows added net of those this read replaced, so a batch's sum is what it left estimated
local n = fill(iv, pred, me, interval, max_gap, max_demand_w) + fill(iv, me, succ, interval, max_gap, max_demand_w)
  - dropped
redis.call('ZADD', seqs, ts, seq)
redis.call('ZREMRANGEBYSCORE', seqs, '-inf', '(' .. ARGV[9])
if lat == nil or ts > lat.ts then
  redis.call('HSET', latest, 'ts_ms', ts_s, 'seq', seq, 'import_kwh', imp_s, 'export_kwh', exp_s,
    'power_w', pw_s, 'voltage_v', v_s, 'quality', q)
end
redis.call('HINCRBY', counters, 'accepted', 1)
if q == 'S' then redis.call('HINCRBY', counters, 'suspect', 1) end
if n ~= 0 then redis.call('HINCRBY', counters, 'estimated', n) end
""" + aggregates.INGEST_TAIL + r"""
return {'accepted', q, n}
"""

# KEYS: iv latest counters audit (the hot set: hot_store.edit adds the meter after)
# ARGV: ts_ms expected_old new_member new_imp new_exp who reason now_s interval_ms max_gap_ms meter old_text
EDIT = LUA_COMMON + r"""
local iv, latest, counters, audit = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ts_s = ARGV[1]
local ts = tonumber(ts_s)
local expected, member = ARGV[2], ARGV[3]
local imp, exp = tonumber(ARGV[4]), tonumber(ARGV[5])
local interval, max_gap = tonumber(ARGV[9]), tonumber(ARGV[10])
local cur = redis.call('ZRANGEBYSCORE', iv, ts, ts)
if expected == '' then
  if #cur > 0 then return {'conflict'} end
elseif #cur ~= 1 or cur[1] ~= expected then
  return {'conflict'}
end
local lat = latest_point(latest)
local pred = neighbour(iv, ts, -1)
local succ = neighbour(iv, ts, 1)
if pred == nil and lat and lat.ts < ts then pred = lat end
if succ == nil and lat and lat.ts > ts then succ = lat end
if pred and (imp < pred.imp or exp < pred.exp) then
  return {'rejected', 'registers would go backwards: the read at ' .. string.format('%d', pred.ts)
    .. ' ms has import_kwh ' .. string.format('%.17g', pred.imp) .. ', export_kwh ' .. string.format('%.17g', pred.exp)}
end
if succ and (imp > succ.imp or exp > succ.exp) then
  return {'rejected', 'registers would go backwards: the read at ' .. string.format('%d', succ.ts)
    .. ' ms has import_kwh ' .. string.format('%.17g', succ.imp) .. ', export_kwh ' .. string.format('%.17g', succ.exp)}
end
for _, m in ipairs(cur) do redis.call('ZREM', iv, m) end
drop_estimates(iv, pred and pred.ts, succ and succ.ts)
redis.call('ZADD', iv, ts, member)
local me = {ts = ts, imp = imp, exp = exp}
local n = fill(iv, pred, me, interval, max_gap) + fill(iv, me, succ, interval, max_gap)
if lat and lat.ts == ts then
  redis.call('HSET', latest, 'import_kwh', ARGV[4], 'export_kwh', ARGV[5], 'quality', 'M')
end
local id = redis.call('XADD', audit, '*', 'ts_ms', ts_s, 'who', ARGV[6], 'at', ARGV[8], 'old', ARGV[12],
  'new', member, 'reason', ARGV[7])
redis.call('HINCRBY', counters, 'edited', 1)
return {'ok', id, n}
"""

# KEYS: iv ; ARGV: meter members... Returns {removed, rows left} (hot_store.trim updates the hot set).
TRIM = r"""
local n = 0
for i = 2, #ARGV do n = n + redis.call('ZREM', KEYS[1], ARGV[i]) end
return {n, redis.call('ZCARD', KEYS[1])}
"""

# KEYS: iv ; ARGV: meter members... (rows copied back from cold; a hot row at the same ts wins)
REHYDRATE = r"""
local n = 0
for i = 2, #ARGV do
  local ts = string.match(ARGV[i], '^(%d+)|')
  if redis.call('ZCOUNT', KEYS[1], ts, ts) == 0 then redis.call('ZADD', KEYS[1], ts, ARGV[i]); n = n + 1 end
end
return n
"""
