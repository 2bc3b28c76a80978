"""Releases of the twin's capabilities, and the state migration of each release step.

A :class:`Release` names the function implementing each capability. A
:class:`Migration` (one per release step, e.g. ``v1 -> v2``) holds the Lua of the step,
every script idempotent and atomic per meter (all keys share the hash tag ``{meter_id}``):

* ``sync`` (Fig. 3, flows 4-5): build the new release's state from the old one. The old
  release stays authoritative until the flip, so the copy simply follows it; re-running
  it gives the same state.
* ``flip`` (flows 7-10, on the meter's rebind ack): the catch-up migration, then the
  readings parked in the meter's inbox applied with the new release, then the binding
  ``b`` set - in one script, so no reading can land in the old state after the copy.
* ``flip_back`` (rollback): the down-migration (newest of both states into the old
  schema), the inbox applied with the old release, the binding restored.
* ``destroy_new``: the abandoned new state of a rolled-back meter (flow 12 for a rollback).

Switch record fields used here (``keys.upgrade_switch``): ``op``, ``from``, ``to``,
``phase`` (prepared, synced, rebinding, switched, cancelled, rolled_back, done), ``rid``
(the rebind id the meter must ack), ``flip_seq``, ``switched_at``, ``back_at``, ``n:<release>``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis

from metertwin.core.clients import StrRedis
from metertwin.core.errors import BackendUnavailable, InvalidInput
from metertwin.twin import keys as twin_keys
from metertwin.upgrade import keys, twin_v2
from metertwin.upgrade.binding import DEFAULT_RELEASE
from metertwin.upgrade.inbox import LUA_COMMON


@dataclass(frozen=True, slots=True)
class Release:
    """A set of capability versions a twin can be bound to."""

    name: str
    base: str | None
    #: capability -> function name without the zone prefix
    functions: dict[str, str]
    description: str = ""

    def changed(self, releases: dict[str, Release]) -> dict[str, str]:
        """Capabilities whose function differs from the base release's (what a canary watches)."""
        if self.base is None:
            return dict(self.functions)
        base = releases[self.base].functions
        return {cap: fn for cap, fn in self.functions.items() if base.get(cap) != fn}

    def to_dict(self) -> dict[str, Any]:
        return {"release": self.name, "base": self.base, "functions": dict(self.functions),
                "description": self.description}


RELEASES: dict[str, Release] = {
    "v1": Release("v1", None, {"read": "read", "ingest": "ingest", "write": "write", "forward": "forward"},
                  "base release: last measurement as JSON in the twin hash"),
    "v2": Release("v2", "v1", {"read": "read-v2", "ingest": "ingest-v2", "write": "write", "forward": "forward"},
                  "registers in Wh, reading history (GET /meters/{id}/readings), applied counter"),
}


def release(name: str) -> Release:
    found = RELEASES.get(name)
    if found is None:
        raise InvalidInput(f"release {name!r} is unknown; known: {sorted(RELEASES)}", field="release")
    return found


def publish_manifests(client: StrRedis) -> None:
    """Write every known release's manifest (what :func:`metertwin.upgrade.binding.function_for` reads)."""
    try:
        pipe = client.pipeline(transaction=False)
        for rel in RELEASES.values():
            pipe.hset(keys.upgrade_release(rel.name), mapping=rel.functions)
        pipe.execute()
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable writing release manifests: {exc}") from exc


# --- v1 <-> v2 ------------------------------------------------------------------------------
_UP = """
local function migrate_up(twin, st, hist, now)
  local s = tonumber(redis.call('HGET', twin, 's') or '-1')
  local mj = redis.call('HGET', twin, 'm')
  -- Until the flip the old release is authoritative: the new state follows it exactly.
  redis.call('DEL', st, hist)
  redis.call('HSET', st, 'sv', 2, 's', s, 'n', 0, 'mig', now)
  if mj then
    v2_fields(st, cjson.decode(mj))
    if s >= 0 then redis.call('ZADD', hist, s, s .. '||' .. mj) end
  end
end
"""

_DOWN = """
local function migrate_down(twin, st)
  local f = redis.call('HMGET', st, 'ts', 'iwh', 'ewh', 'pw', 'vv', 's')
  if not f[1] then return end
  local cur = redis.call('HGET', twin, 'm')
  if (not cur) or cjson.decode(cur)['ts'] < tonumber(f[1]) then
    redis.call('HSET', twin, 'm', cjson.encode({ts = tonumber(f[1]), import_kwh = tonumber(f[2]) / 1000,
      export_kwh = tonumber(f[3]) / 1000, power_w = tonumber(f[4]), voltage_v = tonumber(f[5])}))
  end
  local s = tonumber(f[6] or '-1')
  if s > tonumber(redis.call('HGET', twin, 's') or '-1') then redis.call('HSET', twin, 's', s) end
end
"""

