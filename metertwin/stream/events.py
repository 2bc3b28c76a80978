"""Twin events: the model, and :func:`emit`, which appends them to the zone's Redis Stream.

This module is the stream capability's named interface: the twin calls one of the one-line
helpers (:func:`reading_applied`, :func:`twin_changed`, :func:`command_status`,
:func:`connection`) right after a change is stored. Emission never fails the change it
reports (the change is already accepted): a Redis error is logged and counted, not raised.

An event is a stream entry with the fields ``t`` (type), ``m`` (meter, may be empty), ``s``
(sub-topic, may be empty) and ``d`` (data, JSON text). Its topic is
``meters/<meter>/<type>[/<sub>]``, matched by the SSE service's MQTT-style ``topic`` filter.
``d`` is stored as the JSON text it arrived as (a reading's measurement), so the hot path
serializes nothing twice.
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
#: Every type the twin emits today; DR, P2P, upgrade and job events join this list as they are hooked.
TYPES: Final = frozenset({READING, REPORTED, DESIRED, DELTA, COMMAND, STATUS, EMS})

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

    @property
    def topic(self) -> str:
        """``meters/<meter>/<type>[/<sub>]``."""
        base = f"meters/{self.meter}/{self.type}"
        return f"{base}/{self.sub}" if self.sub else base

    def fields(self) -> dict[str, str]:
        """The stream entry's fields."""
        return {"t": self.type, "m": self.meter, "s": self.sub, "d": self.data}

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str]) -> Event:
        """The event of one ``XREAD``/``XRANGE`` entry (missing fields read as empty)."""
        return cls(fields.get("t", ""), fields.get("m", ""), fields.get("d") or "{}", fields.get("s", ""), entry_id)

    def to_json(self) -> str:
        """The SSE ``data:`` line's payload; ``data`` is spliced in, not re-encoded."""
        data = self.data if _is_json(self.data) else json.dumps(self.data)
        return (f'{{"id":{json.dumps(self.id)},"type":{json.dumps(self.type)},"meter":{json.dumps(self.meter)},'
                f'"topic":{json.dumps(self.topic)},"data":{data}}}')


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


# --- the twin's hooks: one call each --------------------------------------------------------------
def reading_applied(client: StrRedis, meter_id: str, measurement_json: str, seq: int) -> None:
    """A reading was applied to the twin (not a duplicate, not parked)."""
    emit(client, Event(READING, meter_id, f'{{"seq":{int(seq)},"measurement":{measurement_json}}}'))


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
