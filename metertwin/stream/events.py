"""Twin events: the model, and :func:`emit`, which appends them to the zone's Redis Stream.

This module is the stream capability's named interface: the twin calls one of the one-line
helpers (:func:`reading_applied`, :func:`twin_changed`, :func:`command_status`,
:func:`connection`) right after a change is stored. Emission never fails the change it
reports (the change is already accepted): a Redis error is logged and counted, not raised.

An event is a stream entry with the fields ``t`` (type), ``m`` (meter, may be empty), ``s``
(sub-topic, may be empty), ``d`` (data, JSON text) and, for an event about no one meter,
``o`` (what it is about: a market, an operation, a job, a grid node). Its topic is
``meters/<meter>/<type>[/<sub>]``, or ``<type>/<about>[/<sub>]`` without a meter (a P2P
round: ``p2p/<market>/round``), matched by the SSE service's MQTT-style ``topic`` filter.
``d`` is stored as the JSON text it arrived as (a reading's measurement), so the hot path
serializes nothing twice.

A capability whose change is written by a pipeline appends its events in that same pipeline
(:func:`queue`), so an event costs no extra round trip; the builders below (``*_event``) make
the :class:`Event` for it. The payload of every type is documented in docs/stream.md.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Final

import redis

from metertwin.core.clients import StrRedis
from metertwin.core.settings import get_settings
from metertwin.stream import keys
from metertwin.stream.settings import get_stream_settings
from metertwin.twin import keys as twin_keys

log = logging.getLogger("metertwin.stream")

READING: Final = "reading"
REPORTED: Final = "reported"
DESIRED: Final = "desired"
DELTA: Final = "delta"
COMMAND: Final = "command"
STATUS: Final = "status"
EMS: Final = "ems"
#: A demand-response event's record changed (sub: the change, :data:`DR_CHANGES`).
DR: Final = "dr"
#: A P2P market: a negotiation round (no meter), its clearing (no meter), a twin's trade (its meter).
P2P: Final = "p2p"
#: An upgrade operation's state (no meter), or one twin's step in it (its meter).
UPGRADE: Final = "upgrade"
#: A bulk job's progress (no meter), or one twin's execution in it (its meter).
JOB: Final = "job"
#: A grid rule's alert on a node (no meter).
ALERT: Final = "alert"
#: Every event type.
TYPES: Final = frozenset({READING, REPORTED, DESIRED, DELTA, COMMAND, STATUS, EMS, DR, P2P, UPGRADE, JOB, ALERT})
#: The ``sub`` of a ``dr`` event: what changed in the event's record.
DR_CHANGES: Final = ("received", "modified", "opted_in", "opted_out", "cancelled", "active", "completed",
                     "execution")

#: Age trimming (``XTRIM MINID``) runs at most this often per process: it is O(trimmed), but a
#: call per append would double the appends' round trips.
TRIM_EVERY_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class Event:
    """One twin event. ``data`` is JSON text; ``id`` is the stream id once stored."""

    type: str
    meter: str
    data: str = "{}"
    sub: str = ""
    id: str = ""
    #: What an event without a meter is about (market, operation, job, ``<level>/<node>``).
    about: str = ""

    @property
    def topic(self) -> str:
        """``meters/<meter>/<type>[/<sub>]``, or ``<type>/<about>[/<sub>]`` for an event of no meter."""
        base = f"meters/{self.meter}/{self.type}" if self.meter else f"{self.type}/{self.about or '-'}"
        return f"{base}/{self.sub}" if self.sub else base

    def fields(self) -> dict[str, str]:
        """The stream entry's fields (``o`` only when set: readings stay as small as they were)."""
        out = {"t": self.type, "m": self.meter, "s": self.sub, "d": self.data}
        if self.about:
            out["o"] = self.about
        return out

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str]) -> Event:
        """The event of one ``XREAD``/``XRANGE`` entry (missing fields read as empty)."""
        return cls(fields.get("t", ""), fields.get("m", ""), fields.get("d") or "{}", fields.get("s", ""), entry_id,
                   fields.get("o", ""))

    def to_json(self) -> str:
        """The SSE ``data:`` line's payload; ``data`` is spliced in, not re-encoded."""
        data = self.data if _is_json(self.data) else json.dumps(self.data)
        about = f',"about":{json.dumps(self.about)}' if self.about else ""
        return (f'{{"id":{json.dumps(self.id)},"type":{json.dumps(self.type)},"meter":{json.dumps(self.meter)},'
                f'"topic":{json.dumps(self.topic)}{about},"data":{data}}}')


