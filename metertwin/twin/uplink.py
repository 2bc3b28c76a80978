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

from metertwin.core import topics
from metertwin.core.clients import StrRedis, get_redis
from metertwin.core.errors import InvalidInput
from metertwin.core.http import Request, Response, Router, json_response, parse_json
from metertwin.stream import events
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


def register_reading_routes(router: Router, ingest: Callable[[StrRedis], IngestScript]) -> None:
    """``POST /`` for ``meters/<id>/up/reading`` (through ``ingest``'s script) and ``.../up/status``."""

    @router.post("/", scopes={"service"})
    def on_message(req: Request) -> Response:
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
            # The meter's retained will message: plain text (or a JSON string) online/offline.
            state = req.event.body.decode(errors="replace").strip().strip('"')
            if state not in ("online", "offline"):
                raise InvalidInput(f"status {state[:40]!r} is not 'online' or 'offline'", field="body")
            version = twin_store(get_redis()).report(meter_id, {"online": state == "online"}, ts=time.time())
            events.connection(get_redis(), meter_id, state == "online")
            return json_response({"meter_id": meter_id, "online": state == "online", "version": version})
        raise InvalidInput(f"topic {topic!r} is not a reading or status topic", field="X-Topic")
