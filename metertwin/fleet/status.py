"""The live indexes: which twins are online, and when each last sent a reading.

``online`` and ``stale_s`` searches read two fleet keys instead of every candidate's twin:
:data:`~metertwin.fleet.keys.ONLINE` (a set of ordinals) and
:data:`~metertwin.fleet.keys.LAST_READING` (ordinal -> ts of the newest applied reading, kept with
``ZADD GT``, the twin's own "newest wins" rule). The twin is in its meter's slot and the index in
``{fleet-ix}``, so they cannot share one script: the writers update the index right after the twin
(one script call for a whole batch of readings). The index is therefore eventually consistent,
with these bounds:

* a status or reading is in the index one round trip after it is in the twin (a crash between the
  two leaves it out until that meter's next status or reading);
* readings parked for another release and applied by a drain reach the index with the meter's
  next reading;
* a status merge that loses to a newer stored timestamp still sets the index to the value it
  carried (statuses are stamped on arrival, so in practice they arrive in order);
* a twin that reported before its fleet record existed is copied into the index when the record
  is created (:func:`sync`).

A meter without a fleet record has no ordinal: its writes are no-ops here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis

from metertwin.core.clients import StrRedis
from metertwin.core.errors import BackendUnavailable
from metertwin.fleet import keys
from metertwin.twin import keys as twin_keys

# KEYS: 1 all meters, 2 online set, 3 last-reading zset
# ARGV: triples (op, meter, value): op 'o' online (value '1'/'0'), 'r' reading (value ts),
#       'n' no reading, 'x' forget (value ignored for both). Returns how many meters had an ordinal.
SET_LUA = """
local n = 0
for i = 1, #ARGV, 3 do
  local op, meter, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local hit = redis.call('ZRANGE', KEYS[1], '[' .. meter .. ' ', '(' .. meter .. '!', 'BYLEX', 'LIMIT', 0, 1)[1]
  if hit then
    local ord = string.sub(hit, #meter + 2)
    n = n + 1
    if op == 'r' then
      redis.call('ZADD', KEYS[3], 'GT', value, ord)
    elseif op == 'o' then
      if value == '1' then redis.call('SADD', KEYS[2], ord) else redis.call('SREM', KEYS[2], ord) end
    elseif op == 'n' then
      redis.call('ZREM', KEYS[3], ord)
    else
      redis.call('SREM', KEYS[2], ord)
      redis.call('ZREM', KEYS[3], ord)
    end
  end
end
return n
"""

_KEYS = [keys.ALL_METERS, keys.ONLINE, keys.LAST_READING]
_scripts: dict[int, Any] = {}


def _script(client: StrRedis) -> Any:
    s = _scripts.get(id(client))
    if s is None or s.registered_client is not client:
        s = _scripts[id(client)] = client.register_script(SET_LUA)
    return s


def _run(client: StrRedis, args: list[Any], what: str) -> int:
    if not args:
        return 0
    try:
        return int(_script(client)(keys=_KEYS, args=args))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable indexing {what}: {exc}") from exc


def record_online(client: StrRedis, meter_id: str, online: bool) -> int:
    """The twin's reported ``online`` is now ``online``."""
    return _run(client, ["o", meter_id, "1" if online else "0"], f"the status of {meter_id!r}")


def record_readings(client: StrRedis, readings: Iterable[tuple[str, float]]) -> int:
    """Applied readings ``(meter, ts)``: one script call for the batch."""
    args: list[Any] = []
    for meter_id, ts in readings:
        args += ["r", meter_id, repr(float(ts))]
    return _run(client, args, f"{len(args) // 3} readings")


def forget(client: StrRedis, meter_ids: Iterable[str]) -> int:
    """The twins are gone: out of both live indexes."""
    args: list[Any] = []
    for meter_id in meter_ids:
        args += ["x", meter_id, ""]
    return _run(client, args, "removed twins")


def sync_args(meter_id: str, reported: str | None, measurement: str | None) -> list[Any]:
    """SET_LUA triples copying a twin's stored ``r`` and ``m`` fields into the index."""
    def load(raw: str | None) -> Any:
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    rep = load(reported)
    online = rep.get("online") if isinstance(rep, dict) else None
    args: list[Any] = ["o", meter_id, "1" if isinstance(online, list) and online[:1] == [True] else "0"]
    m = load(measurement)
    ts = m.get("ts") if isinstance(m, dict) else None
    args += ["r", meter_id, repr(float(ts))] if isinstance(ts, int | float) else ["n", meter_id, ""]
    return args


def sync(client: StrRedis, meter_ids: list[str]) -> int:
    """Copy the twins' current status and last reading into the index (new fleet records)."""
    if not meter_ids:
        return 0
    try:
        pipe = client.pipeline(transaction=False)
        for m in meter_ids:
            pipe.hmget(twin_keys.twin(m), ("r", "m"))
        rows = pipe.execute()
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable reading {len(meter_ids)} twins: {exc}") from exc
    args: list[Any] = []
    for m, (reported, measurement) in zip(meter_ids, rows, strict=True):
        args += sync_args(m, reported, measurement)
    return _run(client, args, f"{len(meter_ids)} twins")
