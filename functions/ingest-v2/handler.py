"""Ingest, release v2: readings into the v2 state schema (registers in Wh, history), for meters bound to v2.

Not subscribed to the meters' topics while release v1's ``edge-ingest`` is the front: the
front parks the readings of v2-bound meters in their inbox and nudges this function
(``/async-function``), which drains the inbox in seq order. Deployed as the front
(``topic`` annotation moved here once every twin is on v2), it parks and nudges the other
way for meters still bound to v1. See docs/upgrade.md.

Routes (after ``/function/<zone>-ingest-v2``):

* ``POST /meters/{meter_id}/inbox`` (service) — drain the readings parked for v2.
* ``POST /`` from the MQTT connector (``X-Topic: meters/<id>/up/reading`` or ``.../status``).
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
from metertwin.binding import register_inbox_route
from metertwin.clients import get_redis
from metertwin.errors import InvalidInput
from metertwin.http import Context, Event, Request, Response, Router, json_response, parse_json
from metertwin.messages import Reading
from metertwin.twin import twin_store
from metertwin.twin_v2 import v2_ingest

router = Router()
RELEASE = "v2"
MAX_READING_BYTES = 4096
register_inbox_route(router, v2_ingest)


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
        outcome = v2_ingest(get_redis()).run(meter_id, measurement, reading.ts, reading.seq,
                                             req.header("Authorization"))
        return json_response(outcome.to_dict(meter_id, reading.seq))
    if topic == topics.status(meter_id):
        # Online status lives in the twin hash's reported settings, unchanged by v2.
        state = req.event.body.decode(errors="replace").strip().strip('"')
        if state not in ("online", "offline"):
            raise InvalidInput(f"status {state[:40]!r} is not 'online' or 'offline'", field="body")
        version = twin_store(get_redis()).report(meter_id, {"online": state == "online"}, ts=time.time())
        return json_response({"meter_id": meter_id, "online": state == "online", "version": version})
    raise InvalidInput(f"topic {topic!r} is not a reading or status topic", field="X-Topic")


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
