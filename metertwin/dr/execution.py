"""Execution: send the meter its effective load limit through the write capability, check the ack, restore.

Each due action (``step``, ``end``, ``check``) recomputes the meter's *effective* load limit
from every opted-in event in its window, so overlapping events, modifications and
cancellations all reduce to "send the current effective limit" (a ``load_limit`` command of
:mod:`metertwin.twin.commands`). An unacknowledged command counts as "meter unreachable" after
``DR_ACK_TIMEOUT_S`` and is retried until the event ends (a restore: ``DR_RESTORE_RETRY_S`` longer).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from metertwin.core.errors import MeterTwinError, NotFound
from metertwin.dr.decisions import OPT_IN
from metertwin.dr.settings import get_dr_settings
from metertwin.dr.store import DrStore
from metertwin.twin import commands

log = logging.getLogger("metertwin.dr")

HISTORY_MAX = 20


def set_exec(record: dict[str, Any], state: str, now: float, **extra: Any) -> None:
    ex = dict(record.get("exec") or {})
    history = list(ex.get("history", []))[-(HISTORY_MAX - 1):]
    history.append({"at": round(now, 3), "state": state, **{k: v for k, v in extra.items() if k != "watts_sent"}})
    ex.update(extra)
    ex["state"] = state
    ex["history"] = history
    record["exec"] = ex


def effective_limit(events: dict[str, dict[str, Any]], now: float) -> tuple[float | None, list[str]]:
    """The lowest limit any opted-in, uncancelled event asks for right now, and which events ask."""
    limits: list[tuple[float, str]] = []
    for event_id, record in events.items():
        if record.get("opt") != OPT_IN or record.get("cancelled") or not record.get("plan"):
            continue
        if not record["start_at"] <= now < record["end_at"]:
            continue
        current = [w for at, w in record["plan"] if at <= now + 1e-6]
        if current and current[-1] is not None:
            limits.append((float(current[-1]), event_id))
    if not limits:
        return None, []
    watts = min(w for w, _ in limits)
    return watts, sorted(e for w, e in limits if w == watts)


def execute_due(store: DrStore, now: float | None = None, limit: int | None = None) -> dict[str, int]:
    """Run every due action (start, step, end, ack check); the entry point of ``POST /due``."""
    now = time.time() if now is None else now
    todo = store.claim_due(now, limit or get_dr_settings().due_batch)
    counts = {"claimed": len(todo), "sent": 0, "checked": 0, "skipped": 0, "failed": 0}
    for action in todo:
        try:
            outcome = run_action(store, action, now)
        except MeterTwinError as exc:
            log.warning("DR action %r failed: %s", action, exc.message)
            outcome = "failed"
            # Not lost: try again shortly (the set is the only place it lived).
            store.schedule([(now + min(5.0, get_dr_settings().ack_timeout_s), action)])
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def run_action(store: DrStore, action: dict[str, Any], now: float) -> str:
    meter_id, event_id, kind = action["m"], action["e"], action["k"]
    try:
        record = store.event(meter_id, event_id)
    except NotFound:
        return "skipped"
    if kind == "check":
        return _check(store, action, record, now)
    if record["modification_number"] != action["n"]:
        return "skipped"  # superseded by a modification, which scheduled its own actions
    if kind == "step" and (record.get("cancelled") or record.get("opt") != OPT_IN):
        return "skipped"
    if kind == "end" and not (record.get("exec") or {}).get("command_id"):
        return "skipped"  # nothing was ever sent for this event
    return _send(store, meter_id, event_id, kind, now, attempt=int(action.get("a", 0)))


def _send(store: DrStore, meter_id: str, event_id: str, kind: str, now: float, attempt: int = 0,
          state_label: str | None = None) -> str:
    """Send the meter its current effective limit and schedule the ack check."""
    events = store.events(meter_id)
    watts, owners = effective_limit(events, now)
    state = store.load_control(meter_id)
    record = events.get(event_id)
    if record is None:
        return "skipped"
    ends = max((r["end_at"] for e, r in events.items() if e in owners), default=record["end_at"])
    expiry = max(1, min(commands.MAX_EXPIRY_S, math.ceil(ends - now) + 60)) if watts is not None \
        else max(1, int(get_dr_settings().restore_retry_s) or 60)
    if kind == "step" and watts is None and state.get("watts") is None:
        return "skipped"  # a no-limit interval (level 0) while nothing limits the meter: nothing to restore
    if kind == "end" and state.get("watts") == watts and state.get("acked") and watts is None:
        command_id = state.get("command_id")  # already unlimited and acknowledged
    else:
        cmd = commands.submit(meter_id, "load_limit", {"watts": watts}, expiry_s=expiry,
                              actor=f"dr:{event_id}")
        command_id = cmd["id"]
        # The baseline of the event in force: a later event's baseline must not be this curtailed load.
        baseline = next((events[e].get("baseline_w") for e in owners if events[e].get("baseline_w") is not None),
                        None)
        store.set_load_control(meter_id, {"watts": watts, "events": owners, "command_id": command_id,
                                          "sent_at": now, "acked": False, "baseline_w": baseline})
    phase = state_label or ("restoring" if kind == "end" else "applying")

    def change(old: dict[str, Any] | None) -> dict[str, Any] | None:
        if old is None:
            return None
        set_exec(old, phase, now, command_id=command_id, watts=watts, attempts=attempt + 1,
                  watts_sent=watts if kind != "end" else None)
        return old

    store.update(meter_id, event_id, change)
    check = {"m": meter_id, "e": event_id, "n": record["modification_number"], "k": "check",
             "c": command_id, "p": kind, "a": attempt}
    store.schedule([(now + get_dr_settings().ack_timeout_s, check)])
    return "sent"


def _check(store: DrStore, action: dict[str, Any], record: dict[str, Any], now: float) -> str:
    meter_id, event_id, phase = action["m"], action["e"], action["p"]
    if (record.get("exec") or {}).get("command_id") != action["c"]:
        return "skipped"  # a newer command (modification, cancellation, retry) superseded this one
    try:
        status = commands.get_commands().get(meter_id, action["c"])["status"]
    except NotFound:
        status = "expired"
    if status == "acknowledged":
        state = store.load_control(meter_id)
        if state.get("command_id") == action["c"]:
            store.set_load_control(meter_id, {**state, "acked": True})
        new_state = "restored" if phase == "end" else "applied"
    elif status == "rejected":
        new_state = "restore_rejected" if phase == "end" else "rejected"
    else:
        new_state = "meter_unreachable"
    window_end = record["end_at"] + (get_dr_settings().restore_retry_s if phase == "end" else 0)
    retry = new_state == "meter_unreachable" and now < window_end and not (
        phase != "end" and record.get("cancelled"))

    def change(old: dict[str, Any] | None) -> dict[str, Any] | None:
        if old is None:
            return None
        if old.get("exec", {}).get("command_id") != action["c"]:
            return None  # a newer command superseded this one
        set_exec(old, new_state, now, command_status=status, retrying=retry)
        return old

    store.update(meter_id, event_id, change)
    if retry:
        # Keeps the "meter_unreachable" state until an ack of the retry arrives.
        _send(store, meter_id, event_id, phase, now, attempt=int(action.get("a", 0)) + 1,
              state_label="meter_unreachable")
    return "checked"

