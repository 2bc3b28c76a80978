"""The topology of one twin: where its meter sits in the grid, versioned, indexed and audited.

A topology document is a JSON object with the attributes of :data:`TOPOLOGY_FIELDS` that are
set, plus ``zone`` (the edge zone serving the twin), ``v`` (its version, +1 on every change, the
``ETag`` of ``GET /meters/{id}/topology`` and what ``If-Match`` names) and ``at`` (changed at,
epoch s). Patches follow JSON merge patch (RFC 7386): a field given replaces the stored one,
``null`` removes it, ``tags`` merge key by key (a ``null`` tag is removed), ``groups`` replace.

Every write is one Lua script over the fleet slot (see :mod:`metertwin.fleet`): it checks the
document is still the one the patch was computed from (else the write is recomputed), checks
the tree (a transformer has one feeder, a feeder one substation, a substation one region, while
any meter still hangs below it), moves the meter between the index sets, stores the document
and appends the change (who, when, old, new) to the capped audit stream. A search can
therefore never see an index that disagrees with a document. Stored, a document is a compact
JSON array (:func:`encode`) under the meter's ordinal, and the index sets hold ordinals (see
:mod:`metertwin.fleet.keys`); the audit's ``old``/``new`` are that array too.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from metertwin.core.clients import StrRedis
from metertwin.core.errors import BackendUnavailable, Conflict, UnknownMeter, VersionMismatch
from metertwin.fleet import keys, status
from metertwin.twin.state import twin_store

#: The attributes a topology may carry, in the order CSV files and documents list them.
TOPOLOGY_FIELDS = ("region", "substation", "feeder", "transformer", "phase", "location", "tariff",
                   "customer_class", "groups", "tags")
#: Attributes with one index set per value (``location`` is stored, not indexed).
SCALAR_INDEXED = ("region", "substation", "feeder", "transformer", "phase", "tariff", "customer_class", "zone")
#: (child, parent) levels of the grid tree.
TREE_LEVELS = (("transformer", "feeder"), ("feeder", "substation"), ("substation", "region"))
PHASES = ("A", "B", "C", "AB", "BC", "CA", "ABC")
MAX_GROUPS = 32
MAX_TAGS = 32

#: Names of grid nodes, tariffs, groups and tag values: they become parts of Redis keys, so no
#: braces (hash tags) and no ``=`` (the tag separator).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/ -]{0,63}$")
TAG_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
NAME_RULE = "1-64 letters, digits or _.:/- and spaces, starting with a letter or digit"
TAG_KEY_RULE = "1-32 letters, digits or _.- starting with a letter or digit"


def check_name(value: str, what: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(f"{what} {value!r} is not valid: {NAME_RULE}")
    return value


class Location(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lat: float = Field(ge=-90, le=90, allow_inf_nan=False)
    lon: float = Field(ge=-180, le=180, allow_inf_nan=False)


class TopologyFields(BaseModel):
    """The topology attributes, all optional; also the part of a registry profile that is topology."""

    model_config = ConfigDict(extra="forbid")

    region: str | None = None
    substation: str | None = None
    feeder: str | None = None
    transformer: str | None = None
    phase: Literal["A", "B", "C", "AB", "BC", "CA", "ABC"] | None = None
    location: Location | None = None
    tariff: str | None = None
    customer_class: str | None = None
    groups: list[str] | None = Field(default=None, max_length=MAX_GROUPS)
    #: In a patch a ``None`` tag value removes that tag.
    tags: dict[str, str | None] | None = Field(default=None, max_length=MAX_TAGS)

    @field_validator("region", "substation", "feeder", "transformer", "tariff", "customer_class")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "name")

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for group in value:
            check_name(group, "group")
        return sorted(set(value))

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: dict[str, str | None] | None) -> dict[str, str | None] | None:
        for key, tag in (value or {}).items():
            if not TAG_KEY_RE.match(key):
                raise ValueError(f"tag key {key!r} is not valid: {TAG_KEY_RULE}")
            if tag is not None:
                check_name(tag, f"tag {key!r} value")
        return value

    def changes(self) -> dict[str, Any]:
        """The fields this patch names (explicit ``null`` included), as plain JSON values."""
        return {name: getattr(self, name) if name != "location" or self.location is None
                else self.location.model_dump() for name in TOPOLOGY_FIELDS if name in self.model_fields_set}


def merge(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with ``changes`` applied as a JSON merge patch (``tags`` merge, ``groups`` replace)."""
    out = {k: v for k, v in doc.items() if k not in ("v", "at")}
    for name, value in changes.items():
        if name == "tags" and value is not None:
            tags = {**out.get("tags", {}), **value}
            value = {k: v for k, v in sorted(tags.items()) if v is not None} or None
        if name == "groups" and not value:
            value = None
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def index_keys(doc: dict[str, Any] | None) -> list[str]:
    """Every index set the meter of ``doc`` belongs to."""
    if not doc:
        return []
    out = [keys.index(name, str(doc[name])) for name in SCALAR_INDEXED if doc.get(name) is not None]
    out += [keys.index("group", g) for g in doc.get("groups", [])]
    out += [keys.index("tag", f"{k}={v}") for k, v in doc.get("tags", {}).items()]
    return out