# KEYS: twin, switch, v2 state, v2 history; ARGV: op, now
_SYNC_V1_V2 = LUA_COMMON + twin_v2.LUA_V2 + _UP + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
if redis.call('HGET', KEYS[2], 'op') ~= ARGV[1] then return {0, 'other operation'} end
local phase = redis.call('HGET', KEYS[2], 'phase')
if phase ~= 'prepared' and phase ~= 'synced' then return {2, phase} end
migrate_up(KEYS[1], KEYS[3], KEYS[4], ARGV[2])
redis.call('HSET', KEYS[2], 'phase', 'synced')
return {1, 'synced'}
"""

# KEYS: twin, inbox, switch, v2 state, v2 history; ARGV: op, rid ('' = no ack needed), now
_FLIP_V1_V2 = LUA_COMMON + twin_v2.LUA_V2 + _UP + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local sw = redis.call('HMGET', KEYS[3], 'op', 'rid', 'phase')
if sw[1] ~= ARGV[1] then return {0, 'other operation'} end
if ARGV[2] ~= '' and sw[2] ~= ARGV[2] then return {0, 'stale rebind id'} end
if (redis.call('HGET', KEYS[1], 'b') or 'v1') == 'v2' then return {2, sw[3]} end
if sw[3] ~= 'synced' and sw[3] ~= 'rebinding' then return {0, sw[3]} end
migrate_up(KEYS[1], KEYS[4], KEYS[5], ARGV[3])
local flip_seq = tonumber(redis.call('HGET', KEYS[1], 's') or '-1')
local n = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local pseq, pjson = parked(member)
  n = n + v2_apply(KEYS[1], KEYS[4], KEYS[5], pjson, cjson.decode(pjson)['ts'], pseq)
end
redis.call('DEL', KEYS[2])
if n > 0 then redis.call('HINCRBY', KEYS[3], 'n:v2', n) end
redis.call('HSET', KEYS[1], 'b', 'v2')
redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HSET', KEYS[3], 'phase', 'switched', 'flip_seq', flip_seq, 'switched_at', ARGV[3])
return {1, 'switched'}
"""

# KEYS: twin, inbox, switch, v2 state, v2 history; ARGV: op, now, from, to
_FLIP_V2_V1 = LUA_COMMON + _DOWN + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local owner = redis.call('HGET', KEYS[3], 'op')
if owner and owner ~= ARGV[1] then return {0, 'other operation'} end
if not owner then redis.call('HSET', KEYS[3], 'op', ARGV[1], 'from', ARGV[3], 'to', ARGV[4]) end
if (redis.call('HGET', KEYS[1], 'b') or 'v1') == 'v1' then
  redis.call('HSET', KEYS[3], 'phase', 'rolled_back')
  return {2, 'rolled_back'}
end
migrate_down(KEYS[1], KEYS[4])
local n = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local pseq, pjson = parked(member)
  n = n + v1_apply(KEYS[1], pjson, cjson.decode(pjson)['ts'], pseq)
end
redis.call('DEL', KEYS[2])
if n > 0 then redis.call('HINCRBY', KEYS[3], 'n:v1', n) end
redis.call('HDEL', KEYS[1], 'b')
redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HSET', KEYS[3], 'phase', 'rolled_back', 'back_at', ARGV[2],
  'back_seq', tonumber(redis.call('HGET', KEYS[1], 's') or '-1'))
return {1, 'rolled_back'}
"""


@dataclass
class Migration:
    """The scripts of one release step, registered on one Redis client."""

    source: str
    target: str
    client: StrRedis
    _scripts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.source, self.target) != ("v1", "v2"):
            raise InvalidInput(f"no migration from release {self.source!r} to {self.target!r}; known: v1 -> v2")
        self._scripts = {
            "sync": self.client.register_script(_SYNC_V1_V2),
            "flip": self.client.register_script(_FLIP_V1_V2),
            "flip_back": self.client.register_script(_FLIP_V2_V1),
        }

    @staticmethod
    def _keys(meter_id: str) -> list[str]:
        return [twin_keys.twin(meter_id), keys.upgrade_inbox(meter_id), keys.upgrade_switch(meter_id),
                keys.twin_v2(meter_id), keys.twin_v2_history(meter_id)]

    def sync_call(self, pipe: Any, meter_id: str, op_id: str) -> None:
        """Queue the sync of one meter on ``pipe`` (result: ``[status, phase]``)."""
        ks = self._keys(meter_id)
        self._scripts["sync"](keys=[ks[0], ks[2], ks[3], ks[4]], args=[op_id, repr(time.time())], client=pipe)

    def flip(self, meter_id: str, op_id: str, rebind_id: str = "", pipe: Any = None) -> Any:
        """Switch the meter to the target release (``rebind_id`` must match the switch record's)."""
        return self._run("flip", meter_id, [op_id, rebind_id, repr(time.time())], pipe)

    def flip_back(self, meter_id: str, op_id: str, pipe: Any = None) -> Any:
        """Restore the source release, migrating the target's state back."""
        return self._run("flip_back", meter_id, [op_id, repr(time.time()), self.source, self.target], pipe)

    def destroy_new_state(self, pipe: Any, meter_id: str) -> None:
        pipe.delete(keys.twin_v2(meter_id), keys.twin_v2_history(meter_id))

    def _run(self, name: str, meter_id: str, args: list[Any], pipe: Any) -> Any:
        try:
            return self._scripts[name](keys=self._keys(meter_id), args=args, client=pipe or self.client)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable during {name} of {meter_id!r}: {exc}") from exc


_migrations: dict[tuple[int, str, str], Migration] = {}


def migration(client: StrRedis, source: str, target: str) -> Migration:
    """The :class:`Migration` ``source -> target`` (either direction of a known step) for ``client``."""
    step = (source, target) if (source, target) in {("v1", "v2")} else None
    if step is None:
        if (target, source) == ("v1", "v2"):
            raise InvalidInput(f"release {target!r} is older than {source!r}: roll the upgrade back instead")
        raise InvalidInput(f"no migration from release {source!r} to {target!r}; known: v1 -> v2")
    found = _migrations.get((id(client), source, target))
    if found is None or found.client is not client:
        found = _migrations[(id(client), source, target)] = Migration(source, target, client)
    return found


__all__ = ["DEFAULT_RELEASE", "RELEASES", "Migration", "Release", "migration", "publish_manifests", "release"]
