"""An event's life on the twin: answer the delivery, randomize, plan, schedule, cancel.

:func:`handle_delivery` answers every event of one ``oadrDistributeEvent``. For each new
event or modification it asks :mod:`metertwin.dr.decisions`, draws the randomization
offset within ``startafter_s`` (kept across modifications of the same window), turns the
decision's steps into a plan of absolute times, and writes the plan's actions into the
zone's due set. A function cannot sleep, so execution is data: whoever calls ``POST /due``
(the bridge's timer, every ``DR_DUE_POLL_S``) runs them (:mod:`metertwin.dr.execution`);
actions already due on delivery run at once. Events the twin expects but the VTN no longer
lists are cancelled (implied).

Baseline (the load a shed is sized from): the twin's last measured load when it first decides
on the event (if younger than ``DR_BASELINE_MAX_AGE_S``); when a DR limit is already in force
on the meter then, the measurement is curtailed, so the baseline of the event in force is taken.
It is fixed in the record and kept for every modification of the event.

:func:`opt_out_events` is the consumer opting out mid-event: the twin's opted-in events are
opted out, the meter restored at once, and an ``oadrCreateOpt`` (optOut) queued for the VEN.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from pydantic import ValidationError

from metertwin.core.errors import UnknownMeter
from metertwin.core.http import describe_validation_error
from metertwin.dr.decisions import (
    INVALID_DATA,
    INVALID_ID,
    OK,
    OPT_IN,
    OPT_OUT,
    OTHER_ERROR,
    Preferences,
    baseline_of,
    decide,
    event_end,
)
from metertwin.dr.execution import run_action, set_exec
from metertwin.dr.settings import get_dr_settings
from metertwin.dr.store import DrStore
from metertwin.dr.wire import Delivery, EventIn
from metertwin.fleet.topology import topology_store
from metertwin.twin.state import Twin, TwinStore

log = logging.getLogger("metertwin.dr")

STATUSES = ("far", "near", "active", "completed", "cancelled")


def status_of(record: dict[str, Any], now: float) -> str:
    """far / near / active / completed / cancelled, from the clock and the record."""
    if record.get("cancelled"):
        return "cancelled"
    if now >= record["end_at"]:
        return "completed"
    if now >= record["start_at"]:
        return "active"
    if record["start"] - now <= get_dr_settings().near_window_s:
        return "near"
    return "far"


def public(record: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """An event record as the API shows it: with its current ``status``."""
    out = dict(record)
    out["status"] = status_of(record, now if now is not None else time.time())
    return out


def _answer(event_id: str, modification_number: int, opt: str, code: int, reason: str) -> dict[str, Any]:
    return {"event_id": event_id, "modification_number": modification_number, "opt": opt,
            "response_code": code, "description": reason}


def handle_delivery(store: DrStore, delivery: Delivery, now: float | None = None,
                    rng: random.Random | None = None) -> dict[str, Any]:
    """Answer every event of one delivery; cancel (implied) the twin's events missing from it.

    Each event is handled on its own: a malformed event gets its error code, and an
    unexpected error gets optOut with 469 *for that event only*.
    """
    now = time.time() if now is None else now
    rng = rng or random.SystemRandom()
    meter_id, ven_id = delivery.meter_id, delivery.ven_id
    twins = TwinStore(store.redis)
    try:
        twin: Twin | None = twins.get(meter_id)
    except UnknownMeter:
        twin = None
    prefs = store.preferences(meter_id)
    answers: list[dict[str, Any]] = []
    seen: set[str] = set()
    for raw in delivery.events:
        event_id = str((raw or {}).get("event_id", "")) if isinstance(raw, dict) else ""
        mod = raw.get("modification_number", 0) if isinstance(raw, dict) else 0
        if event_id:
            seen.add(event_id)
        try:
            if twin is None:
                answers.append(_answer(event_id, mod, OPT_OUT, INVALID_ID,
                                       f"meter {meter_id!r} has no twin in this zone"))
                continue
            try:
                event = EventIn.model_validate(raw)
            except ValidationError as exc:
                answers.append(_answer(event_id, mod if isinstance(mod, int) else 0, OPT_OUT, INVALID_DATA,
                                       describe_validation_error(exc)))
                continue
            answers.append(_handle_event(store, event, twin, prefs, delivery, now, rng))
        except Exception as exc:  # one bad event must not opt the twin out of the others
            log.exception("DR event %r of meter %r failed", event_id, meter_id)
            answers.append(_answer(event_id, mod if isinstance(mod, int) else 0, OPT_OUT, OTHER_ERROR,
                                   f"internal error handling event: {type(exc).__name__}"))
    seen.update(delivery.rejected_event_ids)
    implied = [] if twin is None else _implied_cancellations(store, meter_id, seen, now)
    if twin is not None:
        store.prune(meter_id, now)
    return {"meter_id": meter_id, "ven_id": ven_id, "responses": answers, "implied_cancellations": implied}


def _handle_event(store: DrStore, event: EventIn, twin: Twin, prefs: Preferences, delivery: Delivery,
                  now: float, rng: random.Random) -> dict[str, Any]:
    meter_id = delivery.meter_id
    existing = store.events(meter_id).get(event.event_id)
    if existing and existing["modification_number"] == event.modification_number \
            and bool(existing.get("cancelled")) == (event.status == "cancelled"):
        # A redelivery of what we already answered: same answer, nothing rescheduled.
        return _answer(event.event_id, event.modification_number, existing["opt"], existing["response_code"],
                       existing["reason"])
    if existing and event.modification_number < existing["modification_number"]:
        return _answer(event.event_id, event.modification_number, existing["opt"], existing["response_code"],
                       f"stale modification {event.modification_number} < {existing['modification_number']}")
    if event.status == "cancelled":
        return _cancel(store, meter_id, event.event_id, now, "explicit", event)

    kept = existing.get("baseline_w") if existing else None
    decision = decide(event, prefs, twin, meter_id, delivery.ven_id, now,
                      baseline=kept if kept is not None else _pre_event_baseline(store, meter_id, twin, now),
                      topology=topology_store(store.redis).get(meter_id))
    offset = existing["offset_s"] if existing and existing.get("startafter_s") == event.startafter_s \
        else round(rng.uniform(0, event.startafter_s), 3) if event.startafter_s > 0 else 0.0
    start_at = event.start + offset
    end_at = event_end(event) + offset
    plan = [[round(start_at + off, 3), w] for off, w in decision.steps]
    record: dict[str, Any] = {
        "event_id": event.event_id, "modification_number": event.modification_number,
        "vtn_status": event.status, "vtn_id": delivery.vtn_id, "ven_id": delivery.ven_id,
        "market_context": event.market_context, "priority": event.priority, "test_event": event.test_event,
        "signals": [s.model_dump() for s in event.signals], "targets": event.targets,
        "start": event.start, "duration_s": event.duration_s, "startafter_s": event.startafter_s,
        "open_ended": event.duration_s == 0, "recovery_s": event.recovery_s,
        "offset_s": offset, "start_at": round(start_at, 3), "end_at": round(end_at, 3),
        # kept until the event, its recovery and its whole randomization window are over (+ retention)
        "keep_until": round(end_at - offset + event.startafter_s + event.recovery_s, 3),
        "opt": decision.opt, "response_code": decision.code, "reason": decision.reason,
        "baseline_w": decision.baseline_w, "plan": plan, "cancelled": None,
        "received_at": existing["received_at"] if existing else now, "updated_at": now,
        "exec": (existing or {}).get("exec") or {"state": "none", "history": []},
    }
    was_applied = bool(existing and existing.get("exec", {}).get("watts_sent") is not None)
    actions: list[tuple[float, dict[str, Any]]] = []
    base = {"m": meter_id, "e": event.event_id, "n": event.modification_number}
    if decision.opt == OPT_IN and plan and now < end_at:
        current = max((i for i, (at, _w) in enumerate(plan) if at <= now), default=0)
        for i, (at, _w) in enumerate(plan):
            if i >= current:  # past steps are superseded by the current one
                actions.append((max(at, now), {**base, "k": "step", "s": i}))
        actions.append((end_at, {**base, "k": "end"}))
        if was_applied and now < start_at:
            # Moved later while the meter is limited: restore now; the steps shed again at the new start.
            actions.append((now, {**base, "k": "end"}))
        set_exec(record, "scheduled" if now < start_at else record["exec"]["state"], now)
    elif was_applied:
        # Modified into an opt-out or a no-op while the meter is limited: restore now.
        actions.append((now, {**base, "k": "end"}))
    store.update(meter_id, event.event_id, lambda _old: record)
    _schedule_orrun_action(store, actions, now)
    return _answer(event.event_id, event.modification_number, decision.opt, decision.code, decision.reason)


def _pre_event_baseline(store: DrStore, meter_id: str, twin: Twin, now: float) -> float | None:
    """The twin's load before the event (see the module doc): not a measurement curtailed by DR."""
    in_force = store.load_control(meter_id)
    if in_force.get("watts") is not None:
        baseline = in_force.get("baseline_w")
        return None if baseline is None else float(baseline)
    return baseline_of(twin, now)


