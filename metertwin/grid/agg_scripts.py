"""Lua of the aggregation (used by :mod:`metertwin.grid.aggregates` and the MDMS ingest script).

* :data:`INGEST_TAIL` is appended to the MDMS ingest script (meter slot ``{meter_id}``): for an
  accepted reading it updates the meter's latest values and appends an outbox entry, in the same
  atomic step as the interval row, so no accepted reading is left out and none is entered twice;
* :data:`METER` (meter slot): a new place (``place``) or an acknowledgement (``ack``);
* :data:`NODE` (one tree node's slot ``{grid:<level>:<node>}``): applies a batch of meters'
  entries, each at most once (the node keeps the last entry number applied per meter).
"""

from __future__ import annotations

# Helpers over the meter's grid state (KEYS of the caller: state, outbox). An outbox entry is one
# string (no JSON: the drain splits it): ``n|ts|pw|v|ops|parts`` with ops ``level,node,op`` and
# parts ``bucket,d_import_kwh,d_export_kwh,readings,v_lo,v_hi`` each joined by ';' (node names
# hold none of | ; , : metertwin.fleet.topology.NAME_RE).
LUA_GRID = r"""
local GRID_LEVELS = {'transformer', 'feeder', 'substation', 'region'}
-- The meter's grid state in one read: latest ts, pw, v; place p_*; counted path c_*.
local function grid_state(st)
  local f = redis.call('HMGET', st, 'ts', 'pw', 'v', 'p_transformer', 'p_feeder', 'p_substation', 'p_region',
    'c_transformer', 'c_feeder', 'c_substation', 'c_region')
  local g = {placed = {}, counted = {}, any = false}
  if f[1] then g.cur = {f[1], f[2], f[3]} end
  for i, lv in ipairs(GRID_LEVELS) do
    if f[3 + i] and f[3 + i] ~= '' then g.placed[lv] = f[3 + i]; g.any = true end
    if f[7 + i] and f[7 + i] ~= '' then g.counted[lv] = f[7 + i]; g.any = true end
  end
  return g
end
-- Append the entry that moves the counted path to the place (leave, then set) with these parts.
local function grid_push(st, out, g, parts)
  local ops = {}
  for _, lv in ipairs(GRID_LEVELS) do
    local c, p = g.counted[lv], g.placed[lv]
    if c and c ~= p then ops[#ops + 1] = lv .. ',' .. c .. ',leave' end
    if p then ops[#ops + 1] = lv .. ',' .. p .. ',set' end
    if c ~= p then redis.call('HSET', st, 'c_' .. lv, p or '') end
  end
  if #ops == 0 then return end
  local n = redis.call('HINCRBY', st, 'n', 1)
  redis.call('ZADD', out, n, n .. '|' .. g.cur[1] .. '|' .. g.cur[2] .. '|' .. g.cur[3] .. '|'
    .. table.concat(ops, ';') .. '|' .. table.concat(parts, ';'))
end
"""

# Appended to the MDMS INGEST script, after an accepted reading: needs its locals ts, ts_s, pw_s, v_s,
# imp, exp, pred, succ (tables with ts, imp, exp, or nil); KEYS[6] state, KEYS[7] outbox;
# ARGV[14] '1' to aggregate, ARGV[15] the aggregate interval (ms).
INGEST_TAIL = r"""
if ARGV[14] == '1' then
  local st, out = KEYS[6], KEYS[7]
  local I = tonumber(ARGV[15])
  -- interval of a segment or reading ending at t: (start, start + I]
  local function bucket(t) return string.format('%d', math.floor((t - 1) / I) * I) end
  local function num(x) return string.format('%.17g', x) end
  local g = grid_state(st)
  if not g.cur or ts > tonumber(g.cur[1]) then
    redis.call('HSET', st, 'ts', ts_s, 'pw', pw_s, 'v', v_s)
    g.cur = {ts_s, pw_s, v_s}
  end
  if g.any then
    -- energy: the new segments (pred, me] and (me, succ] replace the old one (pred, succ]
    local parts = {bucket(ts) .. ',0,0,1,' .. v_s .. ',' .. v_s}
    if pred then
      parts[#parts + 1] = bucket(ts) .. ',' .. num(imp - pred.imp) .. ',' .. num(exp - pred.exp) .. ',0,,'
    end
    if succ then
      if pred then
        parts[#parts + 1] = bucket(succ.ts) .. ',' .. num(pred.imp - imp) .. ',' .. num(pred.exp - exp) .. ',0,,'
      else
        parts[#parts + 1] = bucket(succ.ts) .. ',' .. num(succ.imp - imp) .. ',' .. num(succ.exp - exp) .. ',0,,'
      end
    end
    grid_push(st, out, g, parts)
  end
end
"""

# KEYS: state outbox (the meter's slot)
# ARGV: 'place', version, transformer, feeder, substation, region   ('' for a level not set)
#    or 'ack', n
# Returns the number of entries left in the outbox.
METER = LUA_GRID + r"""
local st, out = KEYS[1], KEYS[2]
if ARGV[1] == 'ack' then
  redis.call('ZREMRANGEBYSCORE', out, '-inf', ARGV[2])
elseif ARGV[1] == 'place' then
  local pv = tonumber(redis.call('HGET', st, 'p_v') or '-1')
  if tonumber(ARGV[2]) > pv then
    redis.call('HSET', st, 'p_v', ARGV[2], 'p_transformer', ARGV[3], 'p_feeder', ARGV[4],
      'p_substation', ARGV[5], 'p_region', ARGV[6])
    local g = grid_state(st)
    if g.cur then grid_push(st, out, g, {}) end
  end
end
return redis.call('ZCARD', out)
"""

