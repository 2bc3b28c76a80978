"""Twin state in the zone's Redis, modelled on device shadows.

One Redis hash per meter (``keys.twin``), kept small so a typical twin stays well
under 1 KB of Redis memory. Short field names because they are stored per twin:

====  =====================================================================
``v``  version, +1 on every change (optimistic concurrency, ``If-Match``)
``z``  edge zone serving the meter
``p``  meter profile (JSON)
``m``  last measurement (JSON :class:`~metertwin.twin.messages.Measurement`)
``s``  highest reading sequence number applied (QoS1 redelivery dedupe)
``r``  reported settings: JSON ``{field: [value, ts]}``
``d``  desired settings: JSON ``{field: [value, ts]}``
``c``  created at (epoch s)
====  =====================================================================

``delta`` is derived on read (desired fields whose reported value differs), so it
clears itself the moment the meter reports a matching value. Every update is one
Lua script: atomic, and one round trip.

Decoding never fails on a stored value: a field that does not parse (a ``1e+17`` sequence
number written before seqs were bounded, a truncated JSON document) reads as null/empty and
is named in ``Twin.corrupt`` (``metadata.corrupt`` in :meth:`Twin.to_dict`), so an admin can
always read and delete any twin.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import redis

from metertwin.core.clients import StrRedis
from metertwin.core.errors import BackendUnavailable, Conflict, InvalidInput, UnknownMeter, VersionMismatch
from metertwin.fleet import status as fleet_status
from metertwin.stream import events
from metertwin.twin import keys
from metertwin.twin.messages import MAX_SEQ, TimestampRule

# KEYS[1]=twin; ARGV: meter_id, zone, profile_json, now[, concentrator]. The zone's index
# (keys.TWIN_INDEX) is another slot on Redis Cluster, so TwinStore.create adds the id to it after
# this script. A concentrator (keys.ROUTE_FIELD) is set with the twin: it is born behind it.
CREATE_LUA = f"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', 1, 'z', ARGV[2], 'p', ARGV[3], 'r', '{{}}', 'd', '{{}}', 's', -1, 'c', ARGV[4])
if ARGV[5] and ARGV[5] ~= '' then redis.call('HSET', KEYS[1], '{keys.ROUTE_FIELD}', ARGV[5]) end
return 1
"""

# KEYS[1]=twin; ARGV: measurement_json, ts, seq (-1: none)
# Returns {status, version}: status 1 applied, 0 duplicate sequence, -1 unknown twin.
MEASURE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local seq = tonumber(ARGV[3])
if seq >= 0 then
  local last = tonumber(redis.call('HGET', KEYS[1], 's') or '-1')
  if seq <= last then return {0, tonumber(redis.call('HGET', KEYS[1], 'v'))} end
  redis.call('HSET', KEYS[1], 's', ARGV[3])  -- the caller's digits, never Lua's number formatting
end
local ts = tonumber(ARGV[2])
local cur = redis.call('HGET', KEYS[1], 'm')
-- A reading buffered while offline may arrive after a newer one: keep the newest.
if (not cur) or cjson.decode(cur)['ts'] <= ts then
  redis.call('HSET', KEYS[1], 'm', ARGV[1])
end
return {1, redis.call('HINCRBY', KEYS[1], 'v', 1)}
"""

# KEYS[1]=twin; ARGV: field ('r' or 'd'), values_json, ts, if_match (-1: any)
# Returns {status, version}: 1 ok, -1 unknown twin, -2 version mismatch.
MERGE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local version = tonumber(redis.call('HGET', KEYS[1], 'v'))
local if_match = tonumber(ARGV[4])
if if_match >= 0 and if_match ~= version then return {-2, version} end
local doc = cjson.decode(redis.call('HGET', KEYS[1], ARGV[1]) or '{}')
local ts = tonumber(ARGV[3])
for k, v in pairs(cjson.decode(ARGV[2])) do
  local old = doc[k]
  if v == cjson.null then
    doc[k] = nil
  elseif old == nil or old[2] <= ts then
    doc[k] = {v, ts}
  end
end
local enc = cjson.encode(doc)
if enc == '[]' then enc = '{}' end
redis.call('HSET', KEYS[1], ARGV[1], enc)
return {1, redis.call('HINCRBY', KEYS[1], 'v', 1)}
"""


