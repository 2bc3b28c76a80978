"""Fleet: where twins sit in the grid, and finding them (``metertwin.fleet``).

Routes (after ``/function/<zone>-fleet``):

* ``GET /meters?feeder=&transformer=&region=&substation=&phase=&tariff=&customer_class=&zone=
  &group=&tag=k:v&online=&stale_s=&release=&has_pending_commands=&dr_opted_out=&limit=&cursor=``
  — twins matching every filter (``group``/``tag`` may repeat), ordered by meter id, with their
  topology, the exact ``count`` and ``next_cursor``. Operators, MDMS and billing; not consumers.
* ``GET /meters/{meter_id}/topology`` — the topology document; ``ETag`` is its version.
* ``PATCH /meters/{meter_id}/topology`` — a JSON merge patch; ``If-Match: "<version>"`` (412 on
  mismatch); audited.
* ``GET /meters/{meter_id}/topology/history?limit=`` — the audited changes, newest first.
* ``POST /meters/import?mode=merge|replace`` — a topology CSV (``text/csv``); per-row errors
  name line, column and value; good rows are applied.
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

from typing import Any

from metertwin.core.clients import get_redis
from metertwin.core.errors import InvalidInput
from metertwin.core.http import Context, Event, Request, Response, Router, json_response, query_float
from metertwin.fleet.importer import import_csv
from metertwin.fleet.search import Query, fleet_search
from metertwin.fleet.topology import TopologyFields, public, topology_store
from metertwin.twin.state import twin_store

router = Router()
OPERATORS = {"admin", "utility"}
READERS = OPERATORS | {"mdms", "billing"}

_FILTERS = ["region", "substation", "feeder", "transformer", "phase", "tariff", "customer_class", "zone",
            "group", "tag", "online", "stale_s", "release", "has_pending_commands", "dr_opted_out"]
OPENAPI_PATHS: dict[str, Any] = {
    "/meters": {"get": {
        "summary": "Fleet search: twins matching every filter, with count and a cursor",
        "parameters": [{"name": n, "in": "query", "schema": {"type": "string"}} for n in _FILTERS]
        + [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
           {"name": "cursor", "in": "query", "schema": {"type": "string"}}],
    }},
    "/meters/{meter_id}/topology": {
        "get": {"summary": "The twin's topology document, its version as ETag"},
        "patch": {"summary": "Merge-patch the topology (If-Match: version); audited"},
    },
    "/meters/{meter_id}/topology/history": {"get": {"summary": "Audited topology changes, newest first"}},
    "/meters/import": {"post": {"summary": "Topology from CSV; per-row errors, good rows applied",
                                "requestBody": {"content": {"text/csv": {"schema": {"type": "string"}}}}}},
}


def _actor(req: Request) -> str:
    return req.principal.subject if req.principal else "anonymous"


def _if_match(req: Request) -> int | None:
    raw = req.header("If-Match")
    if raw is None or raw.strip() == "*":
        return None
    try:
        return int(raw.strip().removeprefix("W/").strip('"'))
    except ValueError:
        raise InvalidInput(f"If-Match {raw!r} is not a topology version (an integer, optionally quoted)",
                           field="If-Match") from None


def _answer(meter_id: str, doc: dict[str, Any] | None, status: int = 200) -> Response:
    version = int((doc or {}).get("v", 0))
    return json_response({"meter_id": meter_id, "version": version, "changed_at": (doc or {}).get("at"),
                          "topology": public(doc)}, status, headers={"ETag": f'"{version}"'})


@router.get("/meters", scopes=READERS)
def search(req: Request) -> Response:
    getlist = getattr(req.query, "getlist", None)
    multi = {name: list(getlist(name)) for name in ("group", "tag")} if getlist else None
    return json_response(fleet_search(get_redis()).run(Query.from_params(req.query, multi)).to_dict())


@router.get("/meters/{meter_id}/topology", scopes=READERS)
def get_topology(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    doc = topology_store(get_redis()).get(meter_id)
    if doc is None:
        twin_store(get_redis()).get(meter_id)  # 404 when there is no twin; else an empty topology
    return _answer(meter_id, doc)


@router.patch("/meters/{meter_id}/topology", scopes=OPERATORS)
def patch_topology(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    changes = req.json(TopologyFields).changes()
    doc = topology_store(get_redis()).patch(meter_id, changes, actor=_actor(req), if_match=_if_match(req))
    return _answer(meter_id, doc)


@router.get("/meters/{meter_id}/topology/history", scopes=OPERATORS)
def topology_history(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    limit = int(query_float(req.query, "limit", 50, lo=1, hi=500))
    return json_response({"meter_id": meter_id, "changes": topology_store(get_redis()).history(meter_id, limit=limit)})


@router.post("/meters/import", scopes=OPERATORS)
def import_topology(req: Request) -> Response:
    kind = (req.header("Content-Type") or "").split(";")[0].strip().lower()
    if kind not in ("text/csv", "application/csv"):
        raise InvalidInput(f"Content-Type {kind!r} is not text/csv", field="Content-Type")
    report = import_csv(topology_store(get_redis()), req.event.body, actor=_actor(req),
                        mode=req.query.get("mode") or "merge")
    if report.rows == 0:
        raise InvalidInput("the CSV has no data rows", field="body")
    return json_response(report.to_dict())


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
