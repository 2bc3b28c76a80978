"""Upgrade operations: move a selection of twins from one release to another, after seed 000's Fig. 3.

Per meter (every step idempotent; the truth is the meter's switch record, ``keys.upgrade_switch``):

1. **prepare** (flows 2-3): a switch record ``{op, from, to, rid, s0}``; the meter stays bound
   to ``from`` and keeps being served by it.
2. **sync** (flows 4-5): the state migration ``from -> to`` (:mod:`metertwin.upgrade.migrations`).
3. **rebind** (flow 6): a :class:`~metertwin.twin.messages.Control` ``rebind`` on the meter's control
   channel, ``params.id = rid``; re-sent with backoff until the meter answers.
4. **flip** (flows 7-10): on the meter's ack (``meters/<id>/up/ack``, ``id == rid``), one Lua
   script runs the catch-up migration, applies the readings parked meanwhile and binds the
   twin to ``to``. Readings are applied by exactly one release each (see :mod:`metertwin.upgrade.inbox`).
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

This module is the lifecycle (start, advance, pause, promote, rollback, the meter's ack);
the steps are in :mod:`~metertwin.upgrade.switch` (1-4), :mod:`~metertwin.upgrade.drain` (5)
and :mod:`~metertwin.upgrade.rollback`, what an operator sees in :mod:`~metertwin.upgrade.status`,
the spec and states in :mod:`~metertwin.upgrade.spec`.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Iterable
from typing import Any

from metertwin.core.clients import StrRedis
from metertwin.core.errors import Conflict, InvalidInput
from metertwin.stream import events
from metertwin.twin import keys as twin_keys
from metertwin.twin.messages import CommandAck
from metertwin.upgrade import keys
from metertwin.upgrade.drain import DrainSteps
from metertwin.upgrade.health import fetch_metrics
from metertwin.upgrade.migrations import migration, publish_manifests, release
from metertwin.upgrade.rollback import RollbackSteps
from metertwin.upgrade.spec import (
    ACTIVE,
    IN_FLIGHT,
    REBIND_PREFIX,
    TERMINAL,
    InjectedCrash,
    Operation,
    OperationSpec,
    Selector,
    stable_bucket,
)
from metertwin.upgrade.status import OperationStatus
from metertwin.upgrade.store import FetchMetrics, Publish
from metertwin.upgrade.switch import mqtt_publish

# --- Lua on the operation's slot ------------------------------------------------------------
# KEYS: lock; ARGV: owner, ttl. Take (or keep) the lock.
_LOCK = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class UpgradeManager(RollbackSteps, DrainSteps, OperationStatus):
    """Start, advance, pause, promote and roll back upgrade operations of one zone.

    ``crash_at`` names crash points (see :data:`CRASH_POINTS`) at which :class:`InjectedCrash`
    is raised, as if the process died there (tests). ``instance`` names this manager: a
    restarted manager with the same name takes over its own lock at once.
    """

    def __init__(
        self,
        client: StrRedis,
        *,
        instance: str | None = None,
        crash_at: Iterable[str] = (),
        publish: Publish | None = None,
        metrics: FetchMetrics | None = None,
    ) -> None:
        super().__init__(client, instance=instance, crash_at=crash_at, publish=publish or mqtt_publish,
                         metrics=metrics or fetch_metrics)
        self._guard = threading.Lock()
        self._op_locks: dict[str, threading.Lock] = {}

    def _register_scripts(self) -> None:
        super()._register_scripts()
        self._lock, self._unlock = self.r.register_script(_LOCK), self.r.register_script(_UNLOCK)

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
        # The record (slot of {op_id}) before the list of operations (its own slot on Redis Cluster;
        # no MULTI across the two): a crash in between leaves an unlisted record in ``planning``,
        # which no one advances and which blocks nothing; the retried start makes a new operation.
        self._call(lambda: self.r.hset(keys.upgrade_op(op_id), mapping=record))
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(keys.UPGRADE_OPS, {op_id: now})
        events.queue(self.r, pipe, events.upgrade_state(op_id, "planning", **{"from": spec.source, "to": spec.to}))
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
        # Kept for the blockers: why an auto-promoting canary is still observing.
        self._set(op.id, health_status=verdict.status, health_reasons="; ".join(verdict.reasons)[:500],
                  health_checked_at=repr(time.time()))
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
                why = (ack.reason or "no reason given")[:300]
                done = self._reject(keys=[keys.upgrade_switch(meter_id)], args=[op_id, ack.id, why, repr(time.time())])
                if done:
                    events.emit(self.r, events.upgrade_twin(op_id, meter_id, "rejected", why))
                return "rejected" if done else f"ignored ({phase})"
            code, why = migration(self.r, source, target).flip(meter_id, op_id, ack.id)
            if code == 1:
                pipe = self.r.pipeline(transaction=False)
                pipe.smove(keys.upgrade_op_set(op_id, "rebinding"), keys.upgrade_op_set(op_id, "switched"), meter_id)
                events.queue(self.r, pipe, events.upgrade_twin(op_id, meter_id, "switched"))
                self._call(pipe.execute)
                return "switched"
            return "already switched" if code == 2 else f"ignored ({why})"
        if version == source:
            done = self._ack_back(keys=[keys.upgrade_switch(meter_id)],
                                  args=[op_id, ack.id, ack.status, ack.reason or "", repr(time.time())])
            return "confirmed" if done else f"ignored ({phase})"
        return f"ignored (release {version!r} is not part of operation {op_id})"

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


__all__ = ["InjectedCrash", "Operation", "OperationSpec", "Selector", "UpgradeManager", "stable_bucket"]