@dataclass(frozen=True, slots=True)
class Twin:
    """A decoded twin document."""

    meter_id: str
    version: int
    zone: str
    profile: dict[str, Any]
    measurement: dict[str, Any] | None
    last_seq: int
    reported: dict[str, list[Any]]
    desired: dict[str, list[Any]]
    created_at: float
    #: Stored fields that did not decode (shown as null/empty); empty for a sound twin.
    corrupt: tuple[str, ...] = ()

    @property
    def delta(self) -> dict[str, Any]:
        """Desired values the meter has not reported yet."""
        out = {}
        for name, (value, _ts) in self.desired.items():
            rep = self.reported.get(name)
            if rep is None or rep[0] != value:
                out[name] = value
        return out

    def age_s(self, now: float | None = None) -> float | None:
        ts = (self.measurement or {}).get("ts")
        if not isinstance(ts, int | float):
            return None
        return max(0.0, (now if now is not None else time.time()) - float(ts))

    def to_dict(self) -> dict[str, Any]:
        return {
            "meter_id": self.meter_id,
            "version": self.version,
            "zone": self.zone,
            "profile": self.profile,
            "state": {
                "reported": {
                    **{k: v[0] for k, v in self.reported.items()},
                    **({"measurement": self.measurement} if self.measurement else {}),
                },
                "desired": {k: v[0] for k, v in self.desired.items()},
                "delta": self.delta,
            },
            "metadata": {
                "reported": {k: {"timestamp": v[1]} for k, v in self.reported.items()},
                "desired": {k: {"timestamp": v[1]} for k, v in self.desired.items()},
                "last_seq": None if "s" in self.corrupt else self.last_seq,
                "created_at": self.created_at,
                **({"corrupt": list(self.corrupt)} if self.corrupt else {}),
            },
        }


