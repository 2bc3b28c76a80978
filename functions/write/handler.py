"""Write capability: commands and desired state, delivered over MQTT and acknowledged by the meter.

Routes (after ``/function/<zone>-write``):

* ``POST /meters/{meter_id}/commands`` ``{"kind", "params", "expiry_s"?}`` — 202 with the
  command and its status, ``Location`` naming it (kinds: relay, reporting_interval,
  load_limit, tariff, desired, trade, dr).
* ``GET /meters/{meter_id}/commands[/{command_id}]`` — status: pending, delivered,
  acknowledged, rejected or expired.
* ``PATCH /meters/{meter_id}/desired`` ``{"relay"?, "reporting_interval_s"?, "load_limit_w"?,
  "tariff_id"?}`` with optional ``If-Match: "<version>"`` (412 on mismatch) — records the
  desired state on the twin and sends it to the meter as a ``desired`` command.
* ``POST /`` from the MQTT connector (``X-Topic: meters/<id>/up/ack``) — the meter's ack.
* ``POST /`` from the cron connector — expire overdue commands, republish pending ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from metertwin.core import topics
from metertwin.core.clients import get_redis
from metertwin.core.errors import InvalidInput, UnknownMeter
from metertwin.core.http import Context, Event, Request, Response, Router, json_response, parse_json, query_float
from metertwin.twin import keys
from metertwin.twin.commands import MAX_EXPIRY_S, PARAMS_BY_KIND, DesiredFields, get_commands
from metertwin.twin.messages import CommandAck
from metertwin.twin.state import twin_store
from metertwin.twin.uplink import meter_topic

router = Router()
WRITERS = {"utility", "mdms"}
VIEWERS = {"utility", "mdms", "billing", "consumer", "ems"}


class NewCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description=f"one of {sorted(PARAMS_BY_KIND)}")
    # Optional here so an unknown kind is named first; each kind's own model says what it needs.
    params: dict[str, Any] = Field(default_factory=dict)
    expiry_s: int | None = Field(default=None, ge=1, le=MAX_EXPIRY_S)


def _actor(req: Request) -> str:
    return req.principal.subject if req.principal else "connector"


@router.post("/meters/{meter_id}/commands", scopes=WRITERS)
def send_command(req: Request) -> Response:
    body = req.json(NewCommand)
    command = get_commands().submit(
        req.params["meter_id"], body.kind, body.params, expiry_s=body.expiry_s, actor=_actor(req)
    )
    # Relative to the request URL (the function does not know the gateway's /function/<name> prefix).
    location = ("" if (req.event.path or "").endswith("/") else "commands/") + str(command["id"])
    return json_response({"command": command}, 202, headers={"Location": location})


@router.get("/meters/{meter_id}/commands", scopes=VIEWERS)
def list_commands(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    if not twin_store(get_redis()).exists(meter_id):
        raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)
    limit = int(query_float(req.query, "limit", 50, lo=1, hi=keys.COMMAND_LOG_MAX))
    return json_response({"meter_id": meter_id, "commands": get_commands().recent(meter_id, limit)})


@router.get("/meters/{meter_id}/commands/{command_id}", scopes=VIEWERS)
def get_command(req: Request) -> Response:
    return json_response({"command": get_commands().get(req.params["meter_id"], req.params["command_id"])})


def _if_match(req: Request) -> int | None:
    raw = req.header("If-Match")
    if raw is None:
        return None
    try:
        return int(raw.strip().strip('"'))
    except ValueError:
        raise InvalidInput(f"If-Match {raw!r} is not a twin version (an integer, optionally quoted)") from None


@router.patch("/meters/{meter_id}/desired", scopes=WRITERS)
def set_desired(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    fields = req.json(DesiredFields).model_dump(exclude_unset=True)
    if not fields:
        raise InvalidInput(f"desired state names no setting; known: {sorted(DesiredFields.model_fields)}")
    store = twin_store(get_redis())
    version = store.set_desired(meter_id, fields, if_match=_if_match(req))
    command = get_commands().submit(meter_id, "desired", {"fields": fields}, actor=_actor(req))
    return json_response(
        {"meter_id": meter_id, "version": version, "desired": fields, "command": command},
        202,
        headers={"ETag": f'"{version}"', "Location": f"commands/{command['id']}"},  # from .../desired
    )


@router.post("/", scopes={"service"})
def connector(req: Request) -> Response:
    topic = req.header("X-Topic")
    if topic:
        return _on_ack(req)
    if req.header("X-Connector") == "cron-connector":
        return _sweep()
    raise InvalidInput("POST / is for connectors: expected an X-Topic or X-Connector: cron-connector header")


def _on_ack(req: Request) -> Response:
    meter_id, topic = meter_topic(req)
    if topic != topics.command_acks(meter_id):
        raise InvalidInput(f"topic {topic!r} is not a command-ack topic", field="X-Topic")
    ack = parse_json(req.event.body, CommandAck)
    status = get_commands().on_ack(meter_id, ack)
    if status == "acknowledged" and ack.reported:
        twin_store(get_redis()).report(meter_id, ack.reported, ts=ack.ts)
    return json_response({"meter_id": meter_id, "command_id": ack.id, "status": status or "ignored"})


def _sweep() -> Response:
    return json_response(get_commands().sweep_all())


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)

