"""What meters publish, as the MQTT connector hands it to a function: ``POST /`` with ``X-Topic``.

Shared by every function subscribed to a meter uplink topic, so that each parses the topic,
validates the reading and records the online status the same way.

What is not applied is answered 4xx with the reason (the connector acknowledges it and logs
the answer) or 503 (the connector retries). The edge keeps no dead letters of its own: the
fog's MDMS ingest receives the same readings through its own subscription and dead-letters
what it rejects, and it rejects what the edge rejects, because both apply the same rules
(:class:`~metertwin.twin.messages.Reading`, :class:`~metertwin.twin.messages.TimestampRule`,
:mod:`metertwin.core.json_limits`). See docs/mdms.md, "One rule at edge and fog".
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from metertwin.core import json_limits, mqtt_batch, topics
from metertwin.core.clients import StrRedis, get_redis
from metertwin.core.errors import (
    BackendUnavailable,
    InvalidInput,
    MeterTwinError,
    PayloadTooLarge,
    UnknownMeter,
    http_status,
)
from metertwin.core.http import METER_ID_RE, Request, Response, Router, json_response, parse_json, validate
from metertwin.core.settings import get_settings
from metertwin.stream import events
from metertwin.twin.concentrators import Concentrators
from metertwin.twin.messages import Reading, TimestampRule
from metertwin.twin.state import twin_store
from metertwin.upgrade.inbox import IngestScript

MAX_READING_BYTES = 4096


def meter_topic(req: Request) -> tuple[str, str]:
    """(meter id, topic) of a connector call; a missing or foreign ``X-Topic`` is a 400 naming it."""
    topic = req.header("X-Topic") or ""
    try:
        meter_id = topics.meter_id_of(topic)
    except ValueError as exc:
        raise InvalidInput(f"X-Topic: {exc}", field="X-Topic") from None
    return meter_id, topic


#: One reading waiting for the batch's round trip: (meter, measurement JSON, ts, seq, concentrator or '').
Item = tuple[str, str, float, int, str]


def _reading(meter_id: str, data: Any, now: float, rule: TimestampRule) -> tuple[str, float, int]:
    """(measurement JSON, ts, seq) of one reading; InvalidInput naming the bad value otherwise."""
    reading = validate(data, Reading)
    # The fog's rule: a reading from the future would win every later one in the cache.
    rule.check(reading.ts, now)
    return json.dumps(reading.model_dump(exclude={"seq"}), separators=(",", ":")), reading.ts, reading.seq


def concentrator_items(concentrator_id: str, body: bytes) -> tuple[list[Item], list[dict[str, Any]]]:
    """The readings of a concentrator's batch, and those refused on their own (with the reason)."""
    s = get_settings()
    if len(body) > s.concentrator_max_bytes:
        raise PayloadTooLarge(f"concentrator batch of {len(body)} bytes exceeds {s.concentrator_max_bytes} bytes")
    try:
        data = json_limits.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"concentrator batch is not valid JSON: {str(exc)[:200]}") from None
    readings = data.get("readings") if isinstance(data, dict) else None
    if not isinstance(readings, list):
        raise InvalidInput("concentrator batch has no 'readings' list", field="readings")
    if len(readings) > s.concentrator_max_readings:
        raise PayloadTooLarge(f"concentrator batch of {len(readings)} readings exceeds {s.concentrator_max_readings}")
    now, rule = time.time(), TimestampRule.from_env()
    items: list[Item] = []
    rejected: list[dict[str, Any]] = []
    for i, raw in enumerate(readings):
        meter_id = raw.get("meter_id") if isinstance(raw, dict) else None
        try:
            if not isinstance(meter_id, str) or not METER_ID_RE.match(meter_id):
                raise InvalidInput(f"readings[{i}].meter_id {str(meter_id)[:80]!r} is not a meter id")
            mjson, ts, seq = _reading(meter_id, {k: v for k, v in raw.items() if k != "meter_id"}, now, rule)
        except InvalidInput as exc:
            rejected.append({"index": i, "meter_id": meter_id if isinstance(meter_id, str) else None,
                             "result": "rejected", "rule": getattr(exc, "rule", "schema"), "reason": exc.message})
            continue
        items.append((meter_id, mjson, ts, seq, concentrator_id))
    return items, rejected


