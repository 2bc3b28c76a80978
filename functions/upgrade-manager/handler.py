"""Upgrade manager: move twins between releases of their capabilities (seed 000, Fig. 3), for operators.

Routes (after ``/function/<zone>-upgrade-manager``); errors say what blocked:

* ``GET /releases`` — the releases and the function of each capability.
* ``POST /operations`` (admin) — start: ``{"to": "v2", "from": "v1", "select": {"meters": [...]} |
  {"percent": 5} | {"zone": "edge"} | {"all": true}, "canary": 10, "batch": 500, "drain_s": 5,
  "auto_promote": false, "observe_s": 60, ...}`` (see ``metertwin.upgrade.OperationSpec``) → 201.
* ``GET /operations``, ``GET /operations/{op_id}`` — state, progress, readings counted during
  the switches, blockers and the canary's health (error rate and latency per release from
  the gateway's ``/metrics``).
* ``POST /operations/{op_id}/advance`` (admin) ``{"budget_s": 2}`` — do a bounded amount of
  work now (the CLI's ``follow``; the cron does the same in the background).
* ``POST /operations/{op_id}/pause`` ``{"reason"}``, ``/resume``, ``/promote`` ``{"force"}``,
  ``/rollback`` ``{"reason"}`` (admin).
* ``GET /meters/{meter_id}/binding`` — the release a meter is bound to, its functions, and
  its switch in progress if any.
* ``POST /`` from the MQTT connector (``meters/+/up/ack``): the meters' rebind acks; from the
  cron connector: advance the active operations and drain inboxes whose nudge was lost.
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

import time
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from metertwin.core import topics
from metertwin.core.clients import StrRedis, get_redis
from metertwin.core.errors import BackendUnavailable, InvalidInput
from metertwin.core.http import Context, Event, Request, Response, Router, json_response, parse_json
from metertwin.twin.messages import CommandAck
from metertwin.upgrade import keys, twin_v2
from metertwin.upgrade.binding import bound_release, function_for
from metertwin.upgrade.inbox import drain_inboxes as drain_release
from metertwin.upgrade.inbox import v1_ingest
from metertwin.upgrade.migrations import RELEASES, publish_manifests
from metertwin.upgrade.operations import OperationSpec, UpgradeManager

router = Router()
OPERATORS = {"admin"}
VIEWERS = {"admin", "utility"}

_manager: UpgradeManager | None = None


def manager() -> UpgradeManager:
    global _manager
    client = get_redis()
    if _manager is None or _manager.r is not client:
        _manager = UpgradeManager(client)
    return _manager


class Advance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budget_s: float = Field(default=2.0, gt=0, le=25, allow_inf_nan=False)


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=300)


class Promote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force: bool = False


def _optional(req: Request, model: type[BaseModel]) -> Any:
    return req.json(model) if req.event.body.strip() else model()


@router.get("/releases", scopes=VIEWERS)
def releases(req: Request) -> Response:
    publish_manifests(get_redis())
    return json_response({"releases": [r.to_dict() for r in RELEASES.values()]})


@router.post("/operations", scopes=OPERATORS)
def start(req: Request) -> Response:
    spec = req.json(OperationSpec)
    return json_response(manager().start(spec), 201)


@router.get("/operations", scopes=VIEWERS)
def list_operations(req: Request) -> Response:
    return json_response({"operations": manager().list_ops()})


@router.get("/operations/{op_id}", scopes=VIEWERS)
def get_operation(req: Request) -> Response:
    return json_response(manager().status(req.params["op_id"]))


@router.post("/operations/{op_id}/advance", scopes=OPERATORS)
def advance(req: Request) -> Response:
    body: Advance = _optional(req, Advance)
    return json_response(manager().advance(req.params["op_id"], budget_s=body.budget_s))


@router.post("/operations/{op_id}/pause", scopes=OPERATORS)
def pause(req: Request) -> Response:
    body: Reason = _optional(req, Reason)
    return json_response(manager().pause(req.params["op_id"], body.reason))


@router.post("/operations/{op_id}/resume", scopes=OPERATORS)
def resume(req: Request) -> Response:
    return json_response(manager().resume(req.params["op_id"]))


@router.post("/operations/{op_id}/promote", scopes=OPERATORS)
def promote(req: Request) -> Response:
    body: Promote = _optional(req, Promote)
    return json_response(manager().promote(req.params["op_id"], force=body.force))


@router.post("/operations/{op_id}/rollback", scopes=OPERATORS)
def rollback(req: Request) -> Response:
    body: Reason = _optional(req, Reason)
    return json_response(manager().rollback(req.params["op_id"], body.reason))


@router.get("/meters/{meter_id}/binding", scopes={"admin", "utility", "mdms", "billing", "ems", "consumer"})
def binding(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    client = get_redis()
    bound = bound_release(client, meter_id)
    functions = {cap: function_for(cap, bound, client) for cap in RELEASES[bound].functions} \
        if bound in RELEASES else {}
    try:
        switch = client.hgetall(keys.upgrade_switch(meter_id))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
    body: dict[str, Any] = {"meter_id": meter_id, "release": bound, "functions": functions}
    if switch:
        body["switch"] = switch
    return json_response(body)


@router.post("/", scopes={"service"})
def connector(req: Request) -> Response:
    topic = req.header("X-Topic")
    if topic:
        try:
            meter_id = topics.meter_id_of(topic)
        except ValueError as exc:
            raise InvalidInput(str(exc), field="X-Topic") from None
        if topic != topics.command_acks(meter_id):
            raise InvalidInput(f"topic {topic!r} is not a command-ack topic", field="X-Topic")
        ack = parse_json(req.event.body, CommandAck)
        return json_response({"meter_id": meter_id, "id": ack.id, "result": manager().on_ack(meter_id, ack)})
    if req.header("X-Connector") == "cron-connector":
        started = time.monotonic()
        swept = manager().sweep(budget_s=20.0)
        drained = drain_inboxes(get_redis())
        return json_response({**swept, "inboxes_drained": drained,
                              "elapsed_ms": round((time.monotonic() - started) * 1000, 1)})
    raise InvalidInput("POST / is for connectors: expected an X-Topic or X-Connector: cron-connector header")


def drain_inboxes(client: StrRedis, budget_s: float = 5.0) -> int:
    """Readings parked for a release whose drainer was never nudged (no GATEWAY_URL, a lost call)."""
    applied = 0
    for script in (v1_ingest(client), twin_v2.v2_ingest(client)):
        applied += drain_release(script, budget_s=budget_s / 2, holds_flag=False)["applied"]
    return applied


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