def _is_json(text: str) -> bool:
    # Stored by emit() from json.dumps or from a validated reading; an entry written by hand may not be.
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class Emitter:
    """Appends events to the zone's stream through one Redis client (one per client and process)."""

    def __init__(self, client: StrRedis) -> None:
        self.client = client
        self._last_trim = 0.0
        #: Events that could not be appended (Redis down): logged, counted, never raised.
        self.failed = 0

    def emit(self, *events: Event) -> None:
        """Append ``events`` in one round trip, trimming by length always and by age once a second."""
        settings = get_stream_settings()
        if not settings.enabled or not events:
            return
        key = keys.zone_events(get_settings().zone)
        now = time.time()
        trim = now - self._last_trim >= TRIM_EVERY_S
        try:
            if len(events) == 1 and not trim:
                # The hot path: one reading, one XADD, no pipeline object.
                self.client.xadd(key, events[0].fields(), maxlen=settings.maxlen, approximate=True)
                return
            pipe = self.client.pipeline(transaction=False)
            for event in events:
                pipe.xadd(key, event.fields(), maxlen=settings.maxlen, approximate=True)
            if trim:
                self._last_trim = now
                pipe.xtrim(key, minid=str(int((now - settings.retention_s) * 1000)), approximate=True)
            pipe.execute()
        except redis.RedisError as exc:
            self.failed += len(events)
            log.warning("could not append %d event(s) to %s: %s", len(events), key, exc)

    def queue(self, pipe: Any, *events: Event) -> None:
        """Queue the appends of ``events`` (and the age trim when due) on ``pipe``, a non-transactional
        pipeline the caller executes with its own writes: no round trip of their own. (Not a MULTI:
        on Redis Cluster the stream key is in another slot.)"""
        settings = get_stream_settings()
        if not settings.enabled or not events:
            return
        key = keys.zone_events(get_settings().zone)
        for event in events:
            pipe.xadd(key, event.fields(), maxlen=settings.maxlen, approximate=True)
        now = time.time()
        if now - self._last_trim >= TRIM_EVERY_S:
            self._last_trim = now
            pipe.xtrim(key, minid=str(int((now - settings.retention_s) * 1000)), approximate=True)


def ems_message(meter_id: str, direction: str, message_id: str, status: str, payload: Any = None,
                reason: str = "") -> Event:
    """An EMS message forwarded between a meter and its home EMS: ``sub`` ``up`` (meter to EMS) or
    ``down`` (EMS to meter); ``status`` delivered, failed or undeliverable, with the reason."""
    data = {"direction": direction, "id": message_id, "status": status, "reason": reason, "payload": payload}
    return Event(EMS, meter_id, json.dumps(data, separators=(",", ":")), "up" if direction == "meter->ems" else "down")


_emitters: dict[int, Emitter] = {}


def emitter(client: StrRedis) -> Emitter:
    """The :class:`Emitter` of ``client``, built once."""
    found = _emitters.get(id(client))
    if found is None or found.client is not client:
        found = _emitters[id(client)] = Emitter(client)
    return found


def emit(client: StrRedis, *events: Event) -> None:
    """Append ``events`` to the zone's stream (see :meth:`Emitter.emit`)."""
    emitter(client).emit(*events)


def queue(client: StrRedis, pipe: Any, *events: Event) -> None:
    """Append ``events`` in ``pipe``, a non-transactional pipeline of ``client`` that the caller
    executes with the change they report (see :meth:`Emitter.queue`)."""
    emitter(client).queue(pipe, *events)


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), default=str)


