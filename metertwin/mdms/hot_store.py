"""The MDMS hot tier: interval rows, latest registers and counters in the fog zone's Redis.

Every write that reads state first (dedupe, neighbours, estimation, edits, trims)
is one Lua script, so concurrent invocations of one meter cannot interleave and a
QoS1 redelivery is counted once. Key layout: ``metertwin/mdms/keys.py``.
"""

from __future__ import annotations

import asyncio
import functools
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from metertwin.core.errors import BackendUnavailable
from metertwin.core.settings import get_settings
from metertwin.mdms import keys
from metertwin.mdms.intervals import Row
from metertwin.mdms.settings import MdmsSettings, get_mdms_settings
from metertwin.twin import keys as twin_keys


@functools.cache
def _client(url: str, timeout_s: float) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        retry_on_timeout=False,
    )


def get_hot_redis() -> redis.Redis:
    """The Redis that holds the hot tier (``HOT_REDIS_URL``, else the zone's ``REDIS_URL``)."""
    return _client(get_mdms_settings().redis_url(), get_settings().redis_timeout_s)


def reset_hot_redis() -> None:
    """Close and forget the hot-tier clients (tests, process shutdown)."""
    _client.cache_clear()
    _scripts.cache_clear()
    _async.clear()


#: Per event loop: an asyncio client and its ingest script (the gateway's async lane).
_async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[aioredis.Redis, Any]] = (
    weakref.WeakKeyDictionary()
)


def _async_ingest() -> tuple[aioredis.Redis, Any]:
    loop = asyncio.get_running_loop()
    found = _async.get(loop)
    if found is None:
        timeout = get_settings().redis_timeout_s
        client = aioredis.Redis.from_url(
            get_mdms_settings().redis_url(), decode_responses=True, socket_timeout=timeout,
            socket_connect_timeout=timeout, health_check_interval=30, retry_on_timeout=False,
        )
        found = _async[loop] = (client, client.register_script(_INGEST))
    return found


def get_hot_redis_async() -> aioredis.Redis:
    """The hot tier's asyncio client of the running event loop."""
    return _async_ingest()[0]


async def ingest_one_async(meter_id: str, row: Row, now_s: float | None = None) -> IngestOutcome:
    """:func:`ingest_one` without blocking the event loop (same script, same keys)."""
    s = get_mdms_settings()
    ks, argv = ingest_args(meter_id, row, time.time() if now_s is None else now_s, s)
    script = _async_ingest()[1]
    try:
        raw = await script(keys=ks, args=argv)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"hot store (Redis) failed during ingest: {exc}") from exc
    return outcome_of(raw)


# Shared Lua: parse a member, find the nearest non-estimated neighbours, fill gaps.
_LUA_COMMON = r"""
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
local function fill(iv, a, b, interval, max_gap)
  if a == nil or b == nil or a.latest or b.latest then return 0 end
  local span = b.ts - a.ts
  if span <= interval * 1.5 or span > max_gap then return 0 end
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

# KEYS: iv seqs latest counters registry hot_meters all_meters
# ARGV: ts_ms seq imp exp power volt quality interval_ms seq_floor_ms max_gap_ms max_demand_w require_reg meter
_INGEST = _LUA_COMMON + r"""
local iv, seqs, latest, counters, registry, hot, meters = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
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
end

drop_estimates(iv, pred and pred.ts, succ and succ.ts)
local member = ts_s .. '|' .. seq .. '|' .. imp_s .. '|' .. exp_s .. '|' .. pw_s .. '|' .. v_s .. '|' .. q
redis.call('ZADD', iv, ts, member)
local me = {ts = ts, imp = imp, exp = exp}
local n = fill(iv, pred, me, interval, max_gap) + fill(iv, me, succ, interval, max_gap)
redis.call('ZADD', seqs, ts, seq)
redis.call('ZREMRANGEBYSCORE', seqs, '-inf', '(' .. ARGV[9])
if lat == nil or ts > lat.ts then
  redis.call('HSET', latest, 'ts_ms', ts_s, 'seq', seq, 'import_kwh', imp_s, 'export_kwh', exp_s,
    'power_w', pw_s, 'voltage_v', v_s, 'quality', q)
end
redis.call('HINCRBY', counters, 'accepted', 1)
if q == 'S' then redis.call('HINCRBY', counters, 'suspect', 1) end
if n > 0 then redis.call('HINCRBY', counters, 'estimated', n) end
redis.call('SADD', hot, meter)
redis.call('SADD', meters, meter)
return {'accepted', q, n}
"""

# KEYS: iv latest counters audit hot_meters
# ARGV: ts_ms expected_old new_member new_imp new_exp who reason now_s interval_ms max_gap_ms meter old_text
_EDIT = _LUA_COMMON + r"""
local iv, latest, counters, audit, hot = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
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
redis.call('SADD', hot, ARGV[11])
return {'ok', id, n}
"""

# KEYS: iv hot_meters ; ARGV: meter members...
_TRIM = r"""
local n = 0
for i = 2, #ARGV do n = n + redis.call('ZREM', KEYS[1], ARGV[i]) end
if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[1]) end
return n
"""

# KEYS: iv hot_meters ; ARGV: meter members... (rows copied back from cold; a hot row at the same ts wins)
_REHYDRATE = r"""
local n = 0
for i = 2, #ARGV do
  local ts = string.match(ARGV[i], '^(%d+)|')
  if redis.call('ZCOUNT', KEYS[1], ts, ts) == 0 then redis.call('ZADD', KEYS[1], ts, ARGV[i]); n = n + 1 end
