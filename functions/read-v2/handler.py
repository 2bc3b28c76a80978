"""Read capability, release v2: served from the v2 state schema, with the reading history v1 lacked.

Calls for meters bound to another release are forwarded there (``metertwin.upgrade.binding``), so
``edge-read`` and ``edge-read-v2`` both answer for any meter.

Routes (after ``/function/<zone>-read-v2``):

* ``GET /meters/{meter_id}/reading?max_age=<s>&live=<bool>&timeout=<s>`` — as v1, and the
  reading carries the registers in Wh (``import_wh``, ``export_wh``) beside kWh, ``schema: 2``.
* ``GET /meters/{meter_id}/readings?since_seq=<n>&limit=<n>`` — recent readings, oldest first (new in v2).
* ``GET /meters/{meter_id}/twin`` — the twin document; ``state.reported.measurement`` from the v2 state.
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

import json
import time
from typing import Any

import redis

from metertwin.core.clients import get_mqtt, get_redis
from metertwin.core.errors import BackendUnavailable, InvalidInput, MeterTimeout, UnknownMeter
from metertwin.core.http import Context, Event, Request, Response, Router, json_response, query_float, validate
from metertwin.twin import keys as twin_keys
from metertwin.twin.concentrators import downlink
from metertwin.twin.messages import ReadResponse
from metertwin.twin.read_query import ReadQuery
from metertwin.twin.state import twin_store
from metertwin.upgrade import keys as upgrade_keys
from metertwin.upgrade import twin_v2
from metertwin.upgrade.binding import moved, serve

router = Router()
RELEASE = "v2"
READERS = {"utility", "mdms", "billing", "ems", "consumer"}

OPENAPI_PATHS: dict[str, Any] = {
    "/meters/{meter_id}/reading": {"get": {"summary": "Read a meter through its v2 twin (registers in Wh)"}},
    "/meters/{meter_id}/readings": {
        "get": {
            "summary": "Recent readings of the meter, oldest first (release v2)",
            "parameters": [
                {"name": "meter_id", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "since_seq", "in": "query", "schema": {"type": "integer", "minimum": -1}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 96}},
            ],
        }
    },
    "/meters/{meter_id}/twin": {"get": {"summary": "The twin document, measurement from the v2 state"}},
}


def _bound_state(meter_id: str) -> tuple[int, dict[str, Any]]:
    """(twin version, v2 state) in one round trip; BindingMoved if the meter is not bound to v2."""
    pipe = get_redis().pipeline(transaction=False)
    pipe.hmget(twin_keys.twin(meter_id), ("v", "b"))
    pipe.hmget(upgrade_keys.twin_v2(meter_id), twin_v2.FIELDS)
    try:
        (version, bound), values = pipe.execute()
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable reading twin {meter_id!r}: {exc}") from exc
    if version is None:
        raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)
    if bound != RELEASE:
        raise moved(meter_id, bound or "v1", "read", RELEASE)
    return int(version), {k: v for k, v in zip(twin_v2.FIELDS, values, strict=True) if v is not None}


def _served(req: Request, twin_version: int, reading: dict[str, Any], source: str) -> Response:
    age = max(0.0, time.time() - float(reading["ts"]))
    return json_response(
        {"meter_id": req.params["meter_id"], "reading": reading, "age_s": round(age, 3), "source": source,
         "twin_version": twin_version, "schema": twin_v2.SCHEMA_VERSION, "elapsed_ms": req.elapsed_ms()},
        headers={"X-Twin-Source": source},
    )


@router.get("/meters/{meter_id}/reading", scopes=READERS)
def read(req: Request) -> Response:
    q = ReadQuery.of(req)
    meter_id = req.params["meter_id"]
    version, state = _bound_state(meter_id)
    cached = twin_v2.measurement_of(state)
    if cached is not None and q.served_from_cache(cached):
        return _served(req, version, cached, "cache")
    try:
        topic, address = downlink(get_redis(), meter_id, "read")  # direct, or via its concentrator
        answer = get_mqtt().request(meter_id, topic, address, timeout_s=q.timeout_s)
    except MeterTimeout as exc:
        body = exc.to_dict()
        body["details"] = {"meter_id": meter_id, "timeout_s": q.timeout_s}
        if cached is not None:
            age = max(0.0, time.time() - float(cached["ts"]))
            body["stale"] = {"reading": cached, "age_s": round(age, 3), "stale": True}
        body["elapsed_ms"] = req.elapsed_ms()
        return json_response(body, 504, headers={"X-Twin-Source": "none"})
    try:
        reading = validate(answer, ReadResponse).model_dump()
    except InvalidInput as exc:
        raise InvalidInput(f"meter {meter_id!r} answered with an invalid reading: {exc.message}") from None
    # A live answer is no reading (no seq): it refreshes the state without being counted.
    outcome = twin_v2.v2_ingest(get_redis()).run(meter_id, json.dumps(reading, separators=(",", ":")),
                                                 reading["ts"], -1)
    fresh = twin_v2.measurement_of(twin_v2.state(get_redis(), meter_id)) or reading
    return _served(req, outcome.version, fresh, "meter")


@router.get("/meters/{meter_id}/readings", scopes=READERS)
def readings(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    since = int(query_float(req.query, "since_seq", -1, lo=-1, hi=2**62))
    cap = upgrade_keys.TWIN_V2_HISTORY_MAX
    limit = int(query_float(req.query, "limit", cap, lo=1, hi=cap))
    _version, state = _bound_state(meter_id)
    items = twin_v2.history(get_redis(), meter_id, since_seq=since, limit=limit)
    return json_response({"meter_id": meter_id, "readings": items, "last_seq": int(state.get("s", -1)),
                          "applied": int(state.get("n", 0)), "schema": twin_v2.SCHEMA_VERSION})


@router.get("/meters/{meter_id}/twin", scopes=READERS)
def twin_document(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    _version, state = _bound_state(meter_id)
    twin = twin_store(get_redis()).get(meter_id)
    doc = twin.to_dict()
    measurement = twin_v2.measurement_of(state)
    if measurement is not None:
        doc["state"]["reported"]["measurement"] = measurement
    doc["metadata"]["last_seq"] = int(state.get("s", twin.last_seq))
    doc["schema"] = twin_v2.SCHEMA_VERSION
    doc["release"] = RELEASE
    return json_response(doc, headers={"ETag": f'"{twin.version}"'})


def handle(event: Event, context: Context) -> Response:
    return serve(router, event, context, capability="read", release=RELEASE)