# --- the twin's hooks: one call each --------------------------------------------------------------
def reading_event(meter_id: str, measurement_json: str, seq: int) -> Event:
    """The event of an applied reading (a batch emits many in one :func:`emit`)."""
    return Event(READING, meter_id, f'{{"seq":{int(seq)},"measurement":{measurement_json}}}')


def reading_applied(client: StrRedis, meter_id: str, measurement_json: str, seq: int) -> None:
    """A reading was applied to the twin (not a duplicate, not parked)."""
    emit(client, reading_event(meter_id, measurement_json, seq))


def twin_changed(client: StrRedis, meter_id: str, field: str, values: dict[str, Any], version: int) -> None:
    """Reported (``field='r'``) or desired (``'d'``) settings were merged; emits the delta too when it may move.

    The delta is read back from the twin (one ``HMGET``): settings change rarely, unlike readings.
    """
    kind = REPORTED if field == "r" else DESIRED
    out = [Event(kind, meter_id, json.dumps({"values": values, "version": version}, separators=(",", ":")))]
    try:
        reported_raw, desired_raw = client.hmget(twin_keys.twin(meter_id), ["r", "d"])
        reported, desired = json.loads(reported_raw or "{}"), json.loads(desired_raw or "{}")
    except (redis.RedisError, ValueError) as exc:
        log.warning("delta of %s not emitted: %s", meter_id, exc)
    else:
        if kind == DESIRED or set(values) & set(desired):
            delta = {k: v[0] for k, v in desired.items() if k not in reported or reported[k][0] != v[0]}
            out.append(Event(DELTA, meter_id, json.dumps({"delta": delta, "version": version}, separators=(",", ":"))))
    emit(client, *out)


def command_status(client: StrRedis, meter_id: str, command_id: str, status: str, kind: str = "") -> None:
    """A command was created (``pending``) or moved to ``status``."""
    data = {"id": command_id, "status": status, **({"kind": kind} if kind else {})}
    emit(client, Event(COMMAND, meter_id, json.dumps(data, separators=(",", ":")), status))


def connection(client: StrRedis, meter_id: str, online: bool) -> None:
    """The meter went online or offline (its retained status message)."""
    state = "online" if online else "offline"
    emit(client, Event(STATUS, meter_id, json.dumps({"online": online}), state))


# --- capabilities' events: builders (for :func:`queue`) and one-call emitters ---------------------
def dr_event(meter_id: str, event_id: str, change: str, record: dict[str, Any]) -> Event:
    """A DR event's record of ``meter_id`` changed; ``change`` is one of :data:`DR_CHANGES`.

    Data: ``{"event_id", "modification_number", "opt", "exec", "cancelled", "start_at", "end_at"}``
    (``exec``: the execution state, e.g. ``scheduled``, ``applying``, ``applied``, ``restored``).
    """
    data = {"event_id": event_id, "modification_number": record.get("modification_number"),
            "opt": record.get("opt"), "exec": (record.get("exec") or {}).get("state"),
            "cancelled": bool(record.get("cancelled")), "start_at": record.get("start_at"),
            "end_at": record.get("end_at")}
    return Event(DR, meter_id, _json(data), change)


def p2p_round(market_id: str, record: dict[str, Any]) -> Event:
    """One negotiation round of a market (one event per round, not per bid).

    Data: ``{"market_id", "round", "price", "excess_kwh", "buy_kwh", "sell_kwh", "answered", "missing", "rule"}``
    (``missing``: how many twins did not answer, a count).
    """
    data = {"market_id": market_id, **{k: record.get(k) for k in ("round", "price", "excess_kwh", "buy_kwh",
                                                                   "sell_kwh", "answered", "rule")},
            "missing": len(record.get("missing") or ())}
    return Event(P2P, "", _json(data), "round", about=market_id)


