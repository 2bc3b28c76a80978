"""Live filters checked inside Redis: one script intersects the topology index sets, reads each
candidate's twin (and, when asked, its command queue and DR preferences), keeps the ones that pass,
counts them and cuts the page — one round trip instead of one command per candidate from Python.

The twins' keys are in their own slots (``{<meter>}``), so the script reads keys it does not
declare: that is allowed on a single Redis, not on Redis Cluster. On a cluster client
:mod:`metertwin.fleet.search` keeps checking the candidates from Python (pipelined), which gives
the same answer at about ten times the cost per candidate (see docs/benchmarks.md).

The checks are those of :func:`metertwin.fleet.search._passes`: ``online`` is the reported
``online`` field's first element being ``true``; ``stale_s``: the measurement's ``ts`` is at least
that old (a twin without one is stale); ``release``: the bound release (default when unbound);
``has_pending_commands``: a command due after now; ``dr_opted_out``: the preferences' ``opt_out``.
"""

from __future__ import annotations

from typing import Any

import redis

from metertwin.dr import keys as dr_keys
from metertwin.fleet import keys
from metertwin.fleet.topology import LUA_LIB
from metertwin.twin import keys as twin_keys
from metertwin.upgrade.binding import DEFAULT_RELEASE

# KEYS: 1 all meters, 2 online set, 3 last-reading zset, then the filter index sets
# ARGV: 1 doc prefix, 2 cursor, 3 limit, 4 scan max, 5 now, 6 online ('', '1', '0'), 7 stale_s (''),
#       8 release (''), 9 default release, 10 pending ('', '1', '0'), 11 opted out ('', '1', '0'),
#       12-17 twin / pending / DR key prefix and suffix around the meter id,
#       18 '1': online and stale_s by the live indexes (metertwin.fleet.status), '0': from each twin
# Returns {-1, candidates} when there are more than scan max candidates, else {count, more, ids..., docs...}
LIVE_LUA = LUA_LIB + """
local cursor, limit, scan_max, now = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local want_online, stale, release = ARGV[6], tonumber(ARGV[7]), ARGV[8]
local want_pending, want_opt = ARGV[10], ARGV[11]
local by_index = ARGV[18] == '1' and (want_online ~= '' or stale ~= nil)
local filters = {}
for i = 4, #KEYS do filters[#filters + 1] = KEYS[i] end
local rows = {}
local function decode(raw)
  if not raw then return nil end
  local ok, v = pcall(cjson.decode, raw)
  if ok and type(v) == 'table' then return v end
  return nil
end
local function truthy(v)
  return v ~= nil and v ~= false and v ~= cjson.null and v ~= 0 and v ~= ''
    and not (type(v) == 'table' and next(v) == nil)
end
-- the twin's fields a check needs, read once per candidate
local fields, at = {'v'}, {}
if want_online ~= '' and not by_index then fields[#fields + 1] = 'r'; at.r = #fields end
if stale and not by_index then fields[#fields + 1] = 'm'; at.m = #fields end
if release ~= '' then fields[#fields + 1] = 'b'; at.b = #fields end
-- JSON without a nested object has every key at the top level: a plain search is then exact,
-- and the decoder runs only for the others
local function online_of(r)
  if not r or not string.find(r, '"online":[true', 1, true) then return false end
  if not string.find(r, '{', 2, true) then return true end
  local rep = decode(r)
  return rep ~= nil and type(rep.online) == 'table' and rep.online[1] == true
end
local function ts_of(m)
  if not m then return nil end
  if not string.find(m, '{', 2, true) then
    return tonumber(string.match(m, '"ts":(-?[%d%.]+[eE]?[-+]?%d*)'))
  end
  local v = decode(m)
  if v and type(v.ts) == 'number' then return v.ts end
  return nil
end
local function passes(meter)
  local t = redis.call('HMGET', ARGV[12] .. meter .. ARGV[13], unpack(fields))
  if not t[1] then return false end
  if at.r and online_of(t[at.r]) ~= (want_online == '1') then return false end
  if at.m then
    local ts = ts_of(t[at.m])
    if ts and now - ts < stale then return false end
  end
  if at.b and (t[at.b] or ARGV[9]) ~= release then return false end
  if want_pending ~= '' then
    local n = redis.call('ZCOUNT', ARGV[14] .. meter .. ARGV[15], now, '+inf')
    if (n > 0) ~= (want_pending == '1') then return false end
  end
  if want_opt ~= '' then
    local prefs = decode(redis.call('GET', ARGV[16] .. meter .. ARGV[17]) or nil)
    if truthy(prefs and prefs.opt_out) ~= (want_opt == '1') then return false end
  end
  return true
end
-- the live indexes, a chunk of ordinals at a time: which of them pass online and stale_s
local function by_live_index(ords)
  local keep = {}
  for i = 1, #ords do keep[i] = true end
  if not by_index or #ords == 0 then return keep end
  if want_online ~= '' then
    local on = redis.call('SMISMEMBER', KEYS[2], unpack(ords))
    for i = 1, #ords do if (on[i] == 1) ~= (want_online == '1') then keep[i] = false end end
  end
  if stale then
    local ts = redis.call('ZMSCORE', KEYS[3], unpack(ords))
    for i = 1, #ords do
      local t = ts[i] and tonumber(ts[i])
      if t and now - t < stale then keep[i] = false end
    end
  end
  return keep
end
local CHUNK = 500
if #filters == 0 then
  local n = redis.call('ZCARD', KEYS[1])
  if n > scan_max then return {-1, n} end
  local members = redis.call('ZRANGE', KEYS[1], 0, -1)
  for c = 1, #members, CHUNK do
    local ids, ords = {}, {}
    for i = c, math.min(#members, c + CHUNK - 1) do
      local at = string.find(members[i], ' ', 1, true)
      ids[#ids + 1] = string.sub(members[i], 1, at - 1)
      ords[#ords + 1] = tonumber(string.sub(members[i], at + 1))
    end
    local keep = by_live_index(ords)
    for i = 1, #ids do
      if keep[i] and passes(ids[i]) then rows[#rows + 1] = {ids[i], ords[i]} end
    end
  end
else
  local n = redis.call('SINTERCARD', #filters, unpack(filters))
  if n > scan_max then return {-1, n} end
  local all = redis.call('SINTER', unpack(filters))
  for c = 1, #all, CHUNK do
    local ords = {}
    for i = c, math.min(#all, c + CHUNK - 1) do ords[#ords + 1] = tonumber(all[i]) end
    local keep = by_live_index(ords)
    for i = 1, #ords do
      if keep[i] then
        local o = ords[i]
        local v = redis.call('HGET', doc_key(o), o % BUCKET)
        if v then
          local meter = string.sub(v, 1, string.find(v, ' ', 1, true) - 1)
          if passes(meter) then rows[#rows + 1] = {meter, o} end
        end
      end
    end
  end
  table.sort(rows, function(a, b) return a[1] < b[1] end)
end
local lo = 1
if cursor ~= '' then
  local hi = #rows + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if rows[mid][1] <= cursor then lo = mid + 1 else hi = mid end
  end
end
local page = {}
for i = lo, math.min(#rows, lo + limit) do page[#page + 1] = rows[i] end
local more = 0
if #page > limit then more = 1; page[#page] = nil end
local out = {#rows, more}
for i = 1, #page do out[#out + 1] = page[i][1] end
for i = 1, #page do out[#out + 1] = read(page[i][1], page[i][2]) end
return out
"""


