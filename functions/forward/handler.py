"""Forward capability: messages between the meter and its home EMS pass through the twin.

The twin does not interpret the payload; it routes it and records delivery.
Routes (after ``/function/<zone>-forward``):

* ``PUT /meters/{meter_id}/ems/route`` ``{"kind": "mqtt"|"webhook", "target"}`` — where
  meter->EMS messages go: an MQTT topic in the meter's own ``ems/<id>/`` namespace (default
  ``ems/<id>/inbox``) or an operator-approved one, or an http(s) URL that passes the outbound
  destination policy (checked here and at every send: :mod:`metertwin.twin.ems_routes`).
* ``GET /meters/{meter_id}/ems/route``
* ``POST /meters/{meter_id}/ems/messages`` ``{"id"?, "payload"}`` — EMS -> meter.
* ``GET /meters/{meter_id}/ems/messages?limit=`` — both directions, with delivery status.
* ``POST /`` from the MQTT connector (``X-Topic: meters/<id>/up/ems``) — meter -> EMS.
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

import time
import uuid
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, model_validator

from metertwin.core import topics
from metertwin.core.clients import get_mqtt, get_redis
from metertwin.core.errors import BackendUnavailable, InvalidInput, NotFound
from metertwin.core.http import Context, Event, Request, Response, Router, json_response, parse_json, query_float
from metertwin.core.settings import get_settings
from metertwin.stream import events
from metertwin.twin import ems_routes, keys
from metertwin.twin.messages import EmsMessage
from metertwin.twin.state import twin_store
from metertwin.twin.uplink import meter_topic

router = Router()
HOME = {"consumer", "ems", "utility"}
MAX_MESSAGE_BYTES = 65_536


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["mqtt", "webhook"]
    target: str | None = Field(default=None, max_length=512)

    @model_validator(mode="after")
    def _check_target(self) -> Route:
        if self.kind == "webhook":
            if not self.target or not self.target.startswith(("http://", "https://")):
                raise ValueError(f"webhook target {self.target!r} must be an http(s) URL")
        elif self.target is not None and (
            any(c in self.target for c in "+#") or self.target.startswith((topics.ROOT + "/", "$"))
        ):
            raise ValueError(f"MQTT target {self.target!r} must be a plain topic outside {topics.ROOT}/ and $-topics")
        return self


class ToMeter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, min_length=1, max_length=64)
    payload: dict[str, Any]


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}


OPENAPI_PATHS: dict[str, Any] = {
    "/meters/{meter_id}/ems/route": {"put": {
        "summary": "Set where the meter's EMS messages go (own ems/<id>/ topics, or a webhook the policy allows)",
        "requestBody": _json_body(Route)}},
    "/meters/{meter_id}/ems/messages": {"post": {"summary": "EMS -> meter", "requestBody": _json_body(ToMeter)}},
    "/": {"post": {"summary": "Meter -> EMS (MQTT connector, X-Topic meters/<id>/up/ems)",
                   "requestBody": _json_body(EmsMessage)}},
}


def _require_twin(meter_id: str) -> None:
    twin_store(get_redis()).get(meter_id)


def _log(meter_id: str, direction: str, message_id: str, status: str, reason: str = "",
         payload: Any = None) -> dict[str, Any]:
    """The forward log entry, and the same as an ``ems`` event of the meter (one round trip)."""
    entry = {"direction": direction, "id": message_id, "status": status, "reason": reason, "ts": repr(time.time())}
    r = get_redis()
    try:
        pipe = r.pipeline(transaction=False)
        pipe.xadd(keys.forward_log(meter_id), entry, maxlen=keys.FORWARD_LOG_MAXLEN, approximate=True)
        events.queue(r, pipe, events.ems_message(meter_id, direction, message_id, status, payload, reason))
        pipe.execute()
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable recording forward of {message_id!r}: {exc}") from exc
    return {**entry, "ts": float(entry["ts"])}


@router.put("/meters/{meter_id}/ems/route", scopes=HOME)
def set_route(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    _require_twin(meter_id)
    route = req.json(Route)
    target = ems_routes.check_route(meter_id, route.kind, route.target)
    get_redis().hset(keys.ems_route(meter_id), mapping={"kind": route.kind, "target": target})
    return json_response({"meter_id": meter_id, "kind": route.kind, "target": target})


@router.get("/meters/{meter_id}/ems/route", scopes=HOME)
def get_route(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    _require_twin(meter_id)
    route = get_redis().hgetall(keys.ems_route(meter_id))
    if not route:
        raise NotFound(f"meter {meter_id!r} has no EMS route; PUT one to /meters/{meter_id}/ems/route")
    return json_response({"meter_id": meter_id, **route})


@router.post("/meters/{meter_id}/ems/messages", scopes=HOME)
def to_meter(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    _require_twin(meter_id)
    body = parse_json(req.event.body, ToMeter, max_bytes=MAX_MESSAGE_BYTES)
    message = EmsMessage(id=body.id or uuid.uuid4().hex[:16], payload=body.payload, ts=time.time())
    try:
        get_mqtt().publish(topics.ems_down(meter_id), message.model_dump(), timeout_s=get_settings().publish_timeout_s)
    except BackendUnavailable as exc:
        entry = _log(meter_id, "ems->meter", message.id, "failed", exc.message, message.payload)
        return json_response({"message": entry}, 503)
    return json_response({"message": _log(meter_id, "ems->meter", message.id, "delivered", payload=message.payload)},
                         202)


@router.get("/meters/{meter_id}/ems/messages", scopes=HOME)
def history(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    _require_twin(meter_id)
    limit = int(query_float(req.query, "limit", 50, lo=1, hi=keys.FORWARD_LOG_MAXLEN))
    rows = get_redis().xrevrange(keys.forward_log(meter_id), count=limit)
    return json_response({"meter_id": meter_id, "messages": [{**f, "ts": float(f["ts"])} for _id, f in rows]})


@router.post("/", scopes={"service"})
def from_meter(req: Request) -> Response:
    meter_id, topic = meter_topic(req)
    if topic != topics.ems_up(meter_id):
        raise InvalidInput(f"topic {topic!r} is not an EMS topic", field="X-Topic")
    message = parse_json(req.event.body, EmsMessage, max_bytes=MAX_MESSAGE_BYTES)
    _require_twin(meter_id)
    route = get_redis().hgetall(keys.ems_route(meter_id))
    if not route:
        entry = _log(meter_id, "meter->ems", message.id, "undeliverable", "no EMS route configured", message.payload)
        return json_response({"message": entry})
    entry = _deliver(meter_id, message, route)
    return json_response({"message": entry})


def _deliver(meter_id: str, message: EmsMessage, route: dict[str, str]) -> dict[str, Any]:
    data = message.model_dump()
    if route["kind"] == "mqtt":
        # Checked again: a route stored before the namespace rule (or the approved list changed).
        refusal = ems_routes.mqtt_target_refusal(meter_id, route["target"])
        if refusal is not None:
            return _log(meter_id, "meter->ems", message.id, "failed", refusal, message.payload)
        try:
            get_mqtt().publish(route["target"], data, timeout_s=get_settings().publish_timeout_s)
        except BackendUnavailable as exc:
            return _log(meter_id, "meter->ems", message.id, "failed", exc.message, message.payload)
        return _log(meter_id, "meter->ems", message.id, "delivered", payload=message.payload)
    problem = ems_routes.send_webhook(meter_id, route["target"], data)
    if problem is not None:
        return _log(meter_id, "meter->ems", message.id, "failed", problem, message.payload)
    return _log(meter_id, "meter->ems", message.id, "delivered", payload=message.payload)


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