def opt_out_events(store: DrStore, meter_id: str, now: float | None = None,
                   reason: str = "consumer opted out of demand response") -> list[str]:
    """The consumer opts out now: every opted-in event not yet over is opted out, the meter is restored
    at once if limited, and an optOut is queued for the VTN (``oadrCreateOpt``, sent by the bridge)."""
    now = time.time() if now is None else now
    changed: list[str] = []
    for event_id, current in store.events(meter_id).items():
        if current.get("opt") != OPT_IN or current.get("cancelled") or now >= current.get("end_at", 0):
            continue

        def change(old: dict[str, Any] | None) -> dict[str, Any] | None:
            if old is None or old.get("opt") != OPT_IN:
                return None
            new = dict(old)
            new.update(opt=OPT_OUT, reason=f"{reason} (during the event)", opted_out_at=now, updated_at=now)
            return new

        record = store.update(meter_id, event_id, change)
        if record is None:
            continue
        changed.append(event_id)
        store.queue_opt(meter_id, {"meter_id": meter_id, "event_id": event_id,
                                   "modification_number": record["modification_number"], "reason": reason})
        if (record.get("exec") or {}).get("watts_sent") is not None:
            _schedule_orrun_action(store, [(now, {"m": meter_id, "e": event_id, "n": record["modification_number"],
                                                  "k": "end"})], now)
    return changed


