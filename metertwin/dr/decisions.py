"""How a twin answers one OpenADR event: optIn or optOut, the response code, and the plan.

Pure: :func:`decide` reads the event, the consumer's :class:`Preferences` and the twin's
last measurement (the baseline) and returns a :class:`Decision` whose steps are the load
limits to send, as offsets from the event start. Nothing here touches Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from metertwin.dr.settings import get_dr_settings
from metertwin.dr.wire import EventIn, Finite, SignalIn
from metertwin.twin.state import Twin

# OpenADR 2.0b response codes (openleadr.enums.STATUS_CODES), as numbers so the
# function does not import openleadr.
OK = 200
INVALID_ID = 452
INVALID_DATA = 454
SIGNAL_NOT_SUPPORTED = 460
TARGET_MISMATCH = 462
OTHER_ERROR = 469

OPT_IN = "optIn"
OPT_OUT = "optOut"
SIMPLE_NAMES = ("SIMPLE", "simple")
PRICE_NAMES = ("ELECTRICITY_PRICE", "ENERGY_PRICE")
DISPATCH_NAMES = ("LOAD_DISPATCH",)
SUPPORTED_SIGNALS = frozenset((*SIMPLE_NAMES, *PRICE_NAMES, *DISPATCH_NAMES))


class Preferences(BaseModel):
    """What the consumer allows (``PUT /meters/{id}/dr-preferences``)."""

    model_config = ConfigDict(extra="forbid")

    opt_out: bool = Field(default=False, description="Opt out of every demand-response event.")
    min_power_w: Finite = Field(default=0.0, ge=0, le=1_000_000,
                                description="Comfort floor: the meter is never limited below this.")
    max_event_duration_s: int | None = Field(default=None, ge=60, le=7 * 86_400,
                                             description="Comfort: longer events are opted out.")
    flexible_load_w: Finite | None = Field(default=None, ge=0, le=1_000_000,
                                           description="Load that may be shed; unset: a share of the measured load.")
    price_threshold: Finite = Field(default=0.30, ge=-10, le=100,
                                    description="ELECTRICITY_PRICE (currency/kWh) from which load is shed.")



@dataclass(frozen=True, slots=True)
class Decision:
    """A twin's answer to one event: ``opt``, OpenADR response ``code``, why, and what to do."""

    opt: str
    code: int
    reason: str
    #: [[offset from the event start (s), watts or None], ...]; empty when nothing is to be done.
    steps: list[list[Any]]
    baseline_w: float | None


def targets_match(targets: list[dict[str, Any]], meter_id: str, ven_id: str, groups: list[str]) -> bool:
    """Whether an event's targets include this twin (no targets: everyone)."""
    if not targets:
        return True
    for target in targets:
        for kind, value in target.items():
            values = value if isinstance(value, list) else [value]
            if kind == "ven_id" and ven_id in values:
                return True
            if kind in ("resource_id", "end_device_asset", "meter_asset") and meter_id in values:
                return True
            if kind == "group_id" and set(groups) & {str(v) for v in values}:
                return True
    return False


def baseline_of(twin: Twin | None, now: float) -> float | None:
    """The twin's last measured power (W), if recent enough to size a shed."""
    if twin is None or not twin.measurement:
        return None
    if now - float(twin.measurement.get("ts", 0)) > get_dr_settings().baseline_max_age_s:
        return None
    return max(0.0, float(twin.measurement.get("power_w", 0.0)))


