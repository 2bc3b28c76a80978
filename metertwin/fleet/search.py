"""Fleet search: ``GET /meters`` filters, an exact ``count`` and a stable cursor.

Topology filters (``region``, ``substation``, ``feeder``, ``transformer``, ``phase``, ``tariff``,
``customer_class``, ``zone``, ``group``, ``tag=k:v``; repeat ``group``/``tag`` to require several)
name index sets; one Lua script over the fleet slot counts their intersection with
``SINTERCARD`` and pages it. Redis intersects smallest set first by itself (``SINTER`` sorts its
inputs by cardinality). Results are ordered by meter id and the cursor is the last id of a
page, so paging is stable: a meter added or removed meanwhile never shifts another one across
a page boundary. Two plans, chosen in the script by the intersection's size:

* small (at most ``sort_max`` meters): ``SINTER``, sorted, the page cut after the cursor;
* large: walk the id-ordered set of all meters from the cursor in chunks, keeping the ids that
  are members of every filter set (``SMISMEMBER``): cost follows the page, not the fleet.

Live filters: ``online`` and ``stale_s`` by the live indexes (:mod:`metertwin.fleet.status`);
``release``, ``has_pending_commands``, ``dr_opted_out`` checked against each remaining candidate's
twin, command queue and DR preferences at query time (see :mod:`metertwin.fleet`); a query with
live filters may have at most ``live_scan_max`` topology
candidates, or it is refused with a message asking for a narrower topology filter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from metertwin.core.clients import StrRedis
from metertwin.core.errors import BackendUnavailable, InvalidInput
from metertwin.core.http import METER_ID_RE, query_bool, query_float
from metertwin.dr import keys as dr_keys
from metertwin.fleet import keys
from metertwin.fleet.live import LIVE_KEYS, LIVE_LUA, is_cluster, live_args
from metertwin.fleet.topology import (
    LUA_LIB,
    NAME_RE,
    NAME_RULE,
    SCALAR_INDEXED,
    TAG_KEY_RE,
    TAG_KEY_RULE,
    decode,
    topology_store,
)
from metertwin.twin import keys as twin_keys
from metertwin.upgrade.binding import DEFAULT_RELEASE

MAX_LIMIT = 1000
#: Intersections larger than this are always walked (the sort plan holds them in the script's memory).
SORT_MAX = 50_000
#: At most this many topology candidates for a search with live filters (the sort plan serves them).
LIVE_SCAN_MAX = SORT_MAX
#: The walk plan is chosen when count² x this > (limit + 1) x all twins: a walked member (range read +
#: membership tests) costs about a fifth of a sorted candidate (a document bucket read + the sort).
WALK_FACTOR = 5
WALK_CHUNK = 500
VERIFY_BATCH = 500
LIVE_FILTERS = ("online", "stale_s", "release", "has_pending_commands", "dr_opted_out")

# KEYS: 1 all meters (id-ordered "<meter> <ordinal>"), then the filter index sets (of ordinals)
# ARGV: doc prefix, cursor ('' from the start), limit, walk chunk, with docs (1/0), walk factor, sort max
# Returns {count, more (1/0), ids..., then docs... when asked}
SEARCH_LUA = LUA_LIB + """
local cursor, limit, chunk = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local filters = {}
for i = 2, #KEYS do filters[#filters + 1] = KEYS[i] end
local count, page, pords = 0, {}, {}
-- '<cursor>!' sorts after every '<cursor> <ordinal>' and before any longer id
local start = (cursor == '') and '-' or ('[' .. cursor .. '!')
local function split(member)
  local at = string.find(member, ' ', 1, true)
  return string.sub(member, 1, at - 1), tonumber(string.sub(member, at + 1))
