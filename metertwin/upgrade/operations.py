"""Upgrade operations: move a selection of twins from one release to another, after seed 000's Fig. 3.

Per meter (every step idempotent; the truth is the meter's switch record, ``keys.upgrade_switch``):

1. **prepare** (flows 2-3): a switch record ``{op, from, to, rid, s0}``; the meter stays bound
   to ``from`` and keeps being served by it.
2. **sync** (flows 4-5): the state migration ``from -> to`` (:mod:`metertwin.upgrade.migrations`).
3. **rebind** (flow 6): a :class:`~metertwin.twin.messages.Control` ``rebind`` on the meter's control
   channel, ``params.id = rid``; re-sent with backoff until the meter answers.
4. **flip** (flows 7-10): on the meter's ack (``meters/<id>/up/ack``, ``id == rid``), one Lua
   script runs the catch-up migration, applies the readings parked meanwhile and binds the
   twin to ``to``. Readings are applied by exactly one release each (see :mod:`metertwin.upgrade.binding`).
5. **drain and remove** (flows 11-12): ``drain_s`` after the flip the switch record is folded
   into the operation's counters (readings applied by each release during the switch, and
   the ones missing, which must be 0) and removed.

An operation selects meters (a list, a stable-hash percentage, a zone, or all), runs a
canary wave, waits in ``observing`` for a promote (or promotes itself when
``auto_promote`` and the health verdict from the gateway's metrics is ``ok``), then the rest
in batches. Rollback works from any state, completed included: never-switched meters are
cancelled, switched ones flipped back (down-migration) and told to rebind to ``from``.

Everything an operation knows is in Redis (``keys.upgrade_op*``), so any manager instance
resumes it after a crash at any step: :meth:`UpgradeManager.advance` does a bounded amount
of work under a per-operation lock and returns. The manager function calls it from its
cron and from ``POST /operations/{id}/advance`` (what the CLI's ``follow`` does).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import redis
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, model_validator

from metertwin.core import topics
from metertwin.core.clients import StrRedis, get_http, get_mqtt
from metertwin.core.errors import BackendUnavailable, Conflict, InvalidInput, MeterTwinError, NotFound
from metertwin.core.http import METER_ID_RE
from metertwin.twin import keys as twin_keys
from metertwin.twin.messages import CommandAck
from metertwin.upgrade import keys
from metertwin.upgrade.binding import DEFAULT_RELEASE, binding_settings
from metertwin.upgrade.health import FunctionStats, Thresholds, Verdict, judge, parse_metrics
from metertwin.upgrade.migrations import RELEASES, migration, publish_manifests, release

log = logging.getLogger("metertwin.upgrade")

#: States of an operation. ``paused`` remembers the state to resume in ``resume_to``.
ACTIVE = ("planning", "canary", "observing", "rolling_out", "paused", "rolling_back")
TERMINAL = ("completed", "rolled_back")
#: Per-meter index sets of an operation, in pipeline order.
FORWARD_SETS = ("queued", "admitted", "prepared", "synced", "rebinding", "switched")
END_SETS = ("done", "skipped", "failed")
ROLLBACK_SETS = ("rb_confirming", "rolled_back")
ALL_SETS = FORWARD_SETS + END_SETS + ROLLBACK_SETS
IN_FLIGHT = ("admitted", "prepared", "synced", "rebinding", "switched")
#: Switch-record phases of another operation that a new one may take over.
RELEASED_PHASES = ("done", "cancelled", "confirmed", "rejected")
REBIND_PREFIX = "rb."
#: Seconds between full passes over the meters waiting for their rebind ack.
RECONCILE_EVERY_S = 1.0
MAX_FAILURE_DETAILS = 200


#: (meter id, from set, to set, why) for :meth:`UpgradeManager._move`.
Move = tuple[str, str, str, str | None]


class InjectedCrash(BaseException):
    """Raised at a crash point (tests): like a process dying, nothing after it runs."""


# --- operator input -------------------------------------------------------------------------
class Selector(BaseModel):
    """Exactly one of: ``meters`` (ids), ``percent`` (stable hash of the id), ``zone``, ``all``."""

    model_config = ConfigDict(extra="forbid")

    meters: list[str] | None = Field(default=None, min_length=1, max_length=100_000)
    percent: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    zone: str | None = Field(default=None, min_length=1, max_length=64)
    all: bool = False

    @model_validator(mode="after")
    def _one(self) -> Selector:
        chosen = [n for n in ("meters", "percent", "zone") if getattr(self, n) is not None] + (
            ["all"] if self.all else [])
        if len(chosen) != 1:
            raise ValueError(f"select meters with exactly one of meters, percent, zone, all (got {chosen or 'none'})")
        for meter_id in self.meters or []:
            if not METER_ID_RE.match(meter_id):
                raise ValueError(f"meter id {meter_id!r} is not valid")
        return self


class OperationSpec(BaseModel):
    """``POST /operations``: what to upgrade, how fast, and what counts as healthy."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    to: str = Field(min_length=1, max_length=32)
    source: str = Field(default=DEFAULT_RELEASE, alias="from", min_length=1, max_length=32)
    select: Selector
    #: First wave: a count, or a percentage of the selection (the larger wins); 0: no canary.
    canary: int = Field(default=0, ge=0, le=100_000)
    canary_percent: float = Field(default=0.0, ge=0, le=100, allow_inf_nan=False)
    batch: int = Field(default=500, ge=1, le=10_000)
    max_in_flight: int = Field(default=5_000, ge=1, le=100_000)
    #: Rebind messages per second at most. Every rebind comes back as an ack that the gateway's
    #: MQTT connector handles in the same queue as the readings: an unpaced burst of thousands
    #: of acks would delay the readings behind them by seconds.
    rebind_rate_per_s: float = Field(default=250.0, gt=0, le=100_000, allow_inf_nan=False)
    drain_s: float = Field(default=5.0, ge=0, le=3600, allow_inf_nan=False)
    rebind_ttl_s: int = Field(default=600, ge=1, le=7 * 86_400)
    resend_after_s: float = Field(default=10.0, ge=0.1, le=3600, allow_inf_nan=False)
    max_attempts: int = Field(default=5, ge=1, le=1000)
    #: More failed meters than this pauses the operation.
    max_failed: int = Field(default=10, ge=0)
    auto_promote: bool = False
    observe_s: float = Field(default=60.0, ge=0, le=7 * 86_400, allow_inf_nan=False)
    #: Roll back by itself when the canary's health verdict is ``bad`` (with auto_promote).
    auto_rollback: bool = True
    max_error_rate: float = Field(default=0.01, ge=0, le=1, allow_inf_nan=False)
    max_p95_ratio: float = Field(default=1.5, ge=1, le=100, allow_inf_nan=False)
    latency_slack_ms: float = Field(default=50.0, ge=0, le=60_000, allow_inf_nan=False)
    min_calls: int = Field(default=20, ge=0)
    metrics_url: str | None = Field(default=None, max_length=500)
    note: str | None = Field(default=None, max_length=500)

    def thresholds(self) -> Thresholds:
        return Thresholds(self.max_error_rate, self.max_p95_ratio, self.latency_slack_ms, self.min_calls)