def _limit_for(signal: SignalIn, payload: float, baseline: float | None, flexible: float | None,
               prefs: Preferences) -> tuple[float | None, str | None]:
    """The load limit (W) one interval asks for, or None; or an error text for bad data."""
    s = get_dr_settings()
    floor = prefs.min_power_w

    def shed(fraction: float) -> float | None:
        if fraction <= 0:
            return None
        if baseline is None or flexible is None:
            return floor  # no baseline to size a partial shed: shed all flexible load
        return max(floor, baseline - flexible * fraction)

    if signal.name in SIMPLE_NAMES or (signal.name in DISPATCH_NAMES and signal.type == "level"):
        if payload not in (0, 1, 2, 3):
            return None, f"SIMPLE level {payload!r} is not one of 0, 1, 2, 3"
        return (shed(s.simple_shed_fractions[int(payload) - 1]) if payload else None), None
    if signal.name in PRICE_NAMES:
        if signal.type == "price":
            return (shed(s.simple_shed_fractions[1]) if payload >= prefs.price_threshold else None), None
        if signal.type == "priceRelative":
            return (shed(s.simple_shed_fractions[1]) if payload > 0 else None), None
        if signal.type == "priceMultiplier":
            return (shed(s.simple_shed_fractions[1]) if payload > 1 else None), None
        return None, f"{signal.name} signal type {signal.type!r} is not price, priceRelative or priceMultiplier"
    if signal.name in DISPATCH_NAMES:
        # OpenADR LOAD_DISPATCH payloads are in kW (itemBase powerReal, scale k).
        if signal.type == "setpoint":
            if payload < 0:
                return None, f"LOAD_DISPATCH setpoint {payload!r} kW is negative"
            return max(floor, payload * 1000.0), None
        if signal.type == "delta":
            if payload >= 0:
                return None, None  # more load is allowed: no limit
            if baseline is None:
                return floor, None
            return max(floor, baseline + payload * 1000.0), None
        if signal.type == "multiplier":
            if payload < 0:
                return None, f"LOAD_DISPATCH multiplier {payload!r} is negative"
            if payload >= 1:
                return None, None
            return (floor if baseline is None else max(floor, baseline * payload)), None
        return None, f"LOAD_DISPATCH signal type {signal.type!r} is not setpoint, delta, multiplier or level"
    return None, f"signal {signal.name!r} is not supported"


def plan_steps(event: EventIn, baseline: float | None, flexible: float | None,
               prefs: Preferences) -> tuple[list[list[Any]], str | None]:
    """Steps ``[offset_s, watts|None]`` over the event: at each interval boundary the lowest limit asked."""
    spans: list[tuple[float, float, float | None]] = []
    for signal in event.signals:
        for interval in signal.intervals:
            limit, error = _limit_for(signal, interval.payload, baseline, flexible, prefs)
            if error:
                return [], error
            spans.append((interval.start, interval.start + interval.duration_s, limit))
    bounds = sorted({t for a, b, _ in spans for t in (a, b)})
    steps: list[list[Any]] = []
    for t in bounds:
        active = [w for a, b, w in spans if a <= t < b and w is not None]
        watts = round(min(active), 1) if active else None
        if not steps or steps[-1][1] != watts:
            steps.append([round(t - event.start, 3), watts])
    while steps and steps[-1][1] is None:
        steps.pop()  # the end of the event restores anyway
    return steps, None


def decide(event: EventIn, prefs: Preferences, twin: Twin | None, meter_id: str, ven_id: str,
           now: float) -> Decision:
    """optIn or optOut, with the OpenADR response code and the execution plan."""
    groups = [str(g) for g in (twin.profile.get("groups", []) if twin else [])]
    if not targets_match(event.targets, meter_id, ven_id, groups):
        return Decision(OPT_OUT, TARGET_MISMATCH,
                        f"targets {event.targets!r} do not name ven {ven_id!r} or resource {meter_id!r}", [], None)
    unsupported = sorted({s.name for s in event.signals} - SUPPORTED_SIGNALS)
    if unsupported:
        return Decision(OPT_OUT, SIGNAL_NOT_SUPPORTED,
                        f"signal(s) {unsupported} not supported; supported: {sorted(SUPPORTED_SIGNALS)}", [], None)
    baseline = baseline_of(twin, now)
    flexible = prefs.flexible_load_w
    if flexible is None and baseline is not None:
        flexible = baseline * get_dr_settings().default_flexible_share
    steps, error = plan_steps(event, baseline, flexible, prefs)
    if error:
        return Decision(OPT_OUT, INVALID_DATA, error, [], baseline)
    if prefs.opt_out:
        return Decision(OPT_OUT, OK, "consumer opted out of demand response", [], baseline)
    if prefs.max_event_duration_s is not None and event.duration_s > prefs.max_event_duration_s:
        return Decision(OPT_OUT, OK, f"event lasts {event.duration_s:.0f} s, over the consumer's comfort "
                        f"limit of {prefs.max_event_duration_s} s", [], baseline)
    sheds = any(w is not None for _, w in steps)
    if sheds and prefs.flexible_load_w == 0:
        return Decision(OPT_OUT, OK, "consumer has no flexible load to shed", [], baseline)
    if sheds and baseline is not None and all(w is not None and w >= baseline for _, w in steps):
        reason = "opted in; load already at or below the requested limit"
    else:
        reason = "opted in" if sheds else "opted in; no load change needed"
    return Decision(OPT_IN, OK, reason, steps, baseline)