end
local function walk(keep_all)
  while #page <= limit do
    local members = redis.call('ZRANGE', KEYS[1], start, '+', 'BYLEX', 'LIMIT', 0, keep_all and (limit + 1) or chunk)
    if #members == 0 then break end
    local ids, ords = {}, {}
    for i = 1, #members do ids[i], ords[i] = split(members[i]) end
    local keep = {}
    for i = 1, #ids do keep[i] = true end
    for _, k in ipairs(filters) do
      local member = redis.call('SMISMEMBER', k, unpack(ords))
      for i = 1, #ids do if member[i] == 0 then keep[i] = false end end
    end
    for i = 1, #ids do
      if keep[i] and #page <= limit then page[#page + 1] = ids[i]; pords[#page] = ords[i] end
    end
    start = '(' .. members[#members]
    if keep_all then break end
  end
end
if #filters == 0 then
  count = redis.call('ZCARD', KEYS[1])
  walk(true)
else
  count = redis.call('SINTERCARD', #filters, unpack(filters))
  local total = redis.call('ZCARD', KEYS[1])
  -- walking costs about (limit + 1) * total / count members; sorting, count (each a bucket read)
  if count > tonumber(ARGV[7]) or (count > 0 and count * count * tonumber(ARGV[6]) > (limit + 1) * total) then
    walk(false)
  elseif count > 0 then
    local ords = redis.call('SINTER', unpack(filters))
    local rows = {}
    for i = 1, #ords do
      local o = tonumber(ords[i])
      local v = redis.call('HGET', doc_key(o), o % BUCKET)
      if v then
        local at = string.find(v, ' ', 1, true)
        rows[#rows + 1] = {string.sub(v, 1, at - 1), o, string.sub(v, at + 1)}
      end
    end
    table.sort(rows, function(a, b) return a[1] < b[1] end)
    local lo, hi = 1, #rows + 1
    if cursor ~= '' then
      while lo < hi do
        local mid = math.floor((lo + hi) / 2)
        if rows[mid][1] <= cursor then lo = mid + 1 else hi = mid end
      end
    end
    for i = lo, math.min(#rows, lo + limit) do page[#page + 1] = rows[i][1]; pords[#page] = rows[i][2] end
  end
end
local more = 0
if #page > limit then more = 1; page[#page] = nil end
local out = {count, more}
for i = 1, #page do out[#out + 1] = page[i] end
if ARGV[5] == '1' then
  for i = 1, #page do out[#out + 1] = read(page[i], pords[i]) end
end
return out
"""


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed search: index sets to intersect, live filters, the page."""

    index_keys: tuple[str, ...] = ()
    live: dict[str, Any] = field(default_factory=dict)
    limit: int = 100
    cursor: str = ""

    @classmethod
    def from_params(cls, query: Mapping[str, str], multi: Mapping[str, list[str]] | None = None) -> Query:
        """Parse query parameters; ``multi`` holds every value of repeated ``group``/``tag`` parameters."""
        multi = multi or {}
        sets: list[str] = []
        for name in SCALAR_INDEXED:
            value = query.get(name)
            if value:
                _check(NAME_RE.match(value), name, value, NAME_RULE)
                sets.append(keys.index(name, value))
        for group in multi.get("group") or ([query["group"]] if query.get("group") else []):
            _check(NAME_RE.match(group), "group", group, NAME_RULE)
            sets.append(keys.index("group", group))
        for tag in multi.get("tag") or ([query["tag"]] if query.get("tag") else []):
            key, sep, value = tag.partition(":")
            _check(sep and TAG_KEY_RE.match(key), "tag", tag, f"key:value, the key {TAG_KEY_RULE}")
            _check(NAME_RE.match(value), "tag", tag, f"key:value, the value {NAME_RULE}")
            sets.append(keys.index("tag", f"{key}={value}"))
        live: dict[str, Any] = {}
        for name in ("online", "has_pending_commands", "dr_opted_out"):
            if query.get(name, "") != "":
                live[name] = query_bool(query, name)
        if query.get("stale_s", "") != "":
            live["stale_s"] = query_float(query, "stale_s", 0, lo=0, hi=10 * 365 * 86400)
        if query.get("release"):
            _check(NAME_RE.match(query["release"]), "release", query["release"], NAME_RULE)
            live["release"] = query["release"]
        cursor = query.get("cursor") or ""
        _check(not cursor or METER_ID_RE.match(cursor), "cursor", cursor, "a meter id (the next_cursor of a page)")
        limit = int(query_float(query, "limit", 100, lo=1, hi=MAX_LIMIT))
        return cls(tuple(sorted(set(sets))), live, limit, cursor)


@dataclass(frozen=True, slots=True)
class Page:
    count: int
    meters: list[dict[str, Any]]
    next_cursor: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "meters": self.meters, "next_cursor": self.next_cursor}


class FleetSearch:
    """Runs :class:`Query` objects against one zone's Redis."""

    def __init__(self, client: StrRedis) -> None:
        self._r = client
        self._search = client.register_script(SEARCH_LUA)
        self._live = None if is_cluster(client) else client.register_script(LIVE_LUA)
        #: ``online``/``stale_s`` by the live indexes (:mod:`metertwin.fleet.status`); off: from each twin.
        self.by_index = True

    def run(self, q: Query) -> Page:
        if not q.live:
            count, more, ids, docs = self._call(q.index_keys, q.cursor, q.limit, with_docs=True)
            return Page(count, _items(ids, docs), ids[-1] if more and ids else None)
        # Live filters: every topology candidate is checked, for an exact count.
        if self._live is not None:  # a single Redis: checked inside it, in one script
            try:
                reply = self._live(keys=[*LIVE_KEYS, *q.index_keys],
                                   args=live_args(q.live, q.cursor, q.limit, LIVE_SCAN_MAX, time.time(),
                                                  self.by_index))
            except redis.RedisError as exc:
                raise BackendUnavailable(f"Redis unavailable searching the fleet: {exc}") from exc
            if int(reply[0]) < 0:
                self._too_many(int(reply[1]), q)
            count, more, rest = int(reply[0]), bool(reply[1]), list(reply[2:])
            ids, docs = rest[:len(rest) // 2], [decode(_json(d)) for d in rest[len(rest) // 2:]]
            return Page(count, _items(ids, docs), ids[-1] if more and ids else None)
        total, _more, candidates, _docs = self._call(q.index_keys, "", LIVE_SCAN_MAX, with_docs=False)
        if total > LIVE_SCAN_MAX:
            self._too_many(total, q)
        matched = self._verify(candidates, q.live)
        after = [m for m in matched if m > q.cursor] if q.cursor else matched
        page = after[:q.limit]
        docs = topology_store(self._r).get_many(page)
        return Page(len(matched), _items(page, docs),
                    page[-1] if len(after) > q.limit else None)

    @staticmethod
    def _too_many(total: int, q: Query) -> None:
        raise InvalidInput(f"{total} twins match the topology filters, more than the {LIVE_SCAN_MAX} a search "
                           f"with {', '.join(sorted(q.live))} may check: add a feeder, transformer or group "
                           "filter", field=sorted(q.live)[0])

    def _call(self, sets: tuple[str, ...], cursor: str, limit: int, *, with_docs: bool
              ) -> tuple[int, bool, list[str], list[Any]]:
        try:
            reply = self._search(keys=[keys.ALL_METERS, *sets],
                                 args=[keys.DOC_PREFIX, cursor, limit, WALK_CHUNK, "1" if with_docs else "0",
                                       WALK_FACTOR, SORT_MAX])
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable searching the fleet: {exc}") from exc
        count, more, rest = int(reply[0]), bool(reply[1]), list(reply[2:])
        n = len(rest) // 2 if with_docs else len(rest)
        return count, more, rest[:n], [decode(_json(d)) for d in rest[n:]]

    def _verify(self, ids: list[str], live: dict[str, Any]) -> list[str]:
        """The ids whose twin, commands and DR preferences pass every live filter (order kept)."""
        now = time.time()
        out: list[str] = []
        for start in range(0, len(ids), VERIFY_BATCH):
            batch = ids[start:start + VERIFY_BATCH]
            pipe = self._r.pipeline(transaction=False)
            for meter_id in batch:
                pipe.hmget(twin_keys.twin(meter_id), ("v", "r", "m", "b"))
                if "has_pending_commands" in live:
                    pipe.zcount(twin_keys.pending_commands(meter_id), now, "+inf")
                if "dr_opted_out" in live:
                    pipe.get(dr_keys.dr_preferences(meter_id))
            try:
                replies = iter(pipe.execute())
            except redis.RedisError as exc:
                raise BackendUnavailable(f"Redis unavailable searching the fleet: {exc}") from exc
            for meter_id in batch:
                version, reported, measurement, bound = next(replies)
                pending = next(replies) if "has_pending_commands" in live else 0
                prefs = next(replies) if "dr_opted_out" in live else None
                if version is not None and _passes(live, now, reported, measurement, bound, pending, prefs):
                    out.append(meter_id)
        return out


def _passes(live: dict[str, Any], now: float, reported: str | None, measurement: str | None,
            bound: str | None, pending: int, prefs: str | None) -> bool:
    if "online" in live:
        online = (_json(reported) or {}).get("online")
        if (isinstance(online, list) and online[:1] == [True]) != live["online"]:
            return False
    if "stale_s" in live:
        ts = (_json(measurement) or {}).get("ts")
        if isinstance(ts, int | float) and now - float(ts) < live["stale_s"]:
            return False
    if "release" in live and (bound or DEFAULT_RELEASE) != live["release"]:
        return False
    if "has_pending_commands" in live and (int(pending) > 0) != live["has_pending_commands"]:
        return False
    return not ("dr_opted_out" in live and bool((_json(prefs) or {}).get("opt_out")) != live["dr_opted_out"])


def _items(ids: list[str], docs: list[Any]) -> list[dict[str, Any]]:
    out = []
    for i, meter_id in enumerate(ids):
        doc = docs[i] if i < len(docs) else None
        out.append({"meter_id": meter_id, "version": (doc or {}).get("v", 0),
                    "topology": {k: v for k, v in (doc or {}).items() if k not in ("v", "at")}})
    return out


def _json(raw: Any) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _check(ok: Any, name: str, value: str, rule: str) -> None:
    if not ok:
        raise InvalidInput(f"query parameter {name}={value[:80]!r} is not valid: {rule}", field=name)


_searches: dict[int, FleetSearch] = {}


def fleet_search(client: StrRedis) -> FleetSearch:
    """The :class:`FleetSearch` of ``client``, built once (it registers its Lua script)."""
    s = _searches.get(id(client))
    if s is None or s._r is not client:
        s = _searches[id(client)] = FleetSearch(client)
    return s
