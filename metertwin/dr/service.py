"""Demand response (OpenADR 2.0b) behind a twin: decide, remember, schedule, execute.

The VEN bridge (``dr_bridge``) speaks OpenADR to the utility's VTN and hands every
``oadrDistributeEvent`` of one twin, already turned into plain JSON, to the stateless
``dr-event`` function, which calls :func:`handle_delivery` here. State lives in the
zone's Redis (keys in :mod:`metertwin.dr.keys`):

* one hash per meter, event id -> event record (JSON), with the decision, the plan and
  the execution state; every change is a WATCH/MULTI transaction;
* the consumer's preferences (opt-out, comfort limits, flexible load);
* one sorted set of due actions for the zone, scored by when they are due (epoch s);
  :func:`execute_due` claims due members atomically (a Lua ZRANGEBYSCORE + ZREM), so
  several callers never run one action twice;
* per event an index meter -> answer, for the operator's view.

A function cannot sleep, so execution is data: a decision writes the plan's actions
into the due set, and whoever calls ``POST /due`` (the bridge's timer, every
``DR_DUE_POLL_S``) runs them. Each action recomputes the meter's *effective* load
limit from every opted-in event in its window, so overlapping events, modifications
and cancellations all reduce to "send the current effective limit".
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import redis
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from metertwin.core.clients import StrRedis
from metertwin.core.errors import BackendUnavailable, InvalidInput, MeterTwinError, NotFound, UnknownMeter
from metertwin.core.http import describe_validation_error
from metertwin.dr import keys
from metertwin.twin import commands
from metertwin.twin.state import Twin, TwinStore

log = logging.getLogger("metertwin.dr")

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
STATUSES = ("far", "near", "active", "completed", "cancelled")
SIMPLE_NAMES = ("SIMPLE", "simple")
PRICE_NAMES = ("ELECTRICITY_PRICE", "ENERGY_PRICE")
DISPATCH_NAMES = ("LOAD_DISPATCH",)
SUPPORTED_SIGNALS = frozenset((*SIMPLE_NAMES, *PRICE_NAMES, *DISPATCH_NAMES))
MAX_INTERVALS = 288
HISTORY_MAX = 20


def _env(name: str) -> AliasChoices:
    return AliasChoices(f"DR_{name}", name)


class DrSettings(BaseSettings):
    """Tunables of demand response (``DR_`` environment variables). Units are in the names."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, populate_by_name=True)

    #: A command not acknowledged this long after it was sent counts as "meter unreachable".
    ack_timeout_s: float = Field(default=10.0, gt=0, validation_alias=_env("ACK_TIMEOUT_S"))
    #: An event starting within this many seconds is ``near`` (else ``far``).
    near_window_s: float = Field(default=300.0, ge=0, validation_alias=_env("NEAR_WINDOW_S"))
    #: A twin whose last measurement is older than this reports itself offline.
    online_max_age_s: float = Field(default=900.0, gt=0, validation_alias=_env("ONLINE_MAX_AGE_S"))
    #: After an event ends, keep retrying the restore for this long.
    restore_retry_s: float = Field(default=3600.0, ge=0, validation_alias=_env("RESTORE_RETRY_S"))
    #: Share of the flexible load shed for SIMPLE levels 1, 2 and 3.
    simple_shed_fractions: tuple[float, float, float] = Field(
        default=(0.5, 0.75, 1.0), validation_alias=_env("SIMPLE_SHED_FRACTIONS"))
    #: Without a consumer figure, this share of the measured load counts as flexible.
    default_flexible_share: float = Field(default=0.5, ge=0, le=1, validation_alias=_env("DEFAULT_FLEXIBLE_SHARE"))
    #: A measurement older than this is no baseline.
    baseline_max_age_s: float = Field(default=3600.0, gt=0, validation_alias=_env("BASELINE_MAX_AGE_S"))
    #: Events kept per meter (the oldest finished ones are dropped beyond it).
    events_per_meter_max: int = Field(default=50, ge=1, validation_alias=_env("EVENTS_PER_METER_MAX"))
    #: Most actions one ``POST /due`` runs (the next call continues).
    due_batch: int = Field(default=50, ge=1, validation_alias=_env("DUE_BATCH"))