@dataclass(frozen=True)
class Operation:
    """An operation as stored: spec, state and counters."""

    id: str
    spec: OperationSpec
    raw: dict[str, str]

    @property
    def state(self) -> str:
        return self.raw.get("state", "planning")

    def num(self, name: str, default: float = 0.0) -> float:
        value = self.raw.get(name)
        return float(value) if value not in (None, "") else default

    @property
    def rid(self) -> str:
        return f"{REBIND_PREFIX}{self.id}.{self.spec.to}"

    @property
    def back_rid(self) -> str:
        return f"{REBIND_PREFIX}{self.id}.{self.spec.source}"


def stable_bucket(meter_id: str) -> float:
    """A meter's place in [0, 100): the same in every run and on every machine."""
    return int(hashlib.sha1(meter_id.encode()).hexdigest()[:8], 16) % 10_000 / 100.0


# --- Lua on the meter's slot -------------------------------------------------------------------
# KEYS: twin, switch; ARGV: op, from, to, rid, now, released phases (comma list)
_PREPARE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 'the twin no longer exists'} end
local sw = redis.call('HMGET', KEYS[2], 'op', 'phase')
if sw[1] == ARGV[1] then return {2, sw[2]} end
if sw[1] then
  local released = false
  for p in string.gmatch(ARGV[6], '[^,]+') do if p == sw[2] then released = true end end
  if not released then return {0, 'in operation ' .. sw[1] .. ' (' .. tostring(sw[2]) .. ')'} end
end
local bound = redis.call('HGET', KEYS[1], 'b') or 'v1'
if bound == ARGV[3] then return {3, 'already bound to ' .. bound} end
if bound ~= ARGV[2] then return {0, 'bound to ' .. bound .. ', not ' .. ARGV[2]} end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'op', ARGV[1], 'from', ARGV[2], 'to', ARGV[3], 'phase', 'prepared', 'rid', ARGV[4],
  'created_at', ARGV[5], 's0', redis.call('HGET', KEYS[1], 's') or '-1', 'attempts', 0)