end
if n > 0 then redis.call('SADD', KEYS[2], ARGV[1]) end
return n
"""

_CHUNK = 2000


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    status: str  # accepted | duplicate | rejected
    quality: str | None = None
    estimated: int = 0
    rule: str | None = None
    reason: str | None = None


def _script(name: str, source: str) -> Any:
    return _scripts(get_mdms_settings().redis_url(), name, source)


@functools.cache
def _scripts(url: str, name: str, source: str) -> Any:
    return get_hot_redis().register_script(source)


def ingest_args(meter_id: str, row: Row, now_s: float, s: MdmsSettings) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of the ingest script for one validated reading."""
    member = row.encode().split("|")
    ks = [
        keys.mdms_intervals(meter_id), keys.mdms_sequences(meter_id), keys.mdms_latest(meter_id),
        keys.mdms_counters(meter_id), twin_keys.registry_entry(meter_id), keys.MDMS_HOT_METERS, keys.MDMS_METERS,
    ]
    argv = [
        member[0], member[1], member[2], member[3], member[4], member[5], member[6],
        str(s.interval_ms), str(int((now_s - s.horizon_s) * 1000)), str(int(s.estimation_max_gap_s * 1000)),
        repr(s.max_demand_kw * 1000), "1" if s.require_registered_meter else "0", meter_id,
    ]
    return ks, argv


def outcome_of(raw: Sequence[Any]) -> IngestOutcome:
    status = str(raw[0])
    if status == "accepted":
        return IngestOutcome("accepted", quality=str(raw[1]), estimated=int(raw[2]))
    if status == "duplicate":
        return IngestOutcome("duplicate")
    return IngestOutcome("rejected", rule=str(raw[1]), reason=str(raw[2]))


def ingest_many(items: Sequence[tuple[str, Row]], now_s: float | None = None) -> list[IngestOutcome]:
    """Run the ingest script for each ``(meter_id, row)`` in order, pipelined (one round trip per chunk)."""
    s = get_mdms_settings()
    now = time.time() if now_s is None else now_s
    script = _script("ingest", _INGEST)
    out: list[IngestOutcome] = []
    try:
        for start in range(0, len(items), _CHUNK):
            pipe = get_hot_redis().pipeline(transaction=False)
            for meter_id, row in items[start:start + _CHUNK]:
                ks, argv = ingest_args(meter_id, row, now, s)
                script(keys=ks, args=argv, client=pipe)
            out.extend(outcome_of(r) for r in pipe.execute())
    except redis.RedisError as exc:
        raise BackendUnavailable(f"hot store (Redis) failed during ingest: {exc}") from exc
    return out


def ingest_one(meter_id: str, row: Row, now_s: float | None = None) -> IngestOutcome:
    s = get_mdms_settings()
    ks, argv = ingest_args(meter_id, row, time.time() if now_s is None else now_s, s)
    try:
        raw = _script("ingest", _INGEST)(keys=ks, args=argv)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"hot store (Redis) failed during ingest: {exc}") from exc
    return outcome_of(raw)


def rows(meter_id: str, from_ms: int, to_ms: int) -> list[tuple[str, Row]]:
    """Hot rows with ``from_ms <= ts_ms <= to_ms``, as (member, row), in time order."""
    try:
        members = cast(list[str], get_hot_redis().zrangebyscore(keys.mdms_intervals(meter_id), from_ms, to_ms))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"hot store (Redis) failed: {exc}") from exc
    return [(m, Row.decode(m)) for m in members]


def edit(
    meter_id: str, row: Row, *, expected_old: str, old_text: str, who: str, reason: str, now_s: float
) -> list[Any]:
    s = get_mdms_settings()
    ks = [keys.mdms_intervals(meter_id), keys.mdms_latest(meter_id), keys.mdms_counters(meter_id),
          keys.mdms_audit(meter_id), keys.MDMS_HOT_METERS]
    argv = [str(row.ts_ms), expected_old, row.encode(), repr(row.import_kwh), repr(row.export_kwh), who, reason,
            repr(now_s), str(s.interval_ms), str(int(s.estimation_max_gap_s * 1000)), meter_id, old_text]
    try:
        return cast(list[Any], _script("edit", _EDIT)(keys=ks, args=argv))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"hot store (Redis) failed during edit: {exc}") from exc


def trim(meter_id: str, members: Sequence[str]) -> int:
    """Remove exactly these members (rows changed since the snapshot stay), chunked; returns rows removed."""
    script = _script("trim", _TRIM)
    removed = 0
    ks = [keys.mdms_intervals(meter_id), keys.MDMS_HOT_METERS]
    if not members:
        return int(script(keys=ks, args=[meter_id]))
    for start in range(0, len(members), _CHUNK):
        removed += int(script(keys=ks, args=[meter_id, *members[start:start + _CHUNK]]))
    return removed


def rehydrate(meter_id: str, members: Sequence[str]) -> int:
    """Copy cold rows back into the hot tier where no hot row has their timestamp."""
    script = _script("rehydrate", _REHYDRATE)
    added = 0
    ks = [keys.mdms_intervals(meter_id), keys.MDMS_HOT_METERS]
    for start in range(0, len(members), _CHUNK):
        added += int(script(keys=ks, args=[meter_id, *members[start:start + _CHUNK]]))
    return added


def known_meter(meter_id: str) -> bool:
    """A meter is known if the MDMS has data of it or the registry lists it."""
    r = get_hot_redis()
    pipe = r.pipeline(transaction=False)
    pipe.sismember(keys.MDMS_METERS, meter_id)
    pipe.exists(twin_keys.registry_entry(meter_id))
    try:
        in_mdms, registered = pipe.execute()
    except redis.RedisError as exc:
        raise BackendUnavailable(f"hot store (Redis) failed: {exc}") from exc
    return bool(in_mdms) or bool(registered)