def p2p_market(market_id: str, status: str, result: dict[str, Any] | None = None) -> Event:
    """A market's outcome: ``status`` ``cleared`` (data: the result's ``price``, ``rounds``,
    ``participants``, ``bought_kwh``, ``sold_kwh``, ``converged``) or ``failed`` (data: ``error``)."""
    keep = ("price", "rounds", "participants", "bought_kwh", "sold_kwh", "converged", "error")
    data = {"market_id": market_id, "status": status, **{k: v for k, v in (result or {}).items() if k in keep}}
    return Event(P2P, "", _json(data), status, about=market_id)


def p2p_trade(market_id: str, trade: dict[str, Any]) -> Event:
    """A twin's trade (its settlement line) in a cleared market, an event of its meter.

    Data: ``{"market_id", "side", "kwh", "price", "amount", "benefit", "slot_start"}``.
    """
    data = {"market_id": market_id, **{k: trade.get(k) for k in ("side", "kwh", "price", "amount", "benefit",
                                                                 "slot_start")}}
    return Event(P2P, str(trade.get("meter_id", "")), _json(data), "trade")


def upgrade_state(op_id: str, state: str, **extra: Any) -> Event:
    """An upgrade operation moved to ``state``. Data: ``{"op", "state"}`` plus ``reason``/``from``/``to`` when known."""
    data = {"op": op_id, "state": state, **{k: v for k, v in extra.items() if v not in (None, "")}}
    return Event(UPGRADE, "", _json(data), state, about=op_id)


def upgrade_twin(op_id: str, meter_id: str, step: str, reason: str = "") -> Event:
    """One twin's step in an upgrade operation: ``switched``, ``rejected``, ``failed``, ``skipped``,
    ``rolled_back``. Data: ``{"op", "step", "reason"?}``."""
    data = {"op": op_id, "step": step, **({"reason": reason[:300]} if reason else {})}
    return Event(UPGRADE, meter_id, _json(data), step)


def job_event(job_id: str, status: str, counts: dict[str, int] | None = None, **extra: Any) -> Event:
    """A bulk job's progress: its ``status`` (``queued``, ``in_progress``, ``paused``, ``completed``,
    ``cancelled``, ``aborted``...) and its executions counted by status.

    Data: ``{"job", "status", "counts": {"succeeded": n, "failed": n, ...}}`` plus ``extra``
    (e.g. ``total``, ``reason``). Emit it at each status change and at most once per slice, not per twin.
    """
    data = {"job": job_id, "status": status, "counts": dict(counts or {}), **extra}
    return Event(JOB, "", _json(data), status, about=job_id)


def job_execution(job_id: str, meter_id: str, status: str, reason: str = "") -> Event:
    """One twin's execution in a job reached ``status`` (``succeeded``, ``failed``, ``rejected``,
    ``timed_out``, ``cancelled``). Data: ``{"job", "status", "reason"?}``."""
    data = {"job": job_id, "status": status, **({"reason": reason[:300]} if reason else {})}
    return Event(JOB, meter_id, _json(data), status)


def alert_event(level: str, node: str, state: str, alert: dict[str, Any]) -> Event:
    """A grid rule's alert on node ``<level>/<node>`` was ``raised``, ``cleared`` (or ``acknowledged``).

    Topic ``alert/<level>/<node>/<state>``. Data: ``{"level", "node", "state"}`` plus the alert's
    ``id``, ``rule_id``, ``rule``, ``metric``, ``value``, ``threshold``, ``severity``, ``at`` when given.
    """
    keep = ("id", "rule_id", "rule", "metric", "value", "threshold", "severity", "at")
    data = {"level": level, "node": node, "state": state, **{k: v for k, v in alert.items() if k in keep}}
    return Event(ALERT, "", _json(data), state, about=f"{level}/{node}")


def job_changed(client: StrRedis, job_id: str, status: str, counts: dict[str, int] | None = None,
                **extra: Any) -> None:
    """Emit :func:`job_event` (for a caller with no pipeline of its own to :func:`queue` it in)."""
    emit(client, job_event(job_id, status, counts, **extra))


def alert_changed(client: StrRedis, level: str, node: str, state: str, alert: dict[str, Any]) -> None:
    """Emit :func:`alert_event` (for a caller with no pipeline of its own to :func:`queue` it in)."""
    emit(client, alert_event(level, node, state, alert))
