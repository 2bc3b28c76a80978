"""Demand response behind a twin: the stateless decision and event-state function (OpenADR 2.0b).

The VEN bridge (``dr_bridge``) polls the utility's VTN for every twin and posts each
delivery here; this function decides, stores the event on the twin and schedules its
execution (see :mod:`metertwin.dr.schedule`). Routes (after ``/function/<zone>-dr-event``):

* ``POST /events`` (service) — one ``oadrDistributeEvent`` of one twin, normalised
  (:class:`metertwin.dr.wire.Delivery`); answers per event ``optIn``/``optOut`` with the OpenADR
  response code (200, 452, 454, 460, 462, 469) and cancels (implied) missing events.
* ``POST /due`` (service) — run due start/step/end actions and ack checks. The bridge
  calls it on its own timer (sub-second precision); ``POST /`` from the cron connector
  does the same as a once-a-minute backstop.
* ``POST /telemetry`` (service) ``{"meter_ids": [...]}`` — power and status per twin for
  TELEMETRY_USAGE / TELEMETRY_STATUS reports.
* ``POST /opts/claim`` (service) ``{"meter_ids": [...]}`` — the opt-outs these twins' VENs are to
  send as ``oadrCreateOpt`` (consumers opting out mid-event); ``POST /due`` counts them (``opts_pending``).
* ``GET /meters/{meter_id}/events[/{event_id}]`` (utility, consumer, ems) — the twin's events.
* ``GET|PUT /meters/{meter_id}/dr-preferences`` — the consumer's preferences
  (PUT: consumer, ems; GET: also utility). Opting out stops the events in progress too.
* ``GET /events`` and ``GET /events/{event_id}`` (utility) — the operator's view: every
  twin's answer to an event and the load shed against each twin's baseline.
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

import time

from pydantic import BaseModel, ConfigDict, Field

from metertwin.core.clients import get_redis
from metertwin.core.errors import InvalidInput, UnknownMeter
from metertwin.core.http import Context, Event, Request, Response, Router, json_response, parse_json, query_float
from metertwin.dr import decisions, execution, schedule, views, wire
from metertwin.dr.store import DrStore
from metertwin.twin.state import TwinStore

router = Router()
VIEWERS = {"utility", "consumer", "ems"}
CONSUMERS = {"consumer", "ems"}
OPERATORS = {"utility"}


class TelemetryRequest(BaseModel):
    """The meters a bridge hosts (``/telemetry``, ``/opts/claim``)."""

    model_config = ConfigDict(extra="forbid")

    meter_ids: list[str] = Field(min_length=1, max_length=10_000)


def _store() -> DrStore:
    return DrStore(get_redis())


def _require_twin(meter_id: str) -> None:
    if not TwinStore(get_redis()).exists(meter_id):
        raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)


@router.post("/events", scopes={"service"})
def deliver(req: Request) -> Response:
    delivery = wire.validate_delivery(parse_json(req.event.body, _AnyObject).model_dump())
    return json_response(schedule.handle_delivery(_store(), delivery))


class _AnyObject(BaseModel):
    model_config = ConfigDict(extra="allow")


@router.post("/due", scopes={"service"})
def due(req: Request) -> Response:
    store = _store()
    counts = execution.execute_due(store)
    nxt = store.next_due()
    return json_response({**counts, "next_due_in_s": None if nxt is None else round(max(0.0, nxt - time.time()), 3),
                          "opts_pending": store.opts_pending()})


@router.post("/", scopes={"service"})
def connector(req: Request) -> Response:
    if req.header("X-Connector") != "cron-connector":
        raise InvalidInput("POST / is for the cron connector (X-Connector: cron-connector); the bridge uses POST /due")
    return json_response(execution.execute_due(_store()))


@router.post("/telemetry", scopes={"service"})
def telemetry(req: Request) -> Response:
    body = req.json(TelemetryRequest)
    return json_response({"meters": views.telemetry(_store(), body.meter_ids)})


@router.post("/opts/claim", scopes={"service"})
def claim_opts(req: Request) -> Response:
    body = req.json(TelemetryRequest)
    return json_response({"opts": _store().claim_opts(body.meter_ids)})


@router.get("/meters/{meter_id}/events", scopes=VIEWERS)
def list_events(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    _require_twin(meter_id)
    now = time.time()
    events = sorted((schedule.public(r, now) for r in _store().events(meter_id).values()), key=lambda r: -r["start"])
    return json_response({"meter_id": meter_id, "events": events, "load_control": _store().load_control(meter_id)})


@router.get("/meters/{meter_id}/events/{event_id}", scopes=VIEWERS)
def get_event(req: Request) -> Response:
    record = _store().event(req.params["meter_id"], req.params["event_id"])
    return json_response({"meter_id": req.params["meter_id"], "event": schedule.public(record)})


@router.get("/meters/{meter_id}/dr-preferences", scopes=VIEWERS)
def get_preferences(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    _require_twin(meter_id)
    return json_response({"meter_id": meter_id, "preferences": _store().preferences(meter_id).model_dump()})


@router.put("/meters/{meter_id}/dr-preferences", scopes=CONSUMERS)
def put_preferences(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    _require_twin(meter_id)
    prefs = req.json(decisions.Preferences)
    store = _store()
    store.set_preferences(meter_id, prefs)
    stopped = schedule.opt_out_events(store, meter_id) if prefs.opt_out else []
    return json_response({"meter_id": meter_id, "preferences": prefs.model_dump(), "events_opted_out": stopped})


@router.get("/events", scopes=OPERATORS)
def list_zone_events(req: Request) -> Response:
    limit = int(query_float(req.query, "limit", 50, lo=1, hi=1000))
    return json_response({"events": views.recent_events(_store(), limit)})


@router.get("/events/{event_id}", scopes=OPERATORS)
def event_summary(req: Request) -> Response:
    return json_response(views.event_summary(_store(), req.params["event_id"]))


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