return {1, 'prepared'}
"""

# KEYS: switch; ARGV: op, now. After the rebind went out: synced -> rebinding (never backwards).
_SENT = """
local sw = redis.call('HMGET', KEYS[1], 'op', 'phase')
if sw[1] ~= ARGV[1] then return 0 end
if sw[2] == 'synced' then redis.call('HSET', KEYS[1], 'phase', 'rebinding') end
redis.call('HSET', KEYS[1], 'sent_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return 1
"""

# KEYS: switch; ARGV: op, rebind id, ack status (applied|rejected), reason, now
_ACK_BACK = """
local sw = redis.call('HMGET', KEYS[1], 'op', 'phase', 'rrid')
if sw[1] ~= ARGV[1] or sw[3] ~= ARGV[2] then return 0 end
if sw[2] == 'rolled_back' or sw[2] == 'cancelled' then
  redis.call('HSET', KEYS[1], 'phase', 'confirmed', 'confirmed_at', ARGV[5])
  return 1
end
return 0
"""

# KEYS: switch; ARGV: op, rebind id, reason, now. The meter refused the rebind: it stays on ``from``.
_REJECT = """
local sw = redis.call('HMGET', KEYS[1], 'op', 'phase', 'rid')
if sw[1] ~= ARGV[1] or sw[3] ~= ARGV[2] then return 0 end
if sw[2] ~= 'synced' and sw[2] ~= 'rebinding' then return 0 end
redis.call('HSET', KEYS[1], 'phase', 'rejected', 'reason', ARGV[3], 'rejected_at', ARGV[4])
return 1
"""

# KEYS: switch, twin; ARGV: op. Switched -> done; returns the switch's counters (idempotent).
_FINISH = """
local sw = redis.call('HMGET', KEYS[1], 'op', 'phase', 'from', 'to', 's0', 'flip_seq')
if sw[1] ~= ARGV[1] then return {0, 0, 0, 0, 0} end
if sw[2] ~= 'switched' and sw[2] ~= 'done' then return {0, 0, 0, 0, 0} end
redis.call('HSET', KEYS[1], 'phase', 'done')
local s_now = tonumber(redis.call('HGET', KEYS[1 + 1], 's') or '-1')
return {1, tonumber(redis.call('HGET', KEYS[1], 'n:' .. sw[3]) or '0'),
  tonumber(redis.call('HGET', KEYS[1], 'n:' .. sw[4]) or '0'), tonumber(sw[5] or '-1'), s_now}
"""

# KEYS: switch, twin, new state, new history; ARGV: op.
# Rollback of a meter not switched yet: forget the new state; returns the phase it was in.
_CANCEL = """
local sw = redis.call('HMGET', KEYS[1], 'op', 'phase')
if sw[1] ~= ARGV[1] then return {2, 'untouched'} end
local phase = sw[2]
if phase == 'prepared' or phase == 'synced' or phase == 'rebinding' or phase == 'rejected' then
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('HSET', KEYS[1], 'phase', 'cancelled')
  return {1, phase}
end
if phase == 'switched' or phase == 'done' then return {3, phase} end
return {2, phase}
"""

# KEYS: switch; ARGV: op, expected phases (comma list). Delete the record if it is still ours.
_FORGET = """
local sw = redis.call('HMGET', KEYS[1], 'op', 'phase')
if sw[1] ~= ARGV[1] then return 0 end
for p in string.gmatch(ARGV[2], '[^,]+') do
  if p == sw[2] then redis.call('DEL', KEYS[1]) return 1 end
end
return 0
"""

# KEYS: switch, new state, new history; ARGV: op. A rolled-back meter confirmed: drop the abandoned state.
_DESTROY_ABANDONED = """
local sw = redis.call('HMGET', KEYS[1], 'op', 'phase')
if sw[1] ~= ARGV[1] then return 0 end
if sw[2] ~= 'confirmed' and sw[2] ~= 'rolled_back' and sw[2] ~= 'cancelled' then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[1])
return 1
"""

# --- Lua on the operation's slot ------------------------------------------------------------
# KEYS: queued, admitted, op; ARGV: n. Moves up to n meters into the pipeline, atomically.
_ADMIT = """
local ids = redis.call('SPOP', KEYS[1], tonumber(ARGV[1]))
for _, id in ipairs(ids) do redis.call('SADD', KEYS[2], id) end
if #ids > 0 then redis.call('HINCRBY', KEYS[3], 'admitted', #ids) end
return #ids
"""

# KEYS: switched, done, op; ARGV: meter, readings by from, by to, missing. Count once per meter.
_COUNT_DONE = """
if redis.call('SMOVE', KEYS[1], KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[3], 'readings_old', ARGV[2])
redis.call('HINCRBY', KEYS[3], 'readings_new', ARGV[3])
redis.call('HINCRBY', KEYS[3], 'readings_missing', ARGV[4])
return 1
"""

# KEYS: lock; ARGV: owner, ttl. Take (or keep) the lock.
_LOCK = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class UpgradeManager:
    """Start, advance, pause, promote and roll back upgrade operations of one zone.

    ``crash_at`` names crash points (see :data:`CRASH_POINTS`) at which :class:`InjectedCrash`
    is raised, as if the process died there (tests). ``instance`` names this manager: a
    restarted manager with the same name takes over its own lock at once.
    """

    CRASH_POINTS = (
        "planned", "admitted", "prepared", "synced", "rebind_half_sent", "rebind_sent", "reconciled",
        "finished", "counted", "cancelled", "flipped_back", "back_rebind_sent",
    )

    def __init__(
        self,
        client: StrRedis,
        *,
        instance: str | None = None,
        crash_at: Iterable[str] = (),
        publish: Callable[[str, dict[str, Any], int], None] | None = None,
        metrics: Callable[[str], str] | None = None,
    ) -> None:
        self.r = client
        self.instance = instance or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.crash_at = set(crash_at)
        unknown = self.crash_at - set(self.CRASH_POINTS)
        if unknown:
            raise ValueError(f"unknown crash point(s) {sorted(unknown)}; known: {self.CRASH_POINTS}")
        self._publish = publish or _mqtt_publish
        self._fetch_metrics = metrics or _fetch_metrics
        s = client.register_script
        self._prepare, self._sent, self._ack_back, self._reject = s(_PREPARE), s(_SENT), s(_ACK_BACK), s(_REJECT)
        self._finish, self._cancel, self._forget = s(_FINISH), s(_CANCEL), s(_FORGET)
        self._destroy_abandoned = s(_DESTROY_ABANDONED)
        self._admit, self._count_done = s(_ADMIT), s(_COUNT_DONE)
        self._lock, self._unlock = s(_LOCK), s(_UNLOCK)
        self._guard = threading.Lock()
        self._op_locks: dict[str, threading.Lock] = {}

    def _crash(self, point: str) -> None:
        if point in self.crash_at:
            raise InjectedCrash(point)

    # ------------------------------------------------------------------ reading
    def get(self, op_id: str) -> Operation:
        raw = self._call(lambda: self.r.hgetall(keys.upgrade_op(op_id)))
        if not raw:
            raise NotFound(f"upgrade operation {op_id!r} not found", op_id=op_id)
        return Operation(op_id, OperationSpec.model_validate_json(raw["spec"]), raw)

    def list_ops(self, limit: int = 50) -> list[dict[str, Any]]:
        ids = self._call(lambda: self.r.zrevrange(keys.UPGRADE_OPS, 0, max(0, limit - 1)))
        out = []
        for op_id in ids:
            try:
                out.append(self.status(op_id, health=False))
            except NotFound:
                continue
        return out

    def active(self) -> list[str]:
        """Ids of operations not in a terminal state."""
        ids = self._call(lambda: self.r.zrange(keys.UPGRADE_OPS, 0, -1))
        pipe = self.r.pipeline(transaction=False)
        for op_id in ids:
            pipe.hget(keys.upgrade_op(op_id), "state")
        states = self._call(pipe.execute)
        return [op_id for op_id, state in zip(ids, states, strict=True) if state in ACTIVE]

    def counts(self, op_id: str) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for name in ALL_SETS:
            pipe.scard(keys.upgrade_op_set(op_id, name))
        return dict(zip(ALL_SETS, self._call(pipe.execute), strict=True))

    def status(self, op_id: str, *, health: bool = True) -> dict[str, Any]:
        """Everything an operator wants to see: state, progress, readings, blockers, health."""
        op = self.get(op_id)
        counts = self.counts(op_id)
        selected = int(op.num("selected"))
        finished = counts["done"] + counts["skipped"] + counts["failed"]
        started = op.num("started_at") or op.num("created_at")
        elapsed = max(1e-9, (op.num("completed_at") or time.time()) - started)
        rate = counts["done"] / elapsed if counts["done"] else 0.0
        remaining = max(0, selected - finished)
        body: dict[str, Any] = {
            "id": op.id, "state": op.state, "from": op.spec.source, "to": op.spec.to,
            "spec": op.spec.model_dump(by_alias=True, exclude_none=True),
            "created_at": op.num("created_at"), "updated_at": op.num("updated_at"),
            "completed_at": op.num("completed_at") or None,
            "progress": {
                "selected": selected, "canary": int(op.num("canary_size")), "admitted": int(op.num("admitted")),
                **counts, "percent_done": round(100.0 * finished / selected, 2) if selected else 0.0,
                "rate_per_s": round(rate, 2), "eta_s": round(remaining / rate, 1) if rate else None,
                "unconfirmed": int(op.num("unconfirmed")),
            },
            "readings": {
                "applied_by_old": int(op.num("readings_old")), "applied_by_new": int(op.num("readings_new")),
                "missing": int(op.num("readings_missing")),
            },
            "blockers": self.blockers(op, counts),
        }
        if op.raw.get("reason"):
            body["reason"] = op.raw["reason"]
        if op.raw.get("resume_to"):
            body["resume_to"] = op.raw["resume_to"]
        failures = self._call(lambda: self.r.hgetall(keys.upgrade_op_set(op_id, "failures")))
        if failures:
            body["failures"] = dict(sorted(failures.items())[:MAX_FAILURE_DETAILS])
        if health and op.raw.get("metrics_snapshot"):
            try:
                body["health"] = self.health(op).to_dict()
            except MeterTwinError as exc:
                body["health"] = {"status": "unknown", "reasons": [exc.message]}
        return body

    def blockers(self, op: Operation, counts: dict[str, int]) -> list[str]:
        """Why the operation is not moving on, in words an operator can act on."""
        out: list[str] = []
        state = op.state
        if state == "paused":
            out.append(f"paused ({op.raw.get('reason') or 'by the operator'}); resume to continue "
                       f"({op.raw.get('resume_to')})")
        if state == "observing":
            out.append(f"canary of {int(op.num('canary_size'))} meters done: promote to continue, or roll back"
                       + (" (auto-promote after the health check)" if op.spec.auto_promote else ""))
        unconfirmed = int(op.num("unconfirmed"))
        if unconfirmed and state not in TERMINAL:
            out.append(f"{unconfirmed} meters have not confirmed the rebind after {op.spec.max_attempts} attempts: "
                       f"still served by {op.spec.source}, re-sent with backoff")
        if counts["failed"]:
            out.append(f"{counts['failed']} meters failed (see failures); they stay on their release")
        if counts["rb_confirming"]:
            out.append(f"{counts['rb_confirming']} rolled-back meters have not confirmed the rebind to "
                       f"{op.spec.source} yet (they are served by {op.spec.source} already)")
        if state in ("canary", "rolling_out") and counts["rebinding"] and not unconfirmed:
            out.append(f"{counts['rebinding']} meters: waiting for their rebind ack")
        return out

    # ------------------------------------------------------------------ starting
    def start(self, spec: OperationSpec) -> dict[str, Any]:
        """Create an operation (state ``planning``); :meth:`advance` selects and moves the meters."""
        release(spec.to)
        release(spec.source)
        if spec.to == spec.source:
            raise InvalidInput(f"from and to are both {spec.to!r}: nothing to upgrade", field="to")
        migration(self.r, spec.source, spec.to)  # raises if there is no such step
        for other in self.active():
            state = self._hget_op(other, "state")
            raise Conflict(f"upgrade operation {other} is {state}: complete or roll it back before starting another",
                           blocking_op=other, state=state)
        publish_manifests(self.r)
        op_id = secrets.token_hex(6)
        now = time.time()
        record = {"id": op_id, "spec": spec.model_dump_json(by_alias=True), "state": "planning",
                  "created_at": repr(now), "updated_at": repr(now), "plan_cursor": "0", "admitted": "0"}
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.upgrade_op(op_id), mapping=record)
        pipe.zadd(keys.UPGRADE_OPS, {op_id: now})
        self._call(pipe.execute)
        return self.status(op_id, health=False)

    def _plan(self, op: Operation) -> bool:
        """One planning step (selection into ``queued``); True when planning is over."""
        sel = op.spec.select
        queued = keys.upgrade_op_set(op.id, "queued")
        if sel.meters is not None:
            pipe = self.r.pipeline(transaction=True)
            for start in range(0, len(sel.meters), 5000):
                pipe.sadd(queued, *sel.meters[start:start + 5000])
            pipe.hset(keys.upgrade_op(op.id), "plan_cursor", "done")
            self._call(pipe.execute)
            return True
        cursor = int(op.raw.get("plan_cursor") or 0)
        cursor, ids = self._call(lambda: self.r.sscan(twin_keys.TWIN_INDEX, cursor=cursor, count=5000))
        ids = list(ids)
        if sel.percent is not None:
            ids = [m for m in ids if stable_bucket(m) < sel.percent]
        elif sel.zone is not None:
            pipe = self.r.pipeline(transaction=False)
            for meter_id in ids:
                pipe.hget(twin_keys.twin(meter_id), "z")
            zones = self._call(pipe.execute)
            ids = [m for m, z in zip(ids, zones, strict=True) if z == sel.zone]
        pipe = self.r.pipeline(transaction=True)
        if ids:
            pipe.sadd(queued, *ids)
        pipe.hset(keys.upgrade_op(op.id), "plan_cursor", "done" if cursor == 0 else str(cursor))
        self._call(pipe.execute)
        return bool(cursor == 0)

    def _planned(self, op: Operation) -> None:
        selected = self._call(lambda: self.r.scard(keys.upgrade_op_set(op.id, "queued")))
        canary = min(selected, max(op.spec.canary, math.ceil(selected * op.spec.canary_percent / 100.0)))
        state = "canary" if canary else "rolling_out"
        self._set(op.id, state=state, selected=selected, canary_size=canary, started_at=repr(time.time()))
        if canary:
            self._snapshot_metrics(op)
        self._crash("planned")

    # ------------------------------------------------------------------ advancing
    def advance(self, op_id: str, budget_s: float = 2.0) -> dict[str, Any]:
        """Do up to ``budget_s`` of work on the operation; returns its status (``busy`` if locked).

        One advancer per operation: across processes the Redis lock (a restarted manager of
        the same ``instance`` takes its own lock back at once), within a process a thread lock
        (the cron and an operator's ``advance`` may arrive together).
        """
        with self._guard:
            local = self._op_locks.setdefault(op_id, threading.Lock())
        if not local.acquire(blocking=False):
            status = self.status(op_id, health=False)
            status["busy"] = True
            return status
        try:
            return self._advance_locked(op_id, budget_s)
        finally:
            local.release()

    def _advance_locked(self, op_id: str, budget_s: float) -> dict[str, Any]:
        if not self._call(lambda: self._lock(keys=[keys.upgrade_op_lock(op_id)],
                                             args=[self.instance, keys.UPGRADE_OP_LOCK_TTL_S])):
            status = self.status(op_id, health=False)
            status["busy"] = True
            return status
        try:
            deadline = time.monotonic() + budget_s
            while time.monotonic() < deadline:
                self._lock(keys=[keys.upgrade_op_lock(op_id)], args=[self.instance, keys.UPGRADE_OP_LOCK_TTL_S])
                if not self._step(self.get(op_id)):
                    break
        finally:
            self._call(lambda: self._unlock(keys=[keys.upgrade_op_lock(op_id)], args=[self.instance]))
        return self.status(op_id, health=False)

    def run(self, op_id: str, timeout_s: float = 300.0, poll_s: float = 0.2,
            until: tuple[str, ...] = ("observing", *TERMINAL, "paused")) -> dict[str, Any]:
        """Advance until the state is one of ``until`` (and nothing is in flight) or the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.advance(op_id, budget_s=min(2.0, max(0.1, deadline - time.monotonic())))
            counts = status["progress"]
            idle = not any(counts[s] for s in IN_FLIGHT) and not counts["rb_confirming"]
            waiting = status["state"] == "paused" or (status["state"] == "observing"
                                                        and not status["spec"].get("auto_promote"))
            if status["state"] in until and (idle or waiting):
                return status
            if time.monotonic() > deadline:
                return status
            time.sleep(poll_s)

    def _step(self, op: Operation) -> bool:
        """One round of work; False when nothing more can be done now."""
        state = op.state
        if state == "planning":
            if self._plan(op):
                self._planned(op)
            return True
        if state == "rolling_back":
            return self._rollback_step(op)
        progressed = False
        if state in ("canary", "rolling_out", "observing", "paused"):
            progressed |= self._reconcile(op)
            progressed |= self._finish_switched(op)
        if state in ("canary", "rolling_out"):
            progressed |= self._admit_more(op)
            progressed |= self._prepare_step(op)
            progressed |= self._sync_step(op)
            progressed |= self._rebind_step(op)
            progressed |= self._stage(self.get(op.id))
        elif state == "observing":
            progressed |= self._observe(op)
        if state in TERMINAL:
            progressed |= self._confirm_back(op)
        return progressed

    def _members(self, op_id: str, name: str, limit: int) -> list[str]:
        key = keys.upgrade_op_set(op_id, name)
        if limit <= 0:
            return []
        found = self._call(lambda: self.r.srandmember(key, limit))
        return list(found or [])

    def _admit_more(self, op: Operation) -> bool:
        counts = self.counts(op.id)
        in_flight = sum(counts[s] for s in IN_FLIGHT)
        room = op.spec.max_in_flight - in_flight
        if op.state == "canary":
            room = min(room, int(op.num("canary_size")) - int(op.num("admitted")))
        n = min(room, op.spec.batch)
        if n <= 0 or not counts["queued"]:
            return False
        moved = self._call(lambda: self._admit(
            keys=[keys.upgrade_op_set(op.id, "queued"), keys.upgrade_op_set(op.id, "admitted"),
                  keys.upgrade_op(op.id)], args=[n]))
        self._crash("admitted")
        return bool(moved)

    def _prepare_step(self, op: Operation) -> bool:
        ids = self._members(op.id, "admitted", op.spec.batch)
        if not ids:
            return False
        pipe = self.r.pipeline(transaction=False)
        now = repr(time.time())
        for meter_id in ids:
            self._prepare(keys=[twin_keys.twin(meter_id), keys.upgrade_switch(meter_id)],
                          args=[op.id, op.spec.source, op.spec.to, op.rid, now, ",".join(RELEASED_PHASES)],
                          client=pipe)
        results = self._call(pipe.execute)
        self._crash("prepared")
        moves: list[Move] = []
        for meter_id, (code, why) in zip(ids, results, strict=True):
            if code in (1, 2):
                moves.append((meter_id, "admitted", "prepared", None))
            elif code == 3:
                moves.append((meter_id, "admitted", "skipped", str(why)))
            else:
                moves.append((meter_id, "admitted", "failed", str(why)))
        self._move(op.id, moves)
        return True

    def _sync_step(self, op: Operation) -> bool:
        ids = self._members(op.id, "prepared", op.spec.batch)
        if not ids:
            return False
        mig = migration(self.r, op.spec.source, op.spec.to)
        pipe = self.r.pipeline(transaction=False)
        for meter_id in ids:
            mig.sync_call(pipe, meter_id, op.id)
        results = self._call(pipe.execute)
        self._crash("synced")
        moves: list[Move] = []
        for meter_id, (code, why) in zip(ids, results, strict=True):
            if code == 1 or (code == 2 and why in ("synced", "rebinding", "switched", "done")):
                moves.append((meter_id, "prepared", "synced", None))
            else:
                moves.append((meter_id, "prepared", "failed", f"sync: {why or 'the twin no longer exists'}"))
        self._move(op.id, moves)
        return True

    def _paced(self, op: Operation, wanted: int) -> int:
        """How many rebinds may go now (``rebind_rate_per_s``, a token bucket of one second in the op)."""
        now = time.time()
        last = op.num("rebind_clock", now - 1.0)
        allowed = int(min(1.0, max(0.0, now - last)) * op.spec.rebind_rate_per_s)
        n = min(wanted, allowed)
        if n > 0:
            # Advance the clock by what was spent, so that the rate holds across steps.
            self._set(op.id, rebind_clock=repr(max(last, now - 1.0) + n / op.spec.rebind_rate_per_s))
        return n

    def _rebind_step(self, op: Operation) -> bool:
        if not self._call(lambda: self.r.scard(keys.upgrade_op_set(op.id, "synced"))):
            return False
        ids = self._members(op.id, "synced", self._paced(op, op.spec.batch))
        if not ids:
            return False
        half = len(ids) // 2
        sent: list[str] = []
        for chunk_no, chunk in enumerate((ids[:half], ids[half:])):
            for meter_id, error in self._send_rebinds(op, chunk, op.spec.to, op.rid):
                if error is None:
                    sent.append(meter_id)
                else:
                    log.warning("rebind of %s not sent: %s (retried next round)", meter_id, error)
            if chunk_no == 0:
                self._crash("rebind_half_sent")
        pipe = self.r.pipeline(transaction=False)
        now = repr(time.time())
        for meter_id in sent:
            self._sent(keys=[keys.upgrade_switch(meter_id)], args=[op.id, now], client=pipe)
        self._call(pipe.execute)
        self._crash("rebind_sent")
        self._move(op.id, [(m, "synced", "rebinding", None) for m in sent])
        return bool(sent)

    def _send_rebinds(self, op: Operation, ids: list[str], version: str,
                      rid: str) -> list[tuple[str, str | None]]:
        if not ids:
            return []

        def one(meter_id: str) -> tuple[str, str | None]:
            payload = {"action": "rebind", "params": {"id": rid, "version": version, "op": op.id}}
            try:
                self._publish(meter_id, payload, op.spec.rebind_ttl_s)
            except MeterTwinError as exc:
                return meter_id, exc.message
            return meter_id, None

        if len(ids) < 8:
            return [one(m) for m in ids]
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="rebind") as pool:
            return list(pool.map(one, ids))

    def _reconcile(self, op: Operation) -> bool:
        """Rebinding meters: move the flipped ones on, re-send overdue rebinds, collect refusals.

        The ack handler moves a flipped meter on by itself, so this full pass (a read of every
        rebinding meter's switch record) runs at most every :data:`RECONCILE_EVERY_S`.
        """
        now = time.time()
        if now - op.num("reconciled_at") < min(RECONCILE_EVERY_S, op.spec.resend_after_s / 2):
            return False
        self._set(op.id, reconciled_at=repr(now))
        key = keys.upgrade_op_set(op.id, "rebinding")
        ids = list(self._call(lambda: self.r.smembers(key)))
        if not ids:
            if op.num("unconfirmed"):
                self._set(op.id, unconfirmed=0)
            return False
        progressed = False
        unconfirmed = 0
        moves: list[Move] = []
        resend: list[str] = []
        for start in range(0, len(ids), 2000):
            chunk = ids[start:start + 2000]
            pipe = self.r.pipeline(transaction=False)
            for meter_id in chunk:
                pipe.hmget(keys.upgrade_switch(meter_id), ("op", "phase", "sent_at", "attempts", "reason"))
            for meter_id, (owner, phase, sent_at, attempts, reason) in zip(chunk, self._call(pipe.execute),
                                                                            strict=True):
                if owner != op.id:
                    moves.append((meter_id, "rebinding", "failed", "switch record taken over or lost"))
                elif phase in ("switched", "done"):
                    moves.append((meter_id, "rebinding", "switched", None))
                elif phase == "rejected":
                    moves.append((meter_id, "rebinding", "failed", f"the meter refused the rebind: {reason}"))
                elif phase in ("rebinding", "synced"):
                    tries = int(attempts or 0)
                    if tries >= op.spec.max_attempts:
                        unconfirmed += 1
                    delay = min(300.0, op.spec.resend_after_s * 2 ** min(max(0, tries - 1), 10))
                    if now - float(sent_at or 0) >= delay:
                        resend.append(meter_id)
        for meter_id, _, dest, _ in moves:
            if dest == "failed":
                self._cleanup_failed(op, meter_id)
        self._move(op.id, moves)
        if resend and op.state != "paused":
            resend = resend[:self._paced(op, len(resend))]
            sent = [m for m, err in self._send_rebinds(op, resend, op.spec.to, op.rid) if err is None]
            pipe = self.r.pipeline(transaction=False)
            stamp = repr(time.time())
            for meter_id in sent:
                self._sent(keys=[keys.upgrade_switch(meter_id)], args=[op.id, stamp], client=pipe)
            self._call(pipe.execute)
            progressed |= bool(sent)
        if unconfirmed != int(op.num("unconfirmed")):
            self._set(op.id, unconfirmed=unconfirmed)
        self._crash("reconciled")
        return progressed or bool(moves)

    def _cleanup_failed(self, op: Operation, meter_id: str) -> None:
        """A meter that will not switch: drop the new state we built for it (it stays on ``from``)."""
        pipe = self.r.pipeline(transaction=False)
        self._cancel(keys=[keys.upgrade_switch(meter_id), twin_keys.twin(meter_id), keys.twin_v2(meter_id),
                           keys.twin_v2_history(meter_id)], args=[op.id], client=pipe)
        self._forget(keys=[keys.upgrade_switch(meter_id)], args=[op.id, "cancelled"], client=pipe)
        self._call(pipe.execute)

    def _finish_switched(self, op: Operation) -> bool:
        """Switched meters past the drain time: fold their counters into the operation, forget the switch."""
        ids = self._members(op.id, "switched", max(op.spec.batch, 2000))
        if not ids:
            return False
        pipe = self.r.pipeline(transaction=False)
        for meter_id in ids:
            pipe.hmget(keys.upgrade_switch(meter_id), ("op", "phase", "switched_at"))
        now = time.time()
        due: list[str] = []
        gone: list[str] = []
        for meter_id, (owner, phase, at) in zip(ids, self._call(pipe.execute), strict=True):
            if owner is None:
                gone.append(meter_id)  # counted and forgotten already (a crash came between)
            elif owner == op.id and (phase == "done" or (phase == "switched"
                                                          and now - float(at or now) >= op.spec.drain_s)):
                due.append(meter_id)
        if gone:
            self._move(op.id, [(m, "switched", "done", None) for m in gone])
        if not due:
            return bool(gone)
        pipe = self.r.pipeline(transaction=False)
        for meter_id in due:
            self._finish(keys=[keys.upgrade_switch(meter_id), twin_keys.twin(meter_id)], args=[op.id], client=pipe)
        results = self._call(pipe.execute)
        self._crash("finished")
        pipe = self.r.pipeline(transaction=False)
        for meter_id, (ok, n_old, n_new, s0, s_now) in zip(due, results, strict=True):
            if not ok:
                continue
            missing = (int(s_now) - int(s0)) - (int(n_old) + int(n_new))
            self._count_done(keys=[keys.upgrade_op_set(op.id, "switched"), keys.upgrade_op_set(op.id, "done"),
                                   keys.upgrade_op(op.id)],
                             args=[meter_id, int(n_old), int(n_new), missing], client=pipe)
        self._call(pipe.execute)
        self._crash("counted")
        pipe = self.r.pipeline(transaction=False)
        for meter_id in due:
            self._forget(keys=[keys.upgrade_switch(meter_id)], args=[op.id, "done"], client=pipe)
        self._call(pipe.execute)
        return True

    def _forget_done(self, op: Operation) -> None:
        """Switch records still there for finished meters (a crash between counting and forgetting)."""
        cursor = 0
        while True:
            try:
                cursor, ids = self.r.sscan(keys.upgrade_op_set(op.id, "done"), cursor, count=2000)
            except redis.RedisError as exc:
                raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
            pipe = self.r.pipeline(transaction=False)
            for meter_id in ids:
                self._forget(keys=[keys.upgrade_switch(meter_id)], args=[op.id, "done"], client=pipe)
            self._call(pipe.execute)
            if cursor == 0:
                return

    def _stage(self, op: Operation) -> bool:
        """Canary finished -> observing; everything finished -> completed; too many failures -> paused."""
        counts = self.counts(op.id)
        if counts["failed"] > op.spec.max_failed:
            self._set(op.id, state="paused", resume_to=op.state,
                      reason=f"{counts['failed']} meters failed (more than max_failed={op.spec.max_failed})")
            return False
        in_flight = sum(counts[s] for s in IN_FLIGHT)
        if in_flight:
            return False
        if op.state == "canary" and int(op.num("admitted")) >= int(op.num("canary_size")):
            self._set(op.id, state="observing", observe_since=repr(time.time()))
            return True
        if op.state == "rolling_out" and not counts["queued"]:
            self._forget_done(op)
            self._set(op.id, state="completed", completed_at=repr(time.time()))
            return True
        return False

    def _observe(self, op: Operation) -> bool:
        if not op.spec.auto_promote or time.time() - op.num("observe_since") < op.spec.observe_s:
            return False
        verdict = self.health(op)
        if verdict.status == "ok":
            self._set(op.id, state="rolling_out", promoted_by="auto", promoted_at=repr(time.time()))
            return True
        if verdict.status == "bad" and op.spec.auto_rollback:
            self._begin_rollback(op, "auto rollback: " + "; ".join(verdict.reasons))
            return True
        return False

    # ------------------------------------------------------------------ operator actions
    def pause(self, op_id: str, reason: str | None = None) -> dict[str, Any]:
        op = self.get(op_id)
        if op.state not in ("planning", "canary", "observing", "rolling_out"):
            raise Conflict(f"operation {op_id} is {op.state}: only a planning, canary, observing or rolling_out "
                           "operation can be paused", state=op.state)
        self._set(op_id, state="paused", resume_to=op.state, reason=reason or "paused by the operator")
        return self.status(op_id, health=False)

    def resume(self, op_id: str) -> dict[str, Any]:
        op = self.get(op_id)
        if op.state != "paused":
            raise Conflict(f"operation {op_id} is {op.state}, not paused", state=op.state)
        failed = self.counts(op_id)["failed"]
        update: dict[str, Any] = {"state": op.raw.get("resume_to") or "rolling_out", "reason": "", "resume_to": ""}
        if failed > op.spec.max_failed:
            # Resuming accepts the failures so far: the limit counts from here.
            spec = op.spec.model_copy(update={"max_failed": failed + op.spec.max_failed})
            update["spec"] = spec.model_dump_json(by_alias=True)
        self._set(op_id, **update)
        return self.status(op_id, health=False)

    def promote(self, op_id: str, *, force: bool = False) -> dict[str, Any]:
        """Canary -> rollout. Refused while the canary runs, or when its health is bad (unless ``force``)."""
        op = self.get(op_id)
        if op.state == "canary":
            counts = self.counts(op_id)
            left = int(op.num("canary_size")) - int(op.num("admitted")) + sum(counts[s] for s in IN_FLIGHT)
            raise Conflict(f"the canary of operation {op_id} is still running ({left} of "
                           f"{int(op.num('canary_size'))} meters not switched yet): promote once it is observing",
                           state=op.state)
        if op.state != "observing" and not (op.state == "paused" and op.raw.get("resume_to") == "observing"):
            raise Conflict(f"operation {op_id} is {op.state}: only an observing canary can be promoted", state=op.state)
        verdict = self.health(op) if op.raw.get("metrics_snapshot") else None
        if verdict is not None and verdict.status == "bad" and not force:
            raise Conflict("promote blocked by the canary's health: " + "; ".join(verdict.reasons)
                           + " (roll back, or promote with force)", health=verdict.to_dict())
        self._set(op_id, state="rolling_out", promoted_at=repr(time.time()), promoted_by="operator",
                  resume_to="", reason="")
        return self.status(op_id)

    def rollback(self, op_id: str, reason: str | None = None) -> dict[str, Any]:
        """Restore the old binding for every meter the operation touched (from any state)."""
        op = self.get(op_id)
        if op.state in ("rolling_back", "rolled_back"):
            raise Conflict(f"operation {op_id} is already {op.state}", state=op.state)
        for other in self.active():
            if other != op_id:
                raise Conflict(f"operation {other} is active: roll back {op_id} once it is over", blocking_op=other)
        self._begin_rollback(op, reason or "rolled back by the operator")
        return self.status(op_id, health=False)

    def _begin_rollback(self, op: Operation, reason: str) -> None:
        self._set(op.id, state="rolling_back", reason=reason, rollback_started_at=repr(time.time()), resume_to="")

    # ------------------------------------------------------------------ rollback
    def _rollback_step(self, op: Operation) -> bool:
        mig = migration(self.r, op.spec.source, op.spec.to)
        progressed = False
        # Not switched yet: cancel (the new state goes; a meter that may have seen the rebind is told back).
        for name in ("admitted", "prepared", "synced", "rebinding"):
            ids = self._members(op.id, name, op.spec.batch)
            if not ids:
                continue
            pipe = self.r.pipeline(transaction=False)
            for meter_id in ids:
                self._cancel(keys=[keys.upgrade_switch(meter_id), twin_keys.twin(meter_id), keys.twin_v2(meter_id),
                                   keys.twin_v2_history(meter_id)], args=[op.id], client=pipe)
            results = self._call(pipe.execute)
            self._crash("cancelled")
            moves: list[Move] = []
            pipe = self.r.pipeline(transaction=False)
            for meter_id, (code, was) in zip(ids, results, strict=True):
                if code == 3:
                    moves.append((meter_id, name, "switched", None))  # flipped meanwhile: flip back below
                elif was in ("rebinding", "rejected") or (name == "rebinding" and was == "cancelled"):
                    moves.append((meter_id, name, "rb_confirming", None))  # it may have rebound: tell it back
                else:
                    # The meter never heard of the switch: nothing to tell it, nothing to keep.
                    self._forget(keys=[keys.upgrade_switch(meter_id)], args=[op.id, "cancelled"], client=pipe)
                    moves.append((meter_id, name, "rolled_back", None))
            self._call(pipe.execute)
            self._move(op.id, moves)
            progressed = True
        # Switched (or done): flip back now; the meter is told to rebind and confirms later.
        for name in ("switched", "done"):
            ids = self._members(op.id, name, op.spec.batch)
            if not ids:
                continue
            pipe = self.r.pipeline(transaction=False)
            for meter_id in ids:
                mig.flip_back(meter_id, op.id, pipe=pipe)
            results = self._call(pipe.execute)
            self._crash("flipped_back")
            moves = []
            for meter_id, (code, why) in zip(ids, results, strict=True):
                if code in (1, 2):
                    moves.append((meter_id, name, "rb_confirming", None))
                else:
                    moves.append((meter_id, name, "failed", f"rollback: {why}"))
            pipe = self.r.pipeline(transaction=False)
            for meter_id, _, dest, _ in moves:
                if dest == "rb_confirming":
                    pipe.hset(keys.upgrade_switch(meter_id), mapping={"rrid": op.back_rid, "sent_at": "0",
                                                                      "attempts": "0"})
            self._call(pipe.execute)
            self._move(op.id, moves)
            progressed = True
        progressed |= self._confirm_back(op)
        counts = self.counts(op.id)
        if not any(counts[s] for s in IN_FLIGHT) and not counts["done"]:
            self._set(op.id, state="rolled_back", completed_at=repr(time.time()))
            return True
        return progressed

    def _confirm_back(self, op: Operation) -> bool:
        """Rolled-back meters: (re-)send the rebind to ``from``; forget them once they confirmed."""
        key = keys.upgrade_op_set(op.id, "rb_confirming")
        ids = list(self._call(lambda: self.r.smembers(key)))
        if not ids:
            return False
        pipe = self.r.pipeline(transaction=False)
        for meter_id in ids:
            pipe.hmget(keys.upgrade_switch(meter_id), ("op", "phase", "rrid", "sent_at", "attempts", "back_at",
                                                       "created_at"))
        now = time.time()
        resend: list[str] = []
        confirmed: list[str] = []
        moves: list[Move] = []
        for meter_id, (owner, phase, rrid, sent_at, attempts, back_at, _c) in zip(ids, self._call(pipe.execute),
                                                                                  strict=True):
            if owner != op.id:
                moves.append((meter_id, "rb_confirming", "rolled_back", None))
            elif phase == "confirmed" and now - float(back_at or 0) >= op.spec.drain_s:
                confirmed.append(meter_id)
            elif phase in ("rolled_back", "cancelled"):
                if rrid != op.back_rid:
                    self.r.hset(keys.upgrade_switch(meter_id), mapping={"rrid": op.back_rid, "sent_at": "0",
                                                                        "attempts": "0"})
                tries = int(attempts or 0)
                delay = 0.0 if tries == 0 else min(300.0, op.spec.resend_after_s * 2 ** min(tries - 1, 10))
                if now - float(sent_at or 0) >= delay:
                    resend.append(meter_id)
        resend = resend[:self._paced(op, len(resend))] if resend else resend
        if resend:
            sent = [m for m, err in self._send_rebinds(op, resend, op.spec.source, op.back_rid) if err is None]
            pipe = self.r.pipeline(transaction=False)
            stamp = repr(time.time())
            for meter_id in sent:
                pipe.hset(keys.upgrade_switch(meter_id), "sent_at", stamp)
                pipe.hincrby(keys.upgrade_switch(meter_id), "attempts", 1)
            self._call(pipe.execute)
            self._crash("back_rebind_sent")
        if confirmed:
            pipe = self.r.pipeline(transaction=False)
            for meter_id in confirmed:
                self._destroy_abandoned(keys=[keys.upgrade_switch(meter_id), keys.twin_v2(meter_id),
                                              keys.twin_v2_history(meter_id)], args=[op.id], client=pipe)
            self._call(pipe.execute)
            moves += [(m, "rb_confirming", "rolled_back", None) for m in confirmed]
        self._move(op.id, moves)
        return bool(resend or confirmed or moves)

    # ------------------------------------------------------------------ the meter's ack
    def on_ack(self, meter_id: str, ack: CommandAck) -> str:
        """A meter's ack on ``meters/<id>/up/ack``: flip on a rebind ack; returns what happened."""
        parts = ack.id.split(".")
        if len(parts) != 3 or parts[0] + "." != REBIND_PREFIX:
            return "not a rebind"
        _, op_id, version = parts
        raw = self._call(lambda: self.r.hmget(keys.upgrade_switch(meter_id), ("op", "from", "to", "phase")))
        owner, source, target, phase = raw
        if owner != op_id:
            return "stale: the meter is not switching in this operation"
        if version == target:
            if ack.status != "applied":
                done = self._reject(keys=[keys.upgrade_switch(meter_id)],
                                    args=[op_id, ack.id, (ack.reason or "no reason given")[:300], repr(time.time())])
                return "rejected" if done else f"ignored ({phase})"
            code, why = migration(self.r, source, target).flip(meter_id, op_id, ack.id)
            if code == 1:
                self._call(lambda: self.r.smove(keys.upgrade_op_set(op_id, "rebinding"),
                                                keys.upgrade_op_set(op_id, "switched"), meter_id))
                return "switched"
            return "already switched" if code == 2 else f"ignored ({why})"
        if version == source:
            done = self._ack_back(keys=[keys.upgrade_switch(meter_id)],
                                  args=[op_id, ack.id, ack.status, ack.reason or "", repr(time.time())])
            return "confirmed" if done else f"ignored ({phase})"
        return f"ignored (release {version!r} is not part of operation {op_id})"

    # ------------------------------------------------------------------ health
    def _snapshot_metrics(self, op: Operation) -> None:
        url = self.metrics_url(op)
        if url is None:
            return
        try:
            stats = parse_metrics(self._fetch_metrics(url))
        except MeterTwinError as exc:
            log.warning("no metrics snapshot for operation %s: %s", op.id, exc.message)
            return
        snap = {name: s.to_dict() for name, s in stats.items()}
        self._set(op.id, metrics_snapshot=json.dumps(snap), metrics_url=url)

    def metrics_url(self, op: Operation) -> str | None:
        if op.spec.metrics_url:
            return op.spec.metrics_url
        if op.raw.get("metrics_url"):
            return op.raw["metrics_url"]
        base = binding_settings().gateway_url
        return f"{base}/metrics" if base else None

    def health(self, op: Operation) -> Verdict:
        """The canary's verdict: the new release's functions against the old one's, since the canary began."""
        url = self.metrics_url(op)
        if url is None:
            return Verdict("insufficient", ["no metrics source: set GATEWAY_URL or metrics_url"], {}, {})
        before = {name: FunctionStats.from_dict(d) for name, d in json.loads(op.raw.get("metrics_snapshot")
                                                                             or "{}").items()}
        now = parse_metrics(self._fetch_metrics(url))
        zone_prefix = _zone_prefix()
        target = release(op.spec.to)
        changed = target.changed(RELEASES)
        source = release(op.spec.source).functions
        candidate = [zone_prefix + fn for fn in changed.values()]
        baseline = [zone_prefix + source[cap] for cap in changed if cap in source]
        return judge(before, now, candidate, baseline, op.spec.thresholds())

    # ------------------------------------------------------------------ plumbing
    def _hget_op(self, op_id: str, name: str) -> str | None:
        try:
            value = self.r.hget(keys.upgrade_op(op_id), name)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        return None if value is None else str(value)

    def _move(self, op_id: str, moves: list[Move]) -> None:
        if not moves:
            return
        pipe = self.r.pipeline(transaction=False)
        for meter_id, src, dst, why in moves:
            pipe.smove(keys.upgrade_op_set(op_id, src), keys.upgrade_op_set(op_id, dst), meter_id)
            if dst == "failed" and why:
                pipe.hset(keys.upgrade_op_set(op_id, "failures"), meter_id, why[:300])
            elif dst == "skipped" and why:
                pipe.hset(keys.upgrade_op_set(op_id, "skips"), meter_id, why[:300])
        self._call(pipe.execute)

    def _set(self, op_id: str, **fields: Any) -> None:
        values = {k: ("" if v is None else str(v)) for k, v in fields.items()}
        values["updated_at"] = repr(time.time())
        self._call(lambda: self.r.hset(keys.upgrade_op(op_id), mapping=values))

    @staticmethod
    def _call(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc

    # ------------------------------------------------------------------ sweeping
    def sweep(self, budget_s: float = 5.0) -> dict[str, Any]:
        """The cron entry point: advance every active operation (and pending confirmations)."""
        deadline = time.monotonic() + budget_s
        advanced = {}
        ids = self._call(lambda: self.r.zrevrange(keys.UPGRADE_OPS, 0, 20))
        for op_id in ids:
            if time.monotonic() > deadline:
                break
            state = self._hget_op(op_id, "state")
            pending = self._call(lambda: self.r.scard(keys.upgrade_op_set(op_id, "rb_confirming")))  # noqa: B023
            if state in ACTIVE or pending:
                left = max(0.1, deadline - time.monotonic())
                advanced[op_id] = self.advance(op_id, budget_s=min(2.0, left))["state"]
        return {"advanced": advanced}


Publish = Callable[[str, dict[str, Any], int], None]


def _mqtt_publish(meter_id: str, payload: dict[str, Any], ttl_s: int) -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = ttl_s
    get_mqtt().publish(topics.control(meter_id), payload, timeout_s=5.0, properties=props)


def _fetch_metrics(url: str) -> str:
    try:
        resp = get_http().get(url, timeout=5.0)
    except httpx.HTTPError as exc:
        raise BackendUnavailable(f"cannot read metrics from {url}: {exc}") from exc
    if resp.status_code != 200:
        raise BackendUnavailable(f"metrics at {url} answered {resp.status_code}")
    return resp.text


def _zone_prefix() -> str:
    from metertwin.core.settings import get_settings

    return f"{get_settings().zone}-"


__all__ = ["InjectedCrash", "Operation", "OperationSpec", "Selector", "UpgradeManager", "stable_bucket"]