# The meter's entry in the id-ordered set of all meters is "<meter> <ordinal>": these helpers (shared
# by the scripts) find it by a lexicographic range, and read the ordinal's document bucket (keys built
# from keys.DOC_PREFIX, ARGV[1]: they carry the fleet hash tag, the slot of the declared keys).
LUA_LIB = f"""
local DOCS, BUCKET = ARGV[1], {keys.DOC_BUCKET}
local function find(all, meter)
  local hit = redis.call('ZRANGE', all, '[' .. meter .. ' ', '(' .. meter .. '!', 'BYLEX', 'LIMIT', 0, 1)[1]
  if not hit then return nil end
  return tonumber(string.sub(hit, #meter + 2))
end
local function doc_key(ord) return DOCS .. math.floor(ord / BUCKET) end
local function read(meter, ord)
  if not ord then return '' end
  local v = redis.call('HGET', doc_key(ord), ord % BUCKET)
  if not v then return '' end
  return string.sub(v, #meter + 2)
end
"""

# KEYS: 1 all meters. ARGV: doc prefix, then meter ids. Returns each meter's stored document ('' none).
READ_LUA = LUA_LIB + """
local out = {}
for i = 2, #ARGV do out[#out + 1] = read(ARGV[i], find(KEYS[1], ARGV[i])) end
return out
"""

# KEYS: 1 all meters, 2 tree, 3 audit, 4 ordinal counter, then nold old index sets, nnew new index sets,
#       ntree child index sets (one per tree pair)
# ARGV: doc prefix, meter, old_raw ('' none), new_raw ('' remove), actor, now, audit_maxlen, nold, nnew, ntree,
#       then per tree pair: tree field ('<level>:<node>'), parent
# Returns {1} written, {-1} the document changed since it was read, {-2, field, known_parent} tree clash.
WRITE_LUA = LUA_LIB + """
local meter = ARGV[2]
local ord = find(KEYS[1], meter)
if read(meter, ord) ~= ARGV[3] then return {-1} end
local nold, nnew, ntree = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local base = 4 + nold + nnew
for i = 1, ntree do
  local field, parent = ARGV[9 + 2 * i], ARGV[10 + 2 * i]
  local known = redis.call('HGET', KEYS[2], field)
  if known and known ~= parent then
    local child = KEYS[base + i]
    -- the node may move only once no other meter hangs below it
    local mine = 0
    if ord then mine = redis.call('SISMEMBER', child, ord) end
    if redis.call('SCARD', child) - mine > 0 then
      return {-2, field, known}
    end
  end
end
if ARGV[4] == '' then
  if not ord then return {1} end
  for i = 1, nold do redis.call('SREM', KEYS[4 + i], ord) end
  redis.call('HDEL', doc_key(ord), ord % BUCKET)
  redis.call('ZREM', KEYS[1], meter .. ' ' .. ord)
else
  if not ord then
    ord = redis.call('INCR', KEYS[4])
    redis.call('ZADD', KEYS[1], 0, meter .. ' ' .. ord)
  end
  for i = 1, nold do redis.call('SREM', KEYS[4 + i], ord) end
  for i = 1, nnew do redis.call('SADD', KEYS[4 + nold + i], ord) end
  redis.call('HSET', doc_key(ord), ord % BUCKET, meter .. ' ' .. ARGV[4])
end
for i = 1, ntree do redis.call('HSET', KEYS[2], ARGV[9 + 2 * i], ARGV[10 + 2 * i]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'meter', meter, 'actor', ARGV[5], 'at', ARGV[6],
           'old', ARGV[3], 'new', ARGV[4])
return {1}
"""