# KEYS: cur meters seen volt history buckets (one node's slot)
# ARGV: now_ms, then per entry (a meter's in order of n): meter, op ('set'|'leave'), the entry string
# Returns the number of entries applied (an entry whose n the node has seen for that meter is skipped).
NODE = r"""
local cur, meters, seen, volt, hist, hb = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local now = ARGV[1]
local d_imp, d_exp, applied = 0, 0, 0
local acc, last_b = {}, nil
local function contrib(p, sign)
  if p > 0 then d_imp = d_imp + sign * p elseif p < 0 then d_exp = d_exp - sign * p end
end
for i = 2, #ARGV, 3 do
  local meter, op = ARGV[i], ARGV[i + 1]
  local n_s, ts_s, pw_s, v_s, _, parts = string.match(ARGV[i + 2], '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  local n, ts, pw, v = tonumber(n_s), tonumber(ts_s), tonumber(pw_s), tonumber(v_s)
  local rec = redis.call('HGET', meters, meter)
  local old, on, ots, opw, ov = false, 0, nil, nil, nil
  if rec then
    local a, b, c, d = string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
    if a then old, on, ots, opw, ov = true, tonumber(a), tonumber(b), tonumber(c), tonumber(d)
    else on = tonumber(string.match(rec, '^([^|]*)')) end  -- 'n|left': the meter left at entry n
  end
  if n <= on then
    -- applied already (a drain run again): nothing
  elseif op == 'leave' then
    if old then
      contrib(opw, -1)
      redis.call('ZREM', seen, meter)
      redis.call('ZREM', volt, meter)
    end
    -- a tombstone keeps n, so a replay of the meter's earlier entries here is still skipped
    redis.call('HSET', meters, meter, n_s .. '|left')
    applied = applied + 1
  else
    applied = applied + 1
    for part in string.gmatch(parts, '([^;]+)') do
      local b, di, de, cnt, lo, hi = string.match(part, '^([^,]*),([^,]*),([^,]*),([^,]*),([^,]*),([^,]*)$')
      local a = acc[b]
      if not a then a = {0, 0, 0, nil, nil}; acc[b] = a end
      a[1] = a[1] + tonumber(di); a[2] = a[2] + tonumber(de); a[3] = a[3] + tonumber(cnt)
      lo, hi = tonumber(lo), tonumber(hi)
      if lo and (a[4] == nil or lo < a[4]) then a[4] = lo end
      if hi and (a[5] == nil or hi > a[5]) then a[5] = hi end
      if cnt ~= '0' and (last_b == nil or tonumber(b) > tonumber(last_b)) then last_b = b end
    end
    if old and ots > ts then ts_s, pw_s, v_s, ts, pw, v = tostring(ots), tostring(opw), tostring(ov), ots, opw, ov end
    if old then contrib(opw, -1) end
    contrib(pw, 1)
    redis.call('HSET', meters, meter, n_s .. '|' .. ts_s .. '|' .. pw_s .. '|' .. v_s)
    redis.call('ZADD', seen, ts, meter)
    if ov ~= v then redis.call('ZADD', volt, v, meter) end
  end
end
if applied == 0 then return 0 end
if d_imp ~= 0 then redis.call('HINCRBYFLOAT', cur, 'import_w', d_imp) end
if d_exp ~= 0 then redis.call('HINCRBYFLOAT', cur, 'export_w', d_exp) end
redis.call('HSET', cur, 'at_ms', now)
for b, a in pairs(acc) do
  if a[1] ~= 0 then redis.call('HINCRBYFLOAT', hist, b .. ':i', a[1]) end
  if a[2] ~= 0 then redis.call('HINCRBYFLOAT', hist, b .. ':e', a[2]) end
  if a[3] ~= 0 then redis.call('HINCRBY', hist, b .. ':n', a[3]) end
  if a[4] then
    local lo = tonumber(redis.call('HGET', hist, b .. ':lo'))
    if lo == nil or a[4] < lo then redis.call('HSET', hist, b .. ':lo', string.format('%.17g', a[4])) end
    local hi = tonumber(redis.call('HGET', hist, b .. ':hi'))
    if hi == nil or a[5] > hi then redis.call('HSET', hist, b .. ':hi', string.format('%.17g', a[5])) end
  end
  redis.call('ZADD', hb, b, b)
end
if last_b then
  -- the peak net import seen at an update, in the interval of the newest reading applied
  local c = redis.call('HMGET', cur, 'import_w', 'export_w')
  local net = (tonumber(c[1]) or 0) - (tonumber(c[2]) or 0)
  local pk = tonumber(redis.call('HGET', hist, last_b .. ':pk'))
  if pk == nil or net > pk then redis.call('HSET', hist, last_b .. ':pk', string.format('%.17g', net)) end
end
return applied
"""
