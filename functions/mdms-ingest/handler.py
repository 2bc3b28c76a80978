"""MDMS ingest (fog): meter readings through VEE into the hot tier; edits; dead letters.

Triggered two ways:

* the MQTT connector (stack.yml annotation ``topic: meters/+/up/reading``) invokes
  ``POST /`` with the message as body, ``X-Topic: meters/<id>/up/reading`` and a service
  token. A QoS1 redelivery answers ``duplicate`` and is counted once;
* a concentrator's batch on ``dcu/<id>/up/readings``, and the connector's batches of messages
  (``POST /mqtt-batch``, annotation ``mqtt-batch``): metertwin.mdms.mqtt_ingest;
* head-end systems upload batches: ``POST /readings/batch``.

Every MQTT message not stored is retried (503: left unacknowledged) or dead-lettered with
the rule and reason (a topic naming no valid meter too: rule ``topic``)
(``GET /dead-letters``, ``POST /dead-letters/{id}/replay``). Operators correct
intervals with ``POST /meters/{meter_id}/edits`` (audit trail: ``GET .../edits``).
See docs/mdms.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from metertwin.core import auth, mqtt_batch, topics
from metertwin.core.errors import InvalidInput, MeterTwinError, NotFound, PayloadTooLarge, UnknownMeter
from metertwin.core.http import (
    Context,
    Event,
    Request,
    Response,
    Router,
    error_response,
    json_response,
    parse_json,
    validate_meter_id,
)
from metertwin.mdms import dead_letters, hot_store, mqtt_ingest, vee
from metertwin.mdms.settings import get_mdms_settings

router = Router()


def _q(name: str, typ: str = "string", *, desc: str | None = None) -> dict[str, Any]:
    """An OpenAPI query parameter."""
    out: dict[str, Any] = {"name": name, "in": "query", "schema": {"type": typ}}
    if desc:
        out["description"] = desc
    return out


_MID = {"name": "meter_id", "in": "path", "required": True, "schema": {"type": "string"}}
_JSON_BODY = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
OPENAPI_PATHS: dict[str, Any] = {
    "/": {"post": {"summary": "One meter reading from the MQTT connector (X-Topic: meters/<id>/up/reading); "
                              "VEE, then the hot tier", "requestBody": _JSON_BODY,
                   "responses": {"200": {"description": "accepted or duplicate"},
                                 "400": {"description": "rejected: details.rule, details.dead_letter_id"}}}},
    "/readings/batch": {"post": {"summary": "Head-end batch upload {source, units, readings[]}",
                                 "requestBody": _JSON_BODY}},
    "/meters/{meter_id}/edits": {
        "post": {"summary": "Manual correction {ts, import_kwh?, export_kwh?, reason} (audited)",
                 "parameters": [_MID], "requestBody": _JSON_BODY},
        "get": {"summary": "Audit trail of the meter's edits", "parameters": [_MID, _q("limit", "integer")]},
    },
    "/dead-letters": {"get": {"summary": "Rejected readings with rule and reason, newest first",
                              "parameters": [_q("meter_id"), _q("rule"), _q("limit", "integer"), _q("cursor")]}},
    "/dead-letters/{entry_id}/replay": {"post": {"summary": "Run a dead letter through VEE again (optionally "
                                                            "corrected: {reading})"}},
    "/dead-letters/replay": {"post": {"summary": "Replay {ids} or every dead letter of {meter_id, rule}",
                                      "requestBody": _JSON_BODY}},
    "/dead-letters/{entry_id}": {"delete": {"summary": "Discard a dead letter"}},
}


MQTT_SCOPES = frozenset({"service"})


def _answer(meter_id: str, verdict: vee.Verdict) -> Response:
    if verdict.status == "rejected":
        error: InvalidInput = (
            PayloadTooLarge(verdict.reason or "", **verdict.to_dict()) if verdict.rule == "oversized"
            else vee.ReadingRejected(f"reading of {meter_id} rejected ({verdict.rule}): {verdict.reason}",
                                     **verdict.to_dict())
        )
        raise error
    return json_response(verdict.to_dict())


@router.post("/", scopes=set(MQTT_SCOPES))
def on_message(req: Request) -> Response:
    """One reading from MQTT (``X-Topic`` names the meter)."""
    topic = req.header("X-Topic") or ""
    if topic.startswith(topics.CONCENTRATOR_ROOT + "/"):  # a concentrator's batch: each reading on its own
        [(status, body)] = mqtt_ingest.ingest_messages([(topic, req.event.body)])
        return json_response(body, status)
    meter_id = vee.reading_meter(topic, req.event.body)  # a topic naming no meter is dead-lettered too
    return _answer(meter_id, vee.ingest([vee.Candidate(meter_id, req.event.body, "mqtt", topic)])[0])


@router.post(mqtt_batch.PATH, scopes=set(MQTT_SCOPES))
def on_batch(req: Request) -> Response:  # the MQTT connector's batch: one answer per message
    return json_response(mqtt_batch.answer(mqtt_ingest.ingest_messages(mqtt_batch.decode(req.event.body))))


@router.post("/readings/batch", scopes={"mdms", "utility"})
def batch(req: Request) -> Response:
    """A head-end batch; each reading is judged on its own (bad ones are dead-lettered)."""
    s = get_mdms_settings()
    body = parse_json(req.event.body, vee.Batch, max_bytes=s.max_batch_bytes)
    verdicts = vee.ingest_batch(body)
    counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
    for v in verdicts:
        counts[v.status] += 1
    # Each verdict counts estimates added net of those it replaced: the sum is what the batch left estimated.
    estimated = max(0, sum(v.estimated for v in verdicts))
    problems = [v.to_dict() for v in verdicts if v.status != "accepted"][:1000]
    return json_response({"received": len(verdicts), **counts, "estimated": estimated, "not_accepted": problems})


@router.post("/meters/{meter_id}/edits", scopes={"mdms"})
def edit(req: Request) -> Response:
    """A manual correction of the registers at one timestamp, with its reason (audited)."""
    body = req.json(vee.EditRequest)
    assert req.principal is not None
    _require_known(req.params["meter_id"])
    result = vee.edit(req.params["meter_id"], body, who=req.principal.subject)
    return json_response(result, 201)


@router.get("/meters/{meter_id}/edits", scopes={"mdms", "utility", "billing"})
def audit(req: Request) -> Response:
    limit = _limit(req, 100, 1000)
    _require_known(req.params["meter_id"])
    return json_response({"meter_id": req.params["meter_id"], "edits": vee.audit_trail(req.params["meter_id"],
                                                                                      limit=limit)})


@router.get("/dead-letters", scopes={"mdms"})
def list_dead_letters(req: Request) -> Response:
    meter = req.query.get("meter_id") or None
    if meter is not None:
        validate_meter_id(meter)
    entries, cursor = dead_letters.list_entries(
        meter_id=meter, rule=req.query.get("rule") or None, limit=_limit(req, 100, 1000),
        before=req.query.get("cursor") or None,
    )
    return json_response({"dead_letters": [e.to_dict() for e in entries], "next_cursor": cursor,
                          "total": dead_letters.count()})


class ReplayOne(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: A corrected reading to ingest instead of the stored payload.
    reading: dict[str, Any] | None = None
    meter_id: str | None = Field(default=None, min_length=1, max_length=64)


class ReplayMany(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[str] | None = Field(default=None, max_length=1000)
    meter_id: str | None = Field(default=None, min_length=1, max_length=64)
    rule: str | None = None
    limit: int = Field(default=1000, ge=1, le=10_000)


@router.post("/dead-letters/{entry_id}/replay", scopes={"mdms"})
def replay_one(req: Request) -> Response:
    body = req.json(ReplayOne) if req.event.body.strip() else ReplayOne()
    if body.meter_id:
        validate_meter_id(body.meter_id)
    verdict = vee.replay_dead_letter(req.params["entry_id"], payload=body.reading, meter_id=body.meter_id)
    return json_response({"id": req.params["entry_id"], **verdict.to_dict()})


@router.post("/dead-letters/replay", scopes={"mdms"})
def replay_many(req: Request) -> Response:
    """Replay by ids, or every dead letter of a meter and/or rule (oldest first)."""
    body = req.json(ReplayMany)
    if not body.ids and not body.meter_id and not body.rule:
        raise InvalidInput("name ids, meter_id or rule to replay (replaying everything is not offered)", field="ids")
    if body.meter_id:
        validate_meter_id(body.meter_id)
    ids = [dead_letters.check_id(i) for i in body.ids] if body.ids else [
        e.id for e in dead_letters.list_entries(meter_id=body.meter_id, rule=body.rule, limit=body.limit)[0]
    ][::-1]
    results: list[dict[str, Any]] = []
    for entry_id in ids:
        try:
            verdict = vee.replay_dead_letter(entry_id)
        except (NotFound, InvalidInput) as exc:  # gone meanwhile, or not replayable as stored
            results.append({"id": entry_id, "status": "skipped", "reason": exc.message})
            continue
        results.append({"id": entry_id, **verdict.to_dict()})
    counts = {s: sum(1 for r in results if r["status"] == s) for s in ("accepted", "duplicate", "rejected", "skipped")}
    return json_response({"replayed": len(results), **counts, "results": results})


@router.delete("/dead-letters/{entry_id}", scopes={"mdms"})
def discard(req: Request) -> Response:
    entry = dead_letters.get(req.params["entry_id"])
    dead_letters.delete(entry.id)
    return json_response({"discarded": entry.to_dict()})


def _require_known(meter_id: str) -> None:
    if not hot_store.known_meter(meter_id):
        raise UnknownMeter(f"meter {meter_id!r} is not known to the MDMS (no data, not registered)",
                           meter_id=meter_id)


def _limit(req: Request, default: int, hi: int) -> int:
    raw = req.query.get("limit")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"limit={raw!r} is not an integer", field="limit") from None
    if not 1 <= value <= hi:
        raise InvalidInput(f"limit={raw!r} is outside [1, {hi}]", field="limit")
    return value


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)


async def handle_async(event: Event, context: Context) -> Any:
    """The local gateway's async lane for the MQTT path (``POST /``): exactly what :func:`on_message`
    does, awaited on the event loop; every other request goes to :func:`handle` (``NotImplemented``)."""
    if (event.method.upper() != "POST" or (event.path or "/") != "/"
            or (event.headers.get("X-Topic") or "").startswith(topics.CONCENTRATOR_ROOT + "/")):
        return NotImplemented
    try:
        auth.authorize(auth.authenticate(event.headers.get("Authorization")), MQTT_SCOPES)
        topic = event.headers.get("X-Topic") or ""
        meter_id = vee.reading_meter(topic, event.body)
        return _answer(meter_id, await vee.ingest_one_async(meter_id, event.body, source="mqtt", topic=topic))
    except MeterTwinError as exc:
        return error_response(exc)
