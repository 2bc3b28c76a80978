"""MQTT messages into VEE, many at a time: single readings and concentrators' batches.

``POST /`` (one message) and ``POST /mqtt-batch`` (the connector's batch, :mod:`metertwin.core.mqtt_batch`)
of ``fog-mdms-ingest`` both come here. Every reading of every message goes through
:func:`metertwin.mdms.vee.ingest` together: validated one by one, then applied with one pipelined
round trip of per-meter scripts (:func:`metertwin.mdms.hot_store.ingest_many`); a bad reading is
dead-lettered alone, with its rule, and the rest of its message is applied. Each script is atomic
and deduplicates by ``seq``, so a batch redelivered after a crash applies exactly what was missing.
"""

from __future__ import annotations

from typing import Any

from metertwin.core import json_limits, topics
from metertwin.core.errors import InvalidInput, MeterTwinError, http_status
from metertwin.core.settings import get_settings
from metertwin.mdms import dead_letters, vee

SOURCE = "concentrator"


def _concentrator_candidates(topic: str, payload: bytes) -> list[vee.Candidate]:
    """One candidate per reading of a concentrator's batch; a batch that is no list of readings is
    dead-lettered whole (rule ``schema``/``oversized``/``json``) and raised as rejected."""
    s = get_settings()
    reason = rule = ""
    readings: Any = None
    if len(payload) > s.concentrator_max_bytes:
        rule, reason = "oversized", f"concentrator batch of {len(payload)} bytes exceeds {s.concentrator_max_bytes}"
    else:
        try:
            data = json_limits.loads(payload)
            readings = data.get("readings") if isinstance(data, dict) else None
            if not isinstance(readings, list):
                rule, reason = "schema", "concentrator batch has no 'readings' list"
            elif len(readings) > s.concentrator_max_readings:
                rule, reason = "oversized", (f"concentrator batch of {len(readings)} readings exceeds "
                                             f"{s.concentrator_max_readings}")
        except json_limits.JsonTooDeep as exc:
            rule, reason = "depth", exc.message
        except (UnicodeDecodeError, ValueError) as exc:
            rule, reason = "json", f"concentrator batch is not valid JSON: {str(exc)[:200]}"
    if rule:
        entry = dead_letters.add(meter_id="", source=SOURCE, payload=payload, rule=rule, reason=reason, topic=topic)
        raise vee.ReadingRejected(f"concentrator batch rejected ({rule}): {reason}", rule=rule, reason=reason,
                                  dead_letter_id=entry)
    out = []
    for raw in readings:
        meter_id = raw.get("meter_id") if isinstance(raw, dict) else None
        body = {k: v for k, v in raw.items() if k != "meter_id"} if isinstance(raw, dict) else raw
        out.append(vee.Candidate(meter_id if isinstance(meter_id, str) else "", body, SOURCE, topic))
    return out


def ingest_messages(messages: list[tuple[str, bytes]]) -> list[tuple[int, dict[str, Any]]]:
    """(status, body) per message; every reading of every message in one :func:`vee.ingest`.

    A backend failure raises for the whole call (nothing acknowledged; a redelivery finds the
    readings already applied duplicates).
    """
    answers: list[tuple[int, dict[str, Any]] | None] = [None] * len(messages)
    candidates: list[vee.Candidate] = []
    spans: dict[int, tuple[int, int]] = {}
    for n, (topic, payload) in enumerate(messages):
        try:
            if topic.startswith(topics.CONCENTRATOR_ROOT + "/"):
                topics.concentrator_id_of(topic)
                if topic != topics.concentrator_readings(topics.concentrator_id_of(topic)):
                    raise InvalidInput(f"topic {topic!r} is not a concentrator readings topic", field="X-Topic")
                batch = _concentrator_candidates(topic, payload)
            else:
                batch = [vee.Candidate(vee.reading_meter(topic, payload), payload, "mqtt", topic)]
        except ValueError as exc:
            answers[n] = (400, InvalidInput(f"X-Topic: {exc}", field="X-Topic").to_dict())
            continue
        except MeterTwinError as exc:
            if http_status(exc) >= 500:
                raise
            answers[n] = (http_status(exc), exc.to_dict())
            continue
        spans[n] = (len(candidates), len(batch))
        candidates += batch
    verdicts = vee.ingest(candidates)
    for n, (start, count) in spans.items():
        topic = messages[n][0]
        got = verdicts[start:start + count]
        if topic.startswith(topics.CONCENTRATOR_ROOT + "/"):
            counts = {k: sum(1 for v in got if v.status == k) for k in ("accepted", "duplicate", "rejected")}
            answers[n] = (200, {"concentrator_id": topics.concentrator_id_of(topic), "received": count, **counts,
                                "not_accepted": [v.to_dict() for v in got if v.status == "rejected"][:100]})
            continue
        verdict = got[0]
        if verdict.status == "rejected":
            error = vee.ReadingRejected(f"reading of {verdict.meter_id} rejected ({verdict.rule}): {verdict.reason}",
                                        **verdict.to_dict())
            answers[n] = (http_status(error), error.to_dict())
        else:
            answers[n] = (200, verdict.to_dict())
    return [a if a is not None else (500, {"error": "internal_error"}) for a in answers]
