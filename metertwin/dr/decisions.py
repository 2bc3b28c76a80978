"""How a twin answers one OpenADR event: optIn or optOut, the response code, and the plan.

Pure: :func:`decide` reads the event, the consumer's :class:`Preferences` and the twin's
baseline and returns a :class:`Decision` whose steps are the load limits to send, as offsets
from the event start (``None``: no limit, e.g. a SIMPLE level-0 interval). Nothing here
touches Redis.

Signals (OpenADR 2.0b profile, signal name / type pairs the VEN executes):

* ``SIMPLE`` / ``level`` 0-3 (no units);
* ``ELECTRICITY_PRICE``, ``ENERGY_PRICE`` / ``price`` (itemBase ``currencyPerKWh`` with its
  siScaleCode), ``priceRelative``, ``priceMultiplier``;
* ``LOAD_DISPATCH`` / ``setpoint``, ``delta`` (itemBase ``powerReal`` in W with its
  siScaleCode), ``multiplier``, ``level`` 0-3.

Any other pair of a supported name is invalid data (454); other names are not supported (460).
A quantity whose units are missing or not these is rejected (454), never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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
#: Signal types the 2.0b profile allows with each supported signal name.
SIGNAL_TYPES: dict[str, frozenset[str]] = {
    **{n: frozenset(("level",)) for n in SIMPLE_NAMES},
    **{n: frozenset(("price", "priceRelative", "priceMultiplier")) for n in PRICE_NAMES},
    **{n: frozenset(("setpoint", "delta", "multiplier", "level")) for n in DISPATCH_NAMES},
}
#: siScaleCode -> factor (emix siscale).
SI_SCALE = {"p": 1e-12, "n": 1e-9, "micro": 1e-6, "m": 1e-3, "c": 1e-2, "d": 1e-1, "none": 1.0,
            "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


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
    price_currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$",
                                       description="ISO 4217 currency of price_threshold (default: the zone's "
                                                   "DR_PRICE_CURRENCY; neither set: the VTN's currency). A price in "
                                                   "another currency is refused, never compared.")



@dataclass(frozen=True, slots=True)
class Decision:
    """A twin's answer to one event: ``opt``, OpenADR response ``code``, why, and what to do."""

    opt: str
    code: int
    reason: str
    #: [[offset from the event start (s), watts or None], ...]; empty when nothing is to be done.
    steps: list[list[Any]]
    baseline_w: float | None


@dataclass(frozen=True, slots=True)
class Membership:
    """What an event target can name this twin by: its VEN, its resources, its groups."""

    ven_id: str
    resource_ids: frozenset[str]
    group_ids: frozenset[str]
    group_names: frozenset[str]


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple | set) else [str(value)]


def membership(meter_id: str, ven_id: str, profile: dict[str, Any] | None) -> Membership:
    """The twin's target identities from its registry profile (grid topology, when the registry has it).

    Read: ``resource_id`` / ``resource_ids`` (the meter id is always a resource), ``groups`` (ids,
    or objects with ``id`` and/or ``name``), ``group_ids``, ``group_names``.
    """
    profile = profile or {}
    resources = {meter_id, *_strings(profile.get("resource_id")), *_strings(profile.get("resource_ids"))}
    ids, names = set(_strings(profile.get("group_ids"))), set(_strings(profile.get("group_names")))
    for group in profile.get("groups") or []:
        if isinstance(group, dict):
            ids.update(_strings(group.get("id")))
            names.update(_strings(group.get("name")))
        else:
            ids.add(str(group))
    return Membership(str(ven_id), frozenset(resources), frozenset(ids), frozenset(names))


def targets_match(targets: list[dict[str, Any]], member: Membership) -> bool:
    """Whether an event's targets include this twin (no targets: everyone; several: any of them)."""
    if not targets:
        return True
    for target in targets:
        for kind, value in target.items():
            values = set(_strings(value))
            if kind == "ven_id" and member.ven_id in values:
                return True
            if kind in ("resource_id", "end_device_asset", "meter_asset") and member.resource_ids & values:
                return True
            if kind == "group_id" and member.group_ids & values:
                return True
            if kind == "group_name" and member.group_names & values:
                return True
    return False


def baseline_of(twin: Twin | None, now: float) -> float | None:
    """The twin's last measured power (W), if recent enough to size a shed."""
    if twin is None or not twin.measurement:
        return None
    if now - float(twin.measurement.get("ts", 0)) > get_dr_settings().baseline_max_age_s:
        return None
    return max(0.0, float(twin.measurement.get("power_w", 0.0)))


def signal_error(signal: SignalIn) -> tuple[int, str] | None:
    """(code, why) if this signal cannot be executed as sent: name/type pair or units."""
    if signal.name not in SUPPORTED_SIGNALS:
        return SIGNAL_NOT_SUPPORTED, f"signal {signal.name!r} is not supported; supported: {sorted(SUPPORTED_SIGNALS)}"
    allowed = SIGNAL_TYPES[signal.name]
    if signal.type not in allowed:
        return INVALID_DATA, f"signal {signal.name} has type {signal.type!r}; OpenADR 2.0b allows {sorted(allowed)}"
    if signal.scale is not None and signal.scale not in SI_SCALE:
        return INVALID_DATA, f"siScaleCode {signal.scale!r} is not one of {sorted(SI_SCALE)}"
    if signal.name in DISPATCH_NAMES and signal.type in ("setpoint", "delta") \
            and (signal.item_base != "powerReal" or signal.units != "W"):
        return INVALID_DATA, (f"LOAD_DISPATCH {signal.type} needs itemBase powerReal in W (with siScaleCode); "
                                  f"got {signal.item_base or 'no itemBase'!s} {signal.units or ''!s}".rstrip())
    if signal.name in PRICE_NAMES and signal.type == "price" and signal.item_base != "currencyPerKWh":
        return INVALID_DATA, (f"{signal.name} price needs itemBase currencyPerKWh (the consumer's threshold is "
                              f"per kWh); got {signal.item_base or 'no itemBase'}")
    return None