def _schedule_orrun_action(store: DrStore, actions: list[tuple[float, dict[str, Any]]], now: float) -> None:
    """Schedule future actions; run the ones already due in this invocation (an event that is
    active on delivery must not wait for the next ``/due`` tick)."""
    store.schedule([(at, a) for at, a in actions if at > now])
    for at, action in actions:
        if at > now:
            continue
        try:
            run_action(store, action, now)
        except Exception as exc:  # the answer stands; the action is retried through the due set
            log.warning("DR action %r deferred: %s: %s", action, type(exc).__name__, exc)
            store.schedule([(now, action)])


def _cancel(store: DrStore, meter_id: str, event_id: str, now: float, how: str,
            event: EventIn | None = None) -> dict[str, Any]:
    def change(old: dict[str, Any] | None) -> dict[str, Any] | None:
        if old is None:
            if event is None:
                return None
            # A cancellation of an event we never saw: remember it so a late copy is not executed.
            old = {"event_id": event_id, "modification_number": event.modification_number, "start": event.start,
                   "duration_s": event.duration_s, "start_at": event.start, "end_at": event.start + event.duration_s,
                   "startafter_s": 0.0, "offset_s": 0.0, "opt": OPT_IN, "response_code": OK, "plan": [],
                   "signals": [s.model_dump() for s in event.signals], "targets": event.targets,
                   "baseline_w": None, "received_at": now, "exec": {"state": "none", "history": []}}
        new = dict(old)
        if event is not None:
            new["modification_number"] = event.modification_number
            new["vtn_status"] = "cancelled"
        new["cancelled"] = {"how": how, "at": now}
        new["reason"] = f"cancelled ({how})"
        new["updated_at"] = now
        return new

    record = store.update(meter_id, event_id, change)
    if record is not None and record.get("exec", {}).get("watts_sent") is not None:
        _schedule_orrun_action(store, [(now, {"m": meter_id, "e": event_id, "n": record["modification_number"],
                                        "k": "end"})], now)
    mod = record["modification_number"] if record else (event.modification_number if event else 0)
    opt = record["opt"] if record else OPT_IN
    return _answer(event_id, mod, opt, OK, f"cancelled ({how})")


def _implied_cancellations(store: DrStore, meter_id: str, seen: set[str], now: float) -> list[str]:
    """Events the twin still expects but the VTN no longer lists are cancelled (implied)."""
    cancelled = []
    for event_id, record in store.events(meter_id).items():
        if event_id in seen or record.get("cancelled") or now >= record.get("end_at", 0):
            continue
        _cancel(store, meter_id, event_id, now, "implied")
        cancelled.append(event_id)
    return cancelled