@functools.cache
def get_dr_settings() -> DrSettings:
    return DrSettings()


# --- wire models (bridge -> function) -----------------------------------------------
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Model(BaseModel):
    # openleadr parses every all-digit XML text as an int (ids such as "0421" included).
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)


class IntervalIn(_Model):
    start: Finite = Field(gt=0, description="epoch s")
    duration_s: Finite = Field(ge=0)
    payload: Finite


class SignalIn(_Model):
    name: str = Field(min_length=1, max_length=64)
    type: str = Field(min_length=1, max_length=64)
    id: str | None = Field(default=None, max_length=128)
    intervals: list[IntervalIn] = Field(min_length=1, max_length=MAX_INTERVALS)


class EventIn(_Model):
    """One OpenADR event as the bridge normalises it (datetimes -> epoch s, durations -> s)."""

    event_id: str = Field(min_length=1, max_length=128)
    modification_number: int = Field(ge=0)
    status: str = Field(default="far", max_length=32)
    market_context: str | None = Field(default=None, max_length=512)
    priority: int = 0
    test_event: bool = False
    start: Finite = Field(gt=0, description="active period start, epoch s")
    duration_s: Finite = Field(ge=0)
    startafter_s: Finite = Field(default=0.0, ge=0, description="randomization window (tolerance.startafter)")
    signals: list[SignalIn] = Field(min_length=1, max_length=16)
    targets: list[dict[str, Any]] = Field(default_factory=list, max_length=1000)
    response_required: Literal["always", "never"] = "always"


class Delivery(_Model):
    """One ``oadrDistributeEvent`` for one twin: every event the VTN currently holds for it."""

    meter_id: str = Field(min_length=1, max_length=64)
    ven_id: str = Field(min_length=1, max_length=128)
    vtn_id: str = Field(default="", max_length=128)
    request_id: str | None = Field(default=None, max_length=128)
    #: Validated one by one, so that one malformed event cannot spoil the others.
    events: list[dict[str, Any]] = Field(max_length=100)


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


# --- decision ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Decision:
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


# --- store ---------------------------------------------------------------------------
# KEYS[1]=due set; ARGV: now, limit. Claims (removes and returns) due members atomically.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""


