"""What others see of demand response: per-twin telemetry for the VTN's reports and the operator's views."""

from __future__ import annotations

import json
import time
from typing import Any

from metertwin.core.errors import NotFound, UnknownMeter
from metertwin.dr import keys
from metertwin.dr.decisions import OPT_IN, OPT_OUT
from metertwin.dr.settings import get_dr_settings
from metertwin.dr.store import DrStore
from metertwin.twin.state import TwinStore


def telemetry(store: DrStore, meter_ids: list[str], now: float | None = None) -> dict[str, Any]:
    """Per meter: power (W) for TELEMETRY_USAGE, and online / manual override / load-control state
    (limit and the baseline it is set against) for TELEMETRY_STATUS (``oadrPayloadResourceStatus``)."""
    now = time.time() if now is None else now
    twins = TwinStore(store.redis)
    out: dict[str, Any] = {}
    for meter_id in meter_ids:
        try:
            twin = twins.get(meter_id)
        except UnknownMeter:
            out[meter_id] = None
            continue
        m = twin.measurement or {}
        age = twin.age_s(now)
        lc = store.load_control(meter_id)
        out[meter_id] = {
            "power_w": float(m["power_w"]) if "power_w" in m else None,
            "import_kwh": float(m["import_kwh"]) if "import_kwh" in m else None,
            "ts": m.get("ts"),
            "online": age is not None and age <= get_dr_settings().online_max_age_s,
            "load_limit_w": lc.get("watts"),
            "load_control_events": lc.get("events", []),
            "load_control_acked": bool(lc.get("acked")),
            "baseline_w": lc.get("baseline_w") if lc.get("watts") is not None else None,
            # the consumer overrides demand response (TELEMETRY_STATUS oadrManualOverride)
            "opt_out": store.preferences(meter_id).opt_out,
        }
    return out


def event_summary(store: DrStore, event_id: str, now: float | None = None) -> dict[str, Any]:
    """What the operator sees of one event: every twin's answer and the load shed."""
    now = time.time() if now is None else now
    raw = store._do(lambda: store.redis.hgetall(keys.dr_event_meters(event_id)))
    if not raw:
        raise NotFound(f"no twin knows event {event_id!r}", event_id=event_id)
    twins = TwinStore(store.redis)
    meters: dict[str, Any] = {}
    totals: dict[str, Any] = {"twins": 0, "opt_in": 0, "opt_out": 0, "cancelled": 0, "baseline_w": 0.0,
                              "power_w": 0.0, "shed_w": 0.0}
    by_state: dict[str, int] = {}
    for meter_id, doc in sorted(raw.items()):
        entry = json.loads(doc)
        try:
            m = twins.get(meter_id).measurement or {}
        except UnknownMeter:
            m = {}
        power = m.get("power_w")
        entry["power_w"] = power
        base = entry.get("baseline_w")
        entry["shed_w"] = round(base - power, 1) if base is not None and power is not None \
            and entry.get("opt") == OPT_IN else None
        meters[meter_id] = entry
        totals["twins"] += 1
        totals["opt_in"] += entry.get("opt") == OPT_IN
        totals["opt_out"] += entry.get("opt") == OPT_OUT
        totals["cancelled"] += bool(entry.get("cancelled"))
        state = entry.get("exec") or "none"
        by_state[state] = by_state.get(state, 0) + 1
        if entry["shed_w"] is not None:
            totals["baseline_w"] += base
            totals["power_w"] += power
            totals["shed_w"] += entry["shed_w"]
    totals["by_exec_state"] = by_state
    for name in ("baseline_w", "power_w", "shed_w"):
        totals[name] = round(totals[name], 1)
    return {"event_id": event_id, "totals": totals, "meters": meters}


def recent_events(store: DrStore, limit: int = 50) -> list[dict[str, Any]]:
    """The zone's latest events (by start), for the operator's list."""
    ids = store._do(lambda: store.redis.zrevrange(keys.DR_EVENT_INDEX, 0, max(0, limit - 1), withscores=True))
    return [{"event_id": e, "start": s} for e, s in ids]