def ingest_messages(script: IngestScript, messages: list[tuple[str, bytes]],
                    authorization: str | None) -> list[tuple[int, dict[str, Any]]]:
    """(status, body) per MQTT message; every reading of every message in one pipelined round trip.

    A Redis failure raises :class:`BackendUnavailable` for the whole call (nothing is acknowledged;
    the redelivered readings already applied are duplicates).
    """
    answers: list[tuple[int, dict[str, Any]] | None] = [None] * len(messages)
    items: list[Item] = []
    spans: dict[int, tuple[int, int, list[dict[str, Any]]]] = {}
    for n, (topic, payload) in enumerate(messages):
        try:
            if topic.startswith(topics.CONCENTRATOR_ROOT + "/"):
                concentrator_id = topics.concentrator_id_of(topic)
                if topic != topics.concentrator_readings(concentrator_id):
                    raise InvalidInput(f"topic {topic!r} is not a concentrator readings topic", field="X-Topic")
                batch, rejected = concentrator_items(concentrator_id, payload)
                spans[n] = (len(items), len(batch), rejected)
                items += batch
                continue
            meter_id, _ = _meter_of(topic)
            if topic == topics.readings(meter_id):
                if len(payload) > MAX_READING_BYTES:
                    raise PayloadTooLarge(f"reading of {len(payload)} bytes exceeds {MAX_READING_BYTES} bytes")
                mjson, ts, seq = _reading(meter_id, json_limits.loads(payload), time.time(), TimestampRule.from_env())
                spans[n] = (len(items), 1, [])
                items.append((meter_id, mjson, ts, seq, ""))
            elif topic == topics.status(meter_id):
                answers[n] = (200, _status(meter_id, payload))
            else:
                raise InvalidInput(f"topic {topic!r} is not a reading or status topic", field="X-Topic")
        except (UnicodeDecodeError, ValueError) as exc:
            answers[n] = (400, InvalidInput(f"reading is not valid JSON: {str(exc)[:200]}").to_dict())
        except MeterTwinError as exc:
            if isinstance(exc, BackendUnavailable):
                raise
            answers[n] = (http_status(exc), exc.to_dict())
    outcomes = script.run_many(items, authorization)
    for n, (start, count, rejected) in spans.items():
        topic = messages[n][0]
        if topic.startswith(topics.CONCENTRATOR_ROOT + "/"):
            results = outcomes[start:start + count]
            refused = rejected + [r for r in results if r["result"] == "rejected"]
            concentrator_id = topics.concentrator_id_of(topic)
            Concentrators(script.client, None).record_rejections(concentrator_id, refused)
            counts = {k: sum(1 for r in results if r["result"] == k) for k in ("applied", "duplicate", "parked")}
            answers[n] = (200, {"concentrator_id": concentrator_id, "received": count + len(rejected), **counts,
                                "rejected": len(refused), "not_applied": refused[:100]})
        else:
            out = outcomes[start]
            if out["result"] == "rejected":
                unknown = UnknownMeter(out["reason"], meter_id=out["meter_id"])
                answers[n] = (http_status(unknown), unknown.to_dict())
            else:
                answers[n] = (200, out)
    return [a if a is not None else (500, {"error": "internal_error"}) for a in answers]


def _meter_of(topic: str) -> tuple[str, str]:
    try:
        return topics.meter_id_of(topic), topic
    except ValueError as exc:
        raise InvalidInput(f"X-Topic: {exc}", field="X-Topic") from None


def _status(meter_id: str, payload: bytes) -> dict[str, Any]:
    # The meter's retained will message: plain text (or a JSON string) online/offline.
    state = payload.decode(errors="replace").strip().strip('"')
    if state not in ("online", "offline"):
        raise InvalidInput(f"status {state[:40]!r} is not 'online' or 'offline'", field="body")
    version = twin_store(get_redis()).report(meter_id, {"online": state == "online"}, ts=time.time())
    events.connection(get_redis(), meter_id, state == "online")
    return {"meter_id": meter_id, "online": state == "online", "version": version}


def register_reading_routes(router: Router, ingest: Callable[[StrRedis], IngestScript]) -> None:
    """``POST /`` for ``meters/<id>/up/reading`` (through ``ingest``'s script), ``.../up/status`` and a
    concentrator's ``dcu/<id>/up/readings``; ``POST /mqtt-batch`` for the connector's batches of them."""

    @router.post(mqtt_batch.PATH, scopes={"service"})
    def on_batch(req: Request) -> Response:
        messages = mqtt_batch.decode(req.event.body)
        results = ingest_messages(ingest(get_redis()), messages, req.header("Authorization"))
        return json_response(mqtt_batch.answer(results))

    @router.post("/", scopes={"service"})
    def on_message(req: Request) -> Response:
        if (req.header("X-Topic") or "").startswith(topics.CONCENTRATOR_ROOT + "/"):
            [(status, body)] = ingest_messages(ingest(get_redis()), [(req.header("X-Topic") or "", req.event.body)],
                                               req.header("Authorization"))
            return json_response(body, status)
        meter_id, topic = meter_topic(req)
        if topic == topics.readings(meter_id):
            reading = parse_json(req.event.body, Reading, max_bytes=MAX_READING_BYTES)
            # The fog's rule: a reading from the future would win every later one in the cache.
            TimestampRule.from_env().check(reading.ts, time.time())
            measurement = json.dumps(reading.model_dump(exclude={"seq"}), separators=(",", ":"))
            outcome = ingest(get_redis()).run(meter_id, measurement, reading.ts, reading.seq,
                                              req.header("Authorization"))
            return json_response(outcome.to_dict(meter_id, reading.seq))
        if topic == topics.status(meter_id):
            return json_response(_status(meter_id, req.event.body))
        raise InvalidInput(f"topic {topic!r} is not a reading or status topic", field="X-Topic")
