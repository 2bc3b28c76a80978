"""Release v2 of the twin's measurement state: a changed schema beside the base twin hash.

The base release (v1) keeps the last measurement as one JSON field ``m`` of the twin hash,
registers in kWh as floats. Release v2 keeps (``keys.twin_v2``, a hash):

====  ===============================================================
``sv`` schema version (2)
``s``  highest reading sequence number applied (the dedupe itself is the twin's, shared by releases)
``ts`` timestamp of the newest measurement (epoch s)
``iwh`` / ``ewh``  import / export registers in whole Wh (integers)
``pw`` / ``vv``    power (W) and voltage (V)
``n``  readings applied by v2 since the migration
``mig`` when the state was migrated from v1 (epoch s)
====  ===============================================================

and the recent readings (``keys.twin_v2_history``, capped at ``TWIN_V2_HISTORY_MAX``, members
``seq|applied_at|json``; ``applied_at`` is empty for the reading carried over by the migration),
which v1 did not keep: the v2 read capability serves them (``GET /meters/{id}/readings``) with
when each was applied, which shows the ingest delay per reading.

Capabilities that v2 leaves unchanged (write, forward, demand response, P2P) still read the
base fields ``m`` and ``s``; v2's ingest keeps them current in the same script (expand and
contract: the base fields go only when no release in use reads them).
"""

from __future__ import annotations

import json
from typing import Any

import redis

from metertwin.core.clients import StrRedis
from metertwin.core.errors import BackendUnavailable, UnknownMeter
from metertwin.upgrade import keys
from metertwin.upgrade.inbox import IngestScript, ingest_script

RELEASE = "v2"
SCHEMA_VERSION = 2
FIELDS = ("sv", "s", "ts", "iwh", "ewh", "pw", "vv", "n", "mig")

#: ``v2_apply(twin, st, hist, mjson, ts, seq)``: 1 applied, 0 duplicate. Needs LUA_COMMON's v1_apply.
LUA_V2 = f"""
local function v2_fields(st, m)
  redis.call('HSET', st, 'ts', tostring(m['ts']),
    'iwh', string.format('%.0f', m['import_kwh'] * 1000),
    'ewh', string.format('%.0f', (m['export_kwh'] or 0) * 1000),
    'pw', tostring(m['power_w']), 'vv', tostring(m['voltage_v'] or 230))
end
local function v2_apply(twin, st, hist, mjson, ts, seq)
  if not fresh(twin, seq) then return 0 end
  if seq > tonumber(redis.call('HGET', st, 's') or '-1') then redis.call('HSET', st, 's', seq) end
  local cur = tonumber(redis.call('HGET', st, 'ts') or '0')
  if ts >= cur then v2_fields(st, cjson.decode(mjson)) end
  if seq >= 0 then
    redis.call('HINCRBY', st, 'n', 1)
    local now = redis.call('TIME')
    redis.call('ZADD', hist, seq, seq .. '|' .. now[1] .. '.' .. string.format('%06d', now[2]) .. '|' .. mjson)
    redis.call('ZREMRANGEBYRANK', hist, 0, -{keys.TWIN_V2_HISTORY_MAX + 1})
  end
  v1_measure(twin, mjson, ts)
  return 1
end
"""

V2_APPLY = LUA_V2 + """
local function apply(mjson, ts, seq) return v2_apply(KEYS[1], KEYS[4], KEYS[5], mjson, ts, seq) end
"""

_scripts: dict[int, IngestScript] = {}


def v2_ingest(client: StrRedis) -> IngestScript:
    """Release v2's ingest script (KEYS: twin, inbox, switch, v2 state, v2 history)."""
    script = _scripts.get(id(client))
    if script is None or script.client is not client:
        script = _scripts[id(client)] = IngestScript(
            client, RELEASE, ingest_script(RELEASE, V2_APPLY, 2), (keys.twin_v2, keys.twin_v2_history)
        )
    return script


def measurement_of(state: dict[str, Any]) -> dict[str, Any] | None:
    """The v2 state as a measurement document (registers in Wh and kWh)."""
    if not state.get("ts"):
        return None
    iwh, ewh = int(state.get("iwh") or 0), int(state.get("ewh") or 0)
    return {
        "ts": float(state["ts"]),
        "import_wh": iwh,
        "export_wh": ewh,
        "import_kwh": iwh / 1000.0,
        "export_kwh": ewh / 1000.0,
        "power_w": float(state.get("pw") or 0.0),
        "voltage_v": float(state.get("vv") or 0.0),
    }


def state(client: StrRedis, meter_id: str) -> dict[str, Any]:
    """The raw v2 state hash (empty if the meter was never migrated)."""
    try:
        values = client.hmget(keys.twin_v2(meter_id), FIELDS)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable reading twin {meter_id!r}: {exc}") from exc
    return {name: value for name, value in zip(FIELDS, values, strict=True) if value is not None}


def history(client: StrRedis, meter_id: str, *, since_seq: int = -1, limit: int = 96) -> list[dict[str, Any]]:
    """Recent readings (oldest first) with ``seq`` > ``since_seq``."""
    try:
        members = client.zrangebyscore(keys.twin_v2_history(meter_id), f"({since_seq}", "+inf", start=0, num=limit)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable reading history of {meter_id!r}: {exc}") from exc
    out = []
    for member in members:
        seq, applied_at, body = str(member).split("|", 2)
        out.append({"seq": int(seq), **json.loads(body),
                    "applied_at": float(applied_at) if applied_at else None})
    return out


def require_state(client: StrRedis, meter_id: str) -> dict[str, Any]:
    found = state(client, meter_id)
    if not found:
        raise UnknownMeter(f"meter {meter_id!r} has no release-v2 state in this zone", meter_id=meter_id)
    return found


def readings_applied(client: Any, meter_ids: list[str]) -> int:
    """Readings v2 applied to these twins since their migration (field ``n``): the canary's own traffic."""
    if not meter_ids:
        return 0
    pipe = client.pipeline(transaction=False)
    for meter_id in meter_ids:
        pipe.hget(keys.twin_v2(meter_id), "n")
    return sum(int(v) for v in pipe.execute() if v is not None and str(v).isdigit())