class DrStore:
    """Demand-response records of one zone's Redis."""

    def __init__(self, client: StrRedis) -> None:
        self.redis = client
        self._claim = client.register_script(_CLAIM)

    # events
    def events(self, meter_id: str) -> dict[str, dict[str, Any]]:
        raw = self._do(lambda: self.redis.hgetall(keys.dr_events(meter_id)))
        return {eid: json.loads(doc) for eid, doc in raw.items()}

    def event(self, meter_id: str, event_id: str) -> dict[str, Any]:
        raw = self._do(lambda: self.redis.hget(keys.dr_events(meter_id), event_id))
        if raw is None:
            raise NotFound(f"event {event_id!r} is not known to meter {meter_id!r}", event_id=event_id)
        return dict(json.loads(raw))

    def update(self, meter_id: str, event_id: str,
               change: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> dict[str, Any] | None:
        """Read-modify-write one event record under WATCH; ``change`` may return None to leave it."""
        key = keys.dr_events(meter_id)
        for _ in range(20):
            try:
                with self.redis.pipeline(transaction=True) as pipe:
                    pipe.watch(key)
                    raw = pipe.hget(key, event_id)
                    new = change(json.loads(raw) if raw else None)
                    if new is None:
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    pipe.hset(key, event_id, json.dumps(new, separators=(",", ":")))
                    pipe.expire(key, keys.DR_RETENTION_S)
                    pipe.execute()
            except redis.WatchError:
                continue
            except redis.RedisError as exc:
                raise BackendUnavailable(f"Redis unavailable updating DR event {event_id!r} of {meter_id!r}: {exc}") \
                    from exc
            self._index(meter_id, event_id, new)
            return new
        raise BackendUnavailable(f"DR event {event_id!r} of {meter_id!r} kept changing; gave up after 20 tries")

    def _index(self, meter_id: str, event_id: str, record: dict[str, Any]) -> None:
        """The operator's per-event view; other hash slots, so outside the meter's transaction."""
        entry = {"opt": record.get("opt"), "code": record.get("response_code"),
                 "mod": record.get("modification_number"), "cancelled": record.get("cancelled"),
                 "exec": (record.get("exec") or {}).get("state"), "baseline_w": record.get("baseline_w")}
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.dr_event_meters(event_id), meter_id, json.dumps(entry, separators=(",", ":")))
        pipe.expire(keys.dr_event_meters(event_id), keys.DR_RETENTION_S)
        pipe.zadd(keys.DR_EVENT_INDEX, {event_id: float(record.get("start") or time.time())})
        pipe.zremrangebyscore(keys.DR_EVENT_INDEX, "-inf", time.time() - keys.DR_RETENTION_S)
        self._do(pipe.execute)

    def prune(self, meter_id: str, now: float) -> int:
        """Drop the oldest finished events beyond ``events_per_meter_max``."""
        limit = get_dr_settings().events_per_meter_max
        if self._do(lambda: self.redis.hlen(keys.dr_events(meter_id))) <= limit:
            return 0
        records = self.events(meter_id)
        done = sorted((r for r in records.values() if r.get("cancelled") or now >= r.get("end_at", 0)),
                      key=lambda r: r.get("end_at", 0))
        drop = [r["event_id"] for r in done[: len(records) - limit]]
        if drop:
            self._do(lambda: self.redis.hdel(keys.dr_events(meter_id), *drop))
        return len(drop)

    # preferences
    def preferences(self, meter_id: str) -> Preferences:
        raw = self._do(lambda: self.redis.get(keys.dr_preferences(meter_id)))
        return Preferences.model_validate_json(raw) if raw else Preferences()

    def set_preferences(self, meter_id: str, prefs: Preferences) -> None:
        self._do(lambda: self.redis.set(keys.dr_preferences(meter_id), prefs.model_dump_json()))

    # load control state (what the twin last asked the meter)
    def load_control(self, meter_id: str) -> dict[str, Any]:
        raw = self._do(lambda: self.redis.get(keys.dr_load_control(meter_id)))
        return dict(json.loads(raw)) if raw else {}

    def set_load_control(self, meter_id: str, state: dict[str, Any]) -> None:
        self._do(lambda: self.redis.set(keys.dr_load_control(meter_id), json.dumps(state, separators=(",", ":"))))

    # due actions
    def schedule(self, actions: list[tuple[float, dict[str, Any]]]) -> None:
        if not actions:
            return
        mapping = {json.dumps(a, separators=(",", ":"), sort_keys=True): at for at, a in actions}
        self._do(lambda: self.redis.zadd(keys.DR_DUE, mapping))

    def claim_due(self, now: float, limit: int) -> list[dict[str, Any]]:
        members = self._do(lambda: self._claim(keys=[keys.DR_DUE], args=[repr(now), limit]))
        return [json.loads(m) for m in members]

    def next_due(self) -> float | None:
        first = self._do(lambda: self.redis.zrange(keys.DR_DUE, 0, 0, withscores=True))
        return float(first[0][1]) if first else None

    @staticmethod
    def _do(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc


# --- event lifecycle ------------------------------------------------------------------
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

    decision = decide(event, prefs, twin, meter_id, delivery.ven_id, now)
    offset = existing["offset_s"] if existing and existing.get("startafter_s") == event.startafter_s \
        else round(rng.uniform(0, event.startafter_s), 3) if event.startafter_s > 0 else 0.0
    start_at = event.start + offset
    end_at = event.start + event.duration_s + offset
    plan = [[round(start_at + off, 3), w] for off, w in decision.steps]
    record: dict[str, Any] = {
        "event_id": event.event_id, "modification_number": event.modification_number,
        "vtn_status": event.status, "vtn_id": delivery.vtn_id, "ven_id": delivery.ven_id,
        "market_context": event.market_context, "priority": event.priority, "test_event": event.test_event,
        "signals": [s.model_dump() for s in event.signals], "targets": event.targets,
        "start": event.start, "duration_s": event.duration_s, "startafter_s": event.startafter_s,
        "offset_s": offset, "start_at": round(start_at, 3), "end_at": round(end_at, 3),
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
        _set_exec(record, "scheduled" if now < start_at else record["exec"]["state"], now)
    elif was_applied:
        # Modified into an opt-out or a no-op while the meter is limited: restore now.
        actions.append((now, {**base, "k": "end"}))
    store.update(meter_id, event.event_id, lambda _old: record)
    _schedule_or_run(store, actions, now)
    return _answer(event.event_id, event.modification_number, decision.opt, decision.code, decision.reason)


def _schedule_or_run(store: DrStore, actions: list[tuple[float, dict[str, Any]]], now: float) -> None:
    """Schedule future actions; run the ones already due in this invocation (an event that is
    active on delivery must not wait for the next ``/due`` tick)."""
    store.schedule([(at, a) for at, a in actions if at > now])
    for at, action in actions:
        if at > now:
            continue
        try:
            _run(store, action, now)
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
        _schedule_or_run(store, [(now, {"m": meter_id, "e": event_id, "n": record["modification_number"],
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


# --- execution -------------------------------------------------------------------------
def _set_exec(record: dict[str, Any], state: str, now: float, **extra: Any) -> None:
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
            outcome = _run(store, action, now)
        except MeterTwinError as exc:
            log.warning("DR action %r failed: %s", action, exc.message)
            outcome = "failed"
            # Not lost: try again shortly (the set is the only place it lived).
            store.schedule([(now + min(5.0, get_dr_settings().ack_timeout_s), action)])
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def _run(store: DrStore, action: dict[str, Any], now: float) -> str:
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
    if kind == "end" and state.get("watts") == watts and state.get("acked") and watts is None:
        command_id = state.get("command_id")  # already unlimited and acknowledged
    else:
        cmd = commands.submit(meter_id, "load_limit", {"watts": watts}, expiry_s=expiry,
                              actor=f"dr:{event_id}")
        command_id = cmd["id"]
        store.set_load_control(meter_id, {"watts": watts, "events": owners, "command_id": command_id,
                                          "sent_at": now, "acked": False})
    phase = state_label or ("restoring" if kind == "end" else "applying")

    def change(old: dict[str, Any] | None) -> dict[str, Any] | None:
        if old is None:
            return None
        _set_exec(old, phase, now, command_id=command_id, watts=watts, attempts=attempt + 1,
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
        _set_exec(old, new_state, now, command_status=status, retrying=retry)
        return old

    store.update(meter_id, event_id, change)
    if retry:
        # Keeps the "meter_unreachable" state until an ack of the retry arrives.
        _send(store, meter_id, event_id, phase, now, attempt=int(action.get("a", 0)) + 1,
              state_label="meter_unreachable")
    return "checked"


# --- telemetry and operator views -------------------------------------------------------
def telemetry(store: DrStore, meter_ids: list[str], now: float | None = None) -> dict[str, Any]:
    """Per meter: power (W) for TELEMETRY_USAGE, and online / load-control state for status reports."""
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
    ids = store._do(lambda: store.redis.zrevrange(keys.DR_EVENT_INDEX, 0, max(0, limit - 1), withscores=True))
    return [{"event_id": e, "start": s} for e, s in ids]


def validate_delivery(data: Any) -> Delivery:
    try:
        return Delivery.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc)) from None
