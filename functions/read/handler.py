"""Read capability: the twin answers for its meter, from cache when fresh, else asks the meter.

Routes (after ``/function/<zone>-read``):

* ``GET /meters/{meter_id}/reading?max_age=<s>&live=<bool>&timeout=<s>`` — the last
  measurement if it is at most ``max_age`` seconds old (``source: cache``); otherwise,
  or with ``live=true``, a request to the meter over MQTT v5 (``source: meter``).
  If the meter does not answer in ``timeout`` seconds: 504, with the last cached
  value marked ``stale``.
* ``GET /meters/{meter_id}/twin`` — the whole twin document (reported, desired,
  delta, metadata); the ``ETag`` header carries its version for ``If-Match``.
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

from metertwin.core.clients import get_async_redis, get_mqtt, get_redis
from metertwin.core.errors import InvalidInput, MeterTimeout, MeterTwinError
from metertwin.core.http import (
    Context,
    Event,
    Request,
    Response,
    Router,
    error_response,
    json_response,
    validate,
)
from metertwin.twin.concentrators import downlink
from metertwin.twin.messages import ReadResponse
from metertwin.twin.read_query import ReadQuery
from metertwin.twin.state import TwinStore, reading_async, twin_store
from metertwin.upgrade.binding import bound_reading, require_bound, serve

router = Router()
#: The release this function implements: calls for meters bound to another one are forwarded there.
RELEASE = "v1"
READERS = {"utility", "mdms", "billing", "ems", "consumer"}

OPENAPI_PATHS: dict[str, Any] = {
    "/meters/{meter_id}/reading": {
        "get": {
            "summary": "Read a meter through its twin (cache when fresh, else the meter over MQTT)",
            "parameters": [
                {"name": "meter_id", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "max_age", "in": "query", "schema": {"type": "number", "minimum": 0}},
                {"name": "live", "in": "query", "schema": {"type": "boolean"}},
                {"name": "timeout", "in": "query", "schema": {"type": "number", "minimum": 0.05, "maximum": 30}},
            ],
            "responses": {"200": {"description": "reading, with source cache|meter and age_s"},
                          "504": {"description": "meter did not answer; carries the stale cached value"}},
        }
    },
    "/meters/{meter_id}/twin": {"get": {"summary": "The twin document (shadow) with its version as ETag"}},
}


def _store() -> TwinStore:
    return twin_store(get_redis())


def _served(req: Request, twin_version: int, reading: dict[str, Any], source: str) -> Response:
    age = max(0.0, time.time() - float(reading["ts"]))
    return json_response(
        {
            "meter_id": req.params["meter_id"],
            "reading": reading,
            "age_s": round(age, 3),
            "source": source,
            "twin_version": twin_version,
            "elapsed_ms": req.elapsed_ms(),
        },
        headers={"X-Twin-Source": source},
    )


@router.get("/meters/{meter_id}/reading", scopes=READERS)
def read(req: Request) -> Response:
    q = ReadQuery.of(req)
    meter_id = req.params["meter_id"]
    store = _store()
    version, raw = bound_reading(get_redis(), meter_id, RELEASE)
    cached = json.loads(raw) if raw else None
    if cached is not None and q.served_from_cache(cached):
        return _served(req, version, cached, "cache")
    try:
        topic, address = downlink(get_redis(), meter_id, "read")  # direct, or via its concentrator
        answer = get_mqtt().request(meter_id, topic, address, timeout_s=q.timeout_s)
    except MeterTimeout as exc:
        return _timed_out(req, meter_id, cached, exc, q.timeout_s)
    try:
        reading = validate(answer, ReadResponse).model_dump()
    except InvalidInput as exc:
        raise InvalidInput(f"meter {meter_id!r} answered with an invalid reading: {exc.message}") from None
    _, version = store.report_measurement(meter_id, reading, seq=None)
    return _served(req, version, reading, "meter")


def _timed_out(
    req: Request, meter_id: str, cached: dict[str, Any] | None, exc: MeterTimeout, timeout: float
) -> Response:
    body = exc.to_dict()
    body["details"] = {"meter_id": meter_id, "timeout_s": timeout}
    if cached is not None:
        age = max(0.0, time.time() - float(cached["ts"]))
        body["stale"] = {"reading": cached, "age_s": round(age, 3), "stale": True}
    body["elapsed_ms"] = req.elapsed_ms()
    return json_response(body, 504, headers={"X-Twin-Source": "none"})


@router.get("/meters/{meter_id}/twin", scopes=READERS)
def twin_document(req: Request) -> Response:
    require_bound(get_redis(), req.params["meter_id"], RELEASE, "read")
    twin = _store().get(req.params["meter_id"])
    return json_response(twin.to_dict(), headers={"ETag": f'"{twin.version}"'})


def handle(event: Event, context: Context) -> Response:
    return serve(router, event, context, capability="read", release=RELEASE)


async def handle_async(event: Event, context: Context) -> Any:
    """metertwin's local gateway awaits this on its event loop; OpenFaaS only ever calls :func:`handle`.

    It answers only cache hits for meters bound to this release — the same route, auth,
    validation and answer as :func:`read` — and returns ``NotImplemented`` for everything
    else (meter requests block; other releases are forwarded), which the gateway then runs
    through :func:`handle` in its thread pool.
    """
    if event.method.upper() != "GET" or not (event.path or "").endswith("/reading"):
        return NotImplemented
    try:
        fn, req = router.resolve(event)
        if fn is not read:
            return NotImplemented
        q = ReadQuery.of(req)
        if q.live:
            return NotImplemented
        found = await reading_async(get_async_redis(), req.params["meter_id"])
        cached = found.measurement
        if (found.bound or RELEASE) != RELEASE or cached is None or not q.served_from_cache(cached):
            return NotImplemented
        return _served(req, found.version, cached, "cache")
    except MeterTwinError as exc:
        return error_response(exc)