class TopologyStore:
    """Versioned, indexed, audited topology documents in one zone's Redis."""

    def __init__(self, client: StrRedis) -> None:
        self._r = client
        self._write = client.register_script(WRITE_LUA)
        self._read = client.register_script(READ_LUA)

    def get(self, meter_id: str) -> dict[str, Any] | None:
        """The meter's topology document, or None when it has none."""
        return _loads(self._raw([meter_id])[0])

    def get_many(self, meter_ids: list[str]) -> list[dict[str, Any] | None]:
        if not meter_ids:
            return []
        return [_loads(raw) for raw in self._raw(meter_ids)]

    def _raw(self, meter_ids: list[str]) -> list[str]:
        """The stored (encoded) documents of these meters, '' for none."""
        return [str(raw or "") for raw in self._redis(self._read, keys=[keys.ALL_METERS],
                                                      args=[keys.DOC_PREFIX, *meter_ids])]

    def patch(self, meter_id: str, changes: dict[str, Any], *, actor: str, if_match: int | None = None,
              zone: str | None = None, replace: bool = False) -> dict[str, Any]:
        """Apply a merge patch to the meter's topology; returns the new document.

        The twin must exist. ``zone`` is recorded when the document is created (provisioning);
        otherwise the twin's own zone is. A patch that changes nothing returns the document as it
        is (same version, no audit entry). ``replace``: ``changes`` is the whole topology (every
        attribute it does not name is removed). Raises :class:`VersionMismatch` when ``if_match`` is
        not the current version (a twin without topology is version 0), :class:`Conflict` on a
        tree clash.
        """
        twins = twin_store(self._r)
        for _attempt in range(8):
            raw = self._raw([meter_id])[0]
            old = _loads(raw)
            version = int(old["v"]) if old else 0
            if if_match is not None and if_match != version:
                raise VersionMismatch(f"If-Match version {if_match} does not match the topology of {meter_id!r} "
                                      f"(version {version})", meter_id=meter_id, current_version=version)
            if old is None:
                zone = zone if zone is not None else twins.get(meter_id).zone
            elif not twins.exists(meter_id):
                raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)
            base = {"zone": old.get("zone", zone)} if old and replace else (old or {"zone": zone})
            new = merge(base, changes)
            if old is not None and new == merge(old, {}):
                return old
            new.update(v=version + 1, at=round(time.time(), 3))
            if self._apply(meter_id, raw, old, new, actor):
                if old is None:  # a new ordinal: the live indexes learn the twin's state so far
                    status.sync(self._r, [meter_id])
                return new
        raise Conflict(f"topology of {meter_id!r} changed too often while being updated; retry", meter_id=meter_id)

    def remove(self, meter_ids: list[str], *, actor: str) -> int:
        """Drop the topology documents (and index entries) of these meters; returns how many had one."""
        removed = 0
        status.forget(self._r, meter_ids)  # while the ordinals are still known
        for meter_id in meter_ids:
            for _attempt in range(8):
                raw = self._raw([meter_id])[0]
                if not raw or self._apply(meter_id, raw, _loads(raw), None, actor):
                    removed += bool(raw)
                    break
        return removed

    def history(self, meter_id: str, *, limit: int = 50, scan_max: int = 20_000) -> list[dict[str, Any]]:
        """The meter's latest topology changes, newest first, from the last ``scan_max`` audit entries."""
        out: list[dict[str, Any]] = []
        end, scanned = "+", 0
        while len(out) < limit and scanned < scan_max:
            batch = self._redis(self._r.xrevrange, keys.AUDIT, end, "-", count=1000)
            if not batch:
                break
            for entry_id, fields in batch:
                if fields.get("meter") == meter_id and len(out) < limit:
                    out.append({"id": entry_id, "at": float(fields.get("at", 0)), "actor": fields.get("actor"),
                                "old": _loads(fields.get("old")), "new": _loads(fields.get("new"))})
            scanned += len(batch)
            end = "(" + batch[-1][0]
        return out

    def changes_after(self, after: str, *, count: int = 1000) -> tuple[list[tuple[str, str, dict[str, Any] | None]],
                                                                      bool]:
        """Topology changes after audit stream id ``after`` (``"0"``: from the start), oldest first, as
        ``(id, meter, new document or None)``; and whether entries after ``after`` may have been trimmed
        away (then the caller resyncs from :meth:`documents`). The fog's copy of each meter's place
        follows the edge through this (:mod:`metertwin.grid.places`)."""
        start = "-" if after == "0" else f"({after}"
        batch = self._redis(self._r.xrange, keys.AUDIT, start, "+", count=count)
        first = self._redis(self._r.xrange, keys.AUDIT, "-", "+", count=1)
        gap = after != "0" and bool(first) and _stream_id(first[0][0]) > _stream_id(after)
        return [(entry_id, f.get("meter", ""), _loads(f.get("new"))) for entry_id, f in batch], gap

    def last_change(self) -> str:
        """The id of the newest audit entry (``"0"`` when none)."""
        last = self._redis(self._r.xrevrange, keys.AUDIT, "+", "-", count=1)
        return str(last[0][0]) if last else "0"

    def documents(self) -> Any:
        """Every (meter, document) of the zone, bucket by bucket (a resync)."""
        for key in self._r.scan_iter(match=f"{keys.DOC_PREFIX}*", count=1000):
            for value in self._redis(self._r.hvals, key):
                meter_id, _, raw = str(value).partition(" ")
                yield meter_id, _loads(raw)

    def index_members(self, key: str) -> set[str]:
        """The meter ids of an index set (whose members are ordinals): tests and tools."""
        out = set()
        for o in map(int, self._redis(self._r.smembers, key)):
            value = self._redis(self._r.hget, keys.doc_bucket(o), str(o % keys.DOC_BUCKET))
            if value:
                out.add(str(value).partition(" ")[0])
        return out

    def all_meters(self) -> list[str]:
        """Every meter id with a fleet record, in id order: tests and tools."""
        return [str(m).rpartition(" ")[0] for m in self._redis(self._r.zrange, keys.ALL_METERS, 0, -1)]

    def create_many(self, changes: dict[str, dict[str, Any]], *, actor: str, zone: str) -> dict[str, str]:
        """The fleet records of new twins ``{meter_id: topology changes}``, one pipelined round trip of
        the write script (bulk provisioning); returns ``{meter_id: error}`` for those not written (a
        record already there is left as it is, like :meth:`patch` on an unchanged document)."""
        docs = {m: merge({"zone": zone}, c) for m, c in changes.items()}
        at = round(time.time(), 3)
        try:
            pipe = self._r.pipeline(transaction=False)
            for m, doc in docs.items():
                ks, args = _write_args(m, "", None, {**doc, "v": 1, "at": at}, actor)
                self._write(keys=ks, args=args, client=pipe)
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable writing {len(docs)} fleet records: {exc}") from exc
        status.sync(self._r, list(docs))
        return {m: (f"{r}" if isinstance(r, Exception) else f"tree clash at {r[1]!r} (parent {r[2]!r})")
                for m, r in zip(docs, replies, strict=True) if isinstance(r, Exception) or r[0] == -2}

    def _apply(self, meter_id: str, raw: str, old: dict[str, Any] | None, new: dict[str, Any] | None,
               actor: str) -> bool:
        ks, args = _write_args(meter_id, raw, old, new, actor)
        try:
            reply = self._write(keys=ks, args=args)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable writing the topology of {meter_id!r}: {exc}") from exc
        if reply[0] == -2:
            field, known = str(reply[1]), str(reply[2])
            level, node = field.split(":", 1)
            parent = dict(TREE_LEVELS)[level]
            raise Conflict(f"{level} {node!r} belongs to {parent} {known!r} (other meters hang below it), "
                           f"not {parent} {new[parent]!r}" if new else field, field=parent, meter_id=meter_id)
        return bool(reply[0] == 1)

    @staticmethod
    def _redis(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc


def _write_args(meter_id: str, raw: str, old: dict[str, Any] | None, new: dict[str, Any] | None,
                actor: str) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the write script: ``raw`` (the stored document, ``""`` for none) -> ``new``."""
    old_keys, new_keys = index_keys(old), index_keys(new)
    tree = [(f"{child}:{new[child]}", str(new[parent]), keys.index(child, str(new[child])))
            for child, parent in TREE_LEVELS if new and new.get(child) and new.get(parent)]
    args: list[Any] = [keys.DOC_PREFIX, meter_id, raw, encode(new) if new else "", actor, repr(time.time()),
                       keys.AUDIT_MAXLEN, len(old_keys), len(new_keys), len(tree)]
    for field, parent, _key in tree:
        args += [field, parent]
    return [keys.ALL_METERS, keys.TREE, keys.AUDIT, keys.SEQ, *old_keys, *new_keys,
            *(key for *_x, key in tree)], args


_stores: dict[int, TopologyStore] = {}


def topology_store(client: StrRedis) -> TopologyStore:
    """The :class:`TopologyStore` of ``client``, built once (it registers its Lua script)."""
    store = _stores.get(id(client))
    if store is None or store._r is not client:
        store = _stores[id(client)] = TopologyStore(client)
    return store


def public(doc: dict[str, Any] | None) -> dict[str, Any]:
    """A document as routes show it: the attributes, without version and timestamp."""
    return {k: v for k, v in (doc or {}).items() if k not in ("v", "at")}


#: The stored document is a JSON array of these, in this order, trailing nulls cut: under half the
#: bytes of the keyed object (no names; ``location`` as ``[lat, lon]``).
ENCODED_FIELDS = ("v", "at", "zone", *TOPOLOGY_FIELDS)
_LOCATION = ENCODED_FIELDS.index("location")


def encode(doc: dict[str, Any]) -> str:
    """The stored form of a document (also what the audit stream's ``old``/``new`` hold)."""
    values: list[Any] = [doc.get(name) for name in ENCODED_FIELDS]
    loc = values[_LOCATION]
    if isinstance(loc, dict):
        values[_LOCATION] = [loc.get("lat"), loc.get("lon")]
    while values and values[-1] is None:
        values.pop()
    return json.dumps(values, separators=(",", ":"), sort_keys=True)


def decode(value: Any) -> dict[str, Any] | None:
    """A document from its stored form (an encoded array, or a JSON object as stored before)."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, list):
        return None
    doc = {name: v for name, v in zip(ENCODED_FIELDS, value, strict=False) if v is not None}
    loc = doc.get("location")
    if isinstance(loc, list) and len(loc) == 2:
        doc["location"] = {"lat": loc[0], "lon": loc[1]}
    return doc


def _loads(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        return decode(json.loads(raw))
    except ValueError:
        return None


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