def _scale(signal: SignalIn) -> float:
    return SI_SCALE[signal.scale or "none"]


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
            currency = prefs.price_currency or s.price_currency
            if currency and (signal.units or "").upper() != currency:
                return None, (f"{signal.name} price is in {signal.units or 'no currency'!s}; this twin's price "
                              f"threshold is in {currency} (no exchange rate is guessed)")
            price = payload * _scale(signal)  # currency per kWh
            return (shed(s.simple_shed_fractions[1]) if price >= prefs.price_threshold else None), None
        if signal.type == "priceRelative":
            return (shed(s.simple_shed_fractions[1]) if payload > 0 else None), None
        if signal.type == "priceMultiplier":
            return (shed(s.simple_shed_fractions[1]) if payload > 1 else None), None
        return None, f"{signal.name} signal type {signal.type!r} is not price, priceRelative or priceMultiplier"
    if signal.name in DISPATCH_NAMES:
        # setpoint and delta are powerReal: W times the siScaleCode (checked in signal_error).
        watts = payload * _scale(signal)
        if signal.type == "setpoint":
            if payload < 0:
                return None, f"LOAD_DISPATCH setpoint {payload!r} ({watts!r} W) is negative"
            return max(floor, watts), None
        if signal.type == "delta":
            if payload >= 0:
                return None, None  # more load is allowed: no limit
            if baseline is None:
                return floor, None
            return max(floor, baseline + watts), None
        if signal.type == "multiplier":
            if payload < 0:
                return None, f"LOAD_DISPATCH multiplier {payload!r} is negative"
            if payload >= 1:
                return None, None
            return (floor if baseline is None else max(floor, baseline * payload)), None
        return None, f"LOAD_DISPATCH signal type {signal.type!r} is not setpoint, delta, multiplier or level"
    return None, f"signal {signal.name!r} is not supported"


def event_end(event: EventIn) -> float:
    """When the event ends (epoch s); an open-ended event (duration 0, ``PT0S``) lasts until cancelled or
    modified: its end is ``open_ended_horizon_s`` ahead of its start."""
    if event.duration_s > 0:
        return event.start + event.duration_s
    return event.start + get_dr_settings().open_ended_horizon_s


def plan_steps(event: EventIn, baseline: float | None, flexible: float | None,
               prefs: Preferences) -> tuple[list[list[Any]], str | None]:
    """Steps ``[offset_s, watts|None]`` over the event: at each interval boundary the lowest limit asked.

    Every interval applies its own level: an interval asking for no limit (SIMPLE level 0) is a
    ``None`` step that restores the meter, trailing ones included. In an open-ended event, an
    interval of duration 0 lasts until the event ends.
    """
    end = event_end(event)
    spans: list[tuple[float, float, float | None]] = []
    for signal in event.signals:
        for interval in signal.intervals:
            limit, error = _limit_for(signal, interval.payload, baseline, flexible, prefs)
            if error:
                return [], error
            stop = interval.start + interval.duration_s if interval.duration_s > 0 or event.duration_s > 0 else end
            spans.append((interval.start, min(stop, end), limit))
    bounds = sorted({t for a, b, _ in spans for t in (a, b) if t < end})
    steps: list[list[Any]] = []
    for t in bounds:
        active = [w for a, b, w in spans if a <= t < b and w is not None]
        watts = round(min(active), 1) if active else None
        if steps and steps[-1][1] == watts:
            continue
        if not steps and watts is None:
            continue  # nothing to restore before the first limit
        steps.append([round(t - event.start, 3), watts])
    return steps, None


def decide(event: EventIn, prefs: Preferences, twin: Twin | None, meter_id: str, ven_id: str,
           now: float, baseline: float | Literal["measure"] | None = "measure",
           topology: dict[str, Any] | None = None) -> Decision:
    """optIn or optOut, with the OpenADR response code and the execution plan.

    ``baseline``: the pre-event load (W) to size sheds from; by default the twin's last
    measurement (:func:`baseline_of`). A modification passes the baseline fixed for the event.
    ``topology``: the twin's grid topology document (``metertwin.fleet``), whose ``groups``
    count as group targets beside those of the registry profile.
    """
    member = membership(meter_id, ven_id, {**(twin.profile if twin else {}), **(topology or {})})
    if not targets_match(event.targets, member):
        return Decision(OPT_OUT, TARGET_MISMATCH,
                        f"targets {event.targets!r} name neither ven {ven_id!r}, resources "
                        f"{sorted(member.resource_ids)}, groups {sorted(member.group_ids)} nor group names "
                        f"{sorted(member.group_names)}", [], None)
    errors = [e for e in (signal_error(s) for s in event.signals) if e]
    if errors:
        code = SIGNAL_NOT_SUPPORTED if all(c == SIGNAL_NOT_SUPPORTED for c, _ in errors) else INVALID_DATA
        return Decision(OPT_OUT, code, "; ".join(why for _, why in errors), [], None)
    if baseline == "measure":
        baseline = baseline_of(twin, now)
    if event.test_event and not get_dr_settings().execute_test_events:
        return Decision(OPT_IN, OK, "test event: answered, not executed (DR_EXECUTE_TEST_EVENTS is off)", [],
                        baseline)
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
    if sheds and baseline is not None and all(w is None or w >= baseline for _, w in steps):
        reason = "opted in; load already at or below the requested limit"
    else:
        reason = "opted in" if sheds else "opted in; no load change needed"
    return Decision(OPT_IN, OK, reason, steps, baseline)