def _around(key: str) -> list[str]:
    """The prefix and suffix of a per-meter key around the meter id."""
    prefix, _, suffix = key.partition("\x00")
    return [prefix, suffix]


_TEMPLATES = [*_around(twin_keys.twin("\x00")), *_around(twin_keys.pending_commands("\x00")),
              *_around(dr_keys.dr_preferences("\x00"))]


def _flag(live: dict[str, Any], name: str) -> str:
    return "" if name not in live else ("1" if live[name] else "0")


def live_args(live: dict[str, Any], cursor: str, limit: int, scan_max: int, now: float,
              by_index: bool = True) -> list[Any]:
    """ARGV of :data:`LIVE_LUA` for the live filters ``live`` (as parsed by ``search.Query``); ``by_index``:
    ``online`` and ``stale_s`` from the live indexes (else from each twin: the benchmark's before)."""
    return [keys.DOC_PREFIX, cursor, limit, scan_max, repr(now), _flag(live, "online"),
            "" if "stale_s" not in live else repr(float(live["stale_s"])), live.get("release", ""), DEFAULT_RELEASE,
            _flag(live, "has_pending_commands"), _flag(live, "dr_opted_out"), *_TEMPLATES, "1" if by_index else "0"]


#: The keys of :data:`LIVE_LUA` before the filter index sets.
LIVE_KEYS = (keys.ALL_METERS, keys.ONLINE, keys.LAST_READING)


def is_cluster(client: Any) -> bool:
    """Whether ``client`` talks to a Redis Cluster (where :data:`LIVE_LUA` may not read the twins)."""
    return isinstance(client, redis.RedisCluster)
