"""Ingest: the meter's periodic readings and online status into the twin's reported state.

Triggered by the MQTT connector (stack.yml annotation ``topic``) with the message as
body and ``X-Topic`` naming the topic:

* ``meters/<id>/up/reading`` — a :class:`~metertwin.messages.Reading` (QoS1). A
  redelivered sequence number is acknowledged but counted once (``duplicate``).
* ``meters/<id>/up/status`` — ``online`` / ``offline`` (the meter's will message).

The fog zone's MDMS ingest (validation, hot/cold storage) subscribes to the same
readings independently.
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

import json
import time

from metertwin import topics
from metertwin.binding import register_inbox_route, v1_ingest
from metertwin.clients import get_redis
from metertwin.errors import InvalidInput
from metertwin.http import Context, Event, Request, Response, Router, json_response, parse_json
from metertwin.messages import Reading
from metertwin.twin import twin_store

router = Router()
MAX_READING_BYTES = 4096
# Readings of meters bound to another release are parked for it and it is nudged (metertwin.binding).
register_inbox_route(router, v1_ingest)


@router.post("/", scopes={"service"})
def on_message(req: Request) -> Response:
    topic = req.header("X-Topic") or ""
    try:
        meter_id = topics.meter_id_of(topic)
    except ValueError as exc:
        raise InvalidInput(f"X-Topic: {exc}", field="X-Topic") from None
    if topic == topics.readings(meter_id):
        reading = parse_json(req.event.body, Reading, max_bytes=MAX_READING_BYTES)
        measurement = json.dumps(reading.model_dump(exclude={"seq"}), separators=(",", ":"))
        outcome = v1_ingest(get_redis()).run(meter_id, measurement, reading.ts, reading.seq,
                                             req.header("Authorization"))
        return json_response(outcome.to_dict(meter_id, reading.seq))
    if topic == topics.status(meter_id):
        state = req.event.body.decode(errors="replace").strip().strip('"')
        if state not in ("online", "offline"):
            raise InvalidInput(f"status {state[:40]!r} is not 'online' or 'offline'", field="body")
        version = twin_store(get_redis()).report(meter_id, {"online": state == "online"}, ts=time.time())
        return json_response({"meter_id": meter_id, "online": state == "online", "version": version})
    raise InvalidInput(f"topic {topic!r} is not a reading or status topic", field="X-Topic")


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