class TwinStore:
    """Atomic operations on twins in one zone's Redis."""

    def __init__(self, client: StrRedis) -> None:
        self._r = client
        self._create = client.register_script(CREATE_LUA)
        self._measure = client.register_script(MEASURE_LUA)
        self._merge = client.register_script(MERGE_LUA)

    def create(self, meter_id: str, zone: str, profile: dict[str, Any]) -> bool:
        """Create a twin; False if it already exists.

        The twin hash (one meter's slot) and the zone's index (its own slot) are two writes, the
        twin first: a crash between them leaves a twin missing from the index, never an indexed
        id without a twin. The index is written on "already exists" too (SADD is idempotent), so
        retrying the create repairs it; with :meth:`delete`'s order the index is always a subset
        of the twins.
        """
        now = time.time()
        done = self._call(self._create, [keys.twin(meter_id)], [meter_id, zone, _dumps(profile), repr(now)])
        try:
            self._r.sadd(keys.TWIN_INDEX, meter_id)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable indexing twin {meter_id!r}: {exc}") from exc
        return bool(done)

    def create_many(self, profiles: dict[str, dict[str, Any]], zone: str, concentrator: str = "") -> list[str]:
        """Create twins ``{meter_id: profile}`` (behind ``concentrator`` if given) with one pipelined round
        trip of :data:`CREATE_LUA`, then index them (same order and repair as :meth:`create`); returns the
        ids created (the others already had a twin)."""
        now = repr(time.time())
        ids = list(profiles)
        try:
            pipe = self._r.pipeline(transaction=False)
            for m in ids:
                self._create(keys=[keys.twin(m)], args=[m, zone, _dumps(profiles[m]), now, concentrator], client=pipe)
            done = pipe.execute()
            for start in range(0, len(ids), 1000):
                self._r.sadd(keys.TWIN_INDEX, *ids[start:start + 1000])
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable creating {len(ids)} twins: {exc}") from exc
        return [m for m, d in zip(ids, done, strict=True) if d]

    def get(self, meter_id: str) -> Twin:
        try:
            raw = self._r.hgetall(keys.twin(meter_id))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable reading twin {meter_id!r}: {exc}") from exc
        if not raw:
            raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)
        return _decode(meter_id, raw)

    def reading(self, meter_id: str) -> Reading:
        """Only version, last measurement and binding: the read capability's hot path, one HMGET."""
        try:
            fields = self._r.hmget(keys.twin(meter_id), READING_FIELDS)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable reading twin {meter_id!r}: {exc}") from exc
        return decode_reading(meter_id, fields)

    def exists(self, meter_id: str) -> bool:
        try:
            return bool(self._r.exists(keys.twin(meter_id)))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc

    def report_measurement(self, meter_id: str, measurement: dict[str, Any], seq: int | None) -> tuple[bool, int]:
        """Store a measurement; returns (applied, version). ``applied`` is False for a duplicate seq.

        A measurement dated beyond the clock-skew bound is refused (:class:`InvalidInput`): it
        would win over every later reading in the cache.
        """
        ts = measurement.get("ts")
        rule = TimestampRule.from_env()
        if not isinstance(ts, int | float) or not ts == ts or ts > time.time() + rule.clock_skew_s:
            raise InvalidInput(f"measurement ts {ts!r} of {meter_id!r} is not a time within the clock skew "
                               f"of {rule.clock_skew_s:.0f} s", field="ts", meter_id=meter_id)
        if seq is not None and not 0 <= seq <= MAX_SEQ:
            raise InvalidInput(f"seq {seq!r} is outside [0, {MAX_SEQ}]", field="seq", meter_id=meter_id)
        status, version = self._call(
            self._measure, [keys.twin(meter_id)],
            [_dumps(measurement), repr(float(measurement["ts"])), -1 if seq is None else seq],
        )
        if status == -1:
            raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)
        if status == 1:
            fleet_status.record_readings(self._r, [(meter_id, float(measurement["ts"]))])
        return status == 1, int(version)

    def report(self, meter_id: str, values: dict[str, Any], ts: float | None = None) -> int:
        """Merge reported settings (newer timestamps win); returns the new version."""
        return self._merge_doc(meter_id, "r", values, ts, None)

    def set_desired(self, meter_id: str, values: dict[str, Any], *, if_match: int | None = None) -> int:
        """Merge desired settings (``None`` removes a field); returns the new version."""
        return self._merge_doc(meter_id, "d", values, None, if_match)

    def delete(self, meter_id: str) -> bool:
        """Delete a twin; False if there was none.

        Index first, then the twin (two slots on Redis Cluster, so no MULTI): a crash between
        them leaves a live twin missing from the index, which the retried delete removes.
        """
        try:
            self._r.srem(keys.TWIN_INDEX, meter_id)
            removed = self._r.delete(keys.twin(meter_id))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        fleet_status.forget(self._r, [meter_id])
        return bool(removed)

    def _merge_doc(
        self, meter_id: str, field: str, values: dict[str, Any], ts: float | None, if_match: int | None
    ) -> int:
        stamp = ts if ts is not None else time.time()
        status, version = self._call(
            self._merge, [keys.twin(meter_id)],
            [field, _dumps(values), repr(stamp), -1 if if_match is None else if_match],
        )
        if status == -1:
            raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)
        if status == -2:
            raise VersionMismatch(
                f"If-Match version {if_match} does not match twin {meter_id!r} version {version}",
                meter_id=meter_id, current_version=version,
            )
        if field == "r" and "online" in values:  # the fleet's online index (metertwin.fleet.status)
            fleet_status.record_online(self._r, meter_id, values["online"] is True)
        events.twin_changed(self._r, meter_id, field, values, int(version))
        return int(version)

    @staticmethod
    def _call(script: Any, keys_: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=keys_, args=args)
        except redis.ResponseError as exc:
            raise Conflict(f"twin update failed: {exc}") from exc
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc


#: The hash fields :meth:`TwinStore.reading` fetches (``b``: the release the twin is bound to).
READING_FIELDS = ("v", "m", "b")


@dataclass(frozen=True, slots=True)
class Reading:
    version: int
    measurement: dict[str, Any] | None
    #: The release serving this twin; None for the base release.
    bound: str | None


def decode_reading(meter_id: str, fields: list[str | None]) -> Reading:
    """A :class:`Reading` from an ``HMGET v m b`` reply; a missing version means no twin.

    An undecodable version or measurement reads as 0 / None (see :func:`_decode`).
    """
    version, measurement, bound = fields
    if version is None:
        raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)
    bad: list[str] = []
    return Reading(_int(version, 0, "v", bad), _measurement(measurement, bad), bound)


async def reading_async(client: StrRedis, meter_id: str) -> Reading:
    """:meth:`TwinStore.reading` for an asyncio Redis client."""
    try:
        fields = await client.hmget(keys.twin(meter_id), READING_FIELDS)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable reading twin {meter_id!r}: {exc}") from exc
    return decode_reading(meter_id, fields)


_stores: dict[int, TwinStore] = {}


def twin_store(client: StrRedis) -> TwinStore:
    """The :class:`TwinStore` of ``client``, built once (it registers its Lua scripts)."""
    store = _stores.get(id(client))
    if store is None or store._r is not client:
        store = _stores[id(client)] = TwinStore(client)
    return store


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _decode(meter_id: str, raw: dict[str, str]) -> Twin:
    """Every field decoded on its own: one that does not parse is named in ``corrupt``, never raised."""
    bad: list[str] = []
    return Twin(
        meter_id=meter_id,
        version=_int(raw.get("v"), 0, "v", bad),
        zone=raw.get("z", ""),
        profile=_doc(raw.get("p"), "p", bad),
        measurement=_measurement(raw.get("m"), bad),
        last_seq=_int(raw.get("s"), -1, "s", bad),
        reported=_settings(raw.get("r"), "r", bad),
        desired=_settings(raw.get("d"), "d", bad),
        created_at=_float(raw.get("c"), "c", bad),
        corrupt=tuple(bad),
    )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(text: str, field: str, bad: list[str]) -> Any:
    try:
        # NaN/Infinity parse in Python but are not JSON: served, they would break every strict client.
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        bad.append(field)
        return None


def _int(text: str | None, default: int, field: str, bad: list[str]) -> int:
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        bad.append(field)
        return default


def _float(text: str | None, field: str, bad: list[str]) -> float:
    if text is None:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        bad.append(field)
        return 0.0
    if not math.isfinite(value):
        bad.append(field)
        return 0.0
    return value


def _doc(text: str | None, field: str, bad: list[str]) -> dict[str, Any]:
    if not text:
        return {}
    value = _json(text, field, bad)
    if isinstance(value, dict):
        return value
    if field not in bad:
        bad.append(field)
    return {}


def _measurement(text: str | None, bad: list[str]) -> dict[str, Any] | None:
    if not text:
        return None
    value = _doc(text, "m", bad)
    return value if "m" not in bad else None


def _settings(text: str | None, field: str, bad: list[str]) -> dict[str, list[Any]]:
    """``{name: [value, ts]}``; entries of another shape are dropped (and the field flagged)."""
    doc = _doc(text, field, bad)
    good = {k: v for k, v in doc.items() if isinstance(v, list) and len(v) == 2}
    if len(good) != len(doc) and field not in bad:
        bad.append(field)
    return good
