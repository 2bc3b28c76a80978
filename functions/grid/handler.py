"""Grid aggregates and rules (fog): the grid tree's load, places, threshold rules and alerts.

Routes (after ``/function/fog-grid``), ``<level>`` one of transformers, feeders, substations, regions:

* ``GET /<level>`` — nodes with aggregates (``limit``, ``after``);
* ``GET /<level>/{node}`` — import/export/net W, meters, reporting, online, stale, voltage min/max;
* ``GET /<level>/{node}/load?from=&to=&interval=`` — energy, readings, voltage band and peak per
  interval (15m, 30m, 1h, 1d), hot and archived; JSON, or CSV with ``format=csv`` or ``Accept: text/csv``;
* ``GET|PUT /meters/{meter_id}/place`` — the fog's copy of a meter's place ``{transformer, feeder,
  substation, region, v}`` (a PUT with a version not above the stored one changes nothing);
* ``POST /rules``, ``GET /rules``, ``GET|DELETE /rules/{rule_id}`` — threshold rules;
* ``GET /alerts?status=&rule_id=&subject=&limit=``, ``POST /rules/{rule_id}/alerts/{alert_id}/ack``;
* ``POST /drain``, ``POST /rules/evaluate``, ``POST /archive`` — by hand (operators);
* ``POST /`` from the cron connector — copy topology changes from the edge, apply the readings'
  aggregation entries (:func:`metertwin.grid.aggregates.drain`), evaluate the rules (bounded),
  archive old history (at most hourly).
See docs/grid.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

from typing import Any
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, field_validator

from metertwin.core import json_limits
from metertwin.core.errors import InvalidInput, MeterTwinError
from metertwin.core.http import Context, Event, Request, Response, Router, json_response, validate_meter_id
from metertwin.fleet.topology import check_name
from metertwin.grid import aggregates, archive, evaluate, load, places
from metertwin.grid.keys import ARCHIVE_DUE, ARCHIVE_EVERY_S, LEVELS
from metertwin.grid.rules import RuleStore
from metertwin.mdms.hot_store import get_hot_redis

router = Router()
READERS = {"utility", "mdms", "admin", "billing"}
OPERATORS = {"utility", "admin"}


def _level(req: Request) -> str:
    return load.LEVEL_OF_PATH[req.event.path.strip("/").split("/")[0]]


def _node(req: Request) -> str:
    node = unquote(req.params["node"])  # names may hold "/" and spaces: sent percent-encoded
    try:
        return check_name(node, "node")
    except ValueError as exc:
        raise InvalidInput(str(exc), field="node") from None


def _limit(req: Request, default: int = 100, hi: int = 1000) -> int:
    raw = req.query.get("limit") or str(default)
    if not raw.isdigit() or not 1 <= int(raw) <= hi:
        raise InvalidInput(f"limit={raw!r} is not an integer in [1, {hi}]", field="limit")
    return int(raw)


def nodes(req: Request) -> Response:
    level = _level(req)
    found = load.list_nodes(get_hot_redis(), level, limit=_limit(req), after=req.query.get("after") or "")
    return json_response({"level": level, "nodes": found})


def node_summary(req: Request) -> Response:
    return json_response(load.summary(get_hot_redis(), _level(req), _node(req)))


def node_load(req: Request) -> Response:
    level, node = _level(req), _node(req)
    fmt = (req.query.get("format") or ("csv" if "text/csv" in (req.header("Accept") or "").lower() else "json"))
    if fmt not in ("json", "csv"):
        raise InvalidInput(f"format={fmt!r} is not json or csv", field="format")
    lo, hi, step = load.range_of(req.query)
    rows = load.history(get_hot_redis(), level, node, lo, hi, step)
    if fmt == "csv":
        return {"statusCode": 200, "body": load.to_csv(rows), "headers": {"Content-Type": "text/csv"}}
    return json_response({"level": level, "id": node, "from": load.iso(lo), "to": load.iso(hi),
                          "interval_s": step // 1000, "rows": rows})


def _named(fn: Any, name: str) -> Any:
    """``fn`` under its own name per level (the gateway's OpenAPI operation ids come from names)."""

    def route_fn(req: Request) -> Response:
        return fn(req)  # type: ignore[no-any-return]

    route_fn.__name__ = route_fn.__qualname__ = name
    route_fn.__doc__ = fn.__doc__
    return route_fn


for _path in load.LEVEL_OF_PATH:
    router.get(f"/{_path}", scopes=READERS)(_named(nodes, f"{_path}"))
    router.get(f"/{_path}/{{node}}", scopes=READERS)(_named(node_summary, f"{_path}_summary"))
    router.get(f"/{_path}/{{node}}/load", scopes=READERS)(_named(node_load, f"{_path}_load"))


class Place(BaseModel):
    model_config = ConfigDict(extra="forbid")

    transformer: str | None = None
    feeder: str | None = None
    substation: str | None = None
    region: str | None = None
    #: Must grow with each change; default: now (the edge sync's versions are its audit ids, ms x 1000).
    v: int | None = Field(default=None, ge=1, le=2**53)

    @field_validator("transformer", "feeder", "substation", "region")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "name")


@router.get("/meters/{meter_id}/place", scopes=READERS)
def get_place(req: Request) -> Response:
    meter = validate_meter_id(req.params["meter_id"])
    return json_response({"meter_id": meter, "place": aggregates.place_of(get_hot_redis(), meter) or None})


@router.put("/meters/{meter_id}/place", scopes=OPERATORS | {"service"})
def put_place(req: Request) -> Response:
    meter = validate_meter_id(req.params["meter_id"])
    body = req.json(Place)
    version = body.v if body.v is not None else places.version_now()
    changed = aggregates.set_place(get_hot_redis(), meter, body.model_dump(exclude={"v"}), version)
    return json_response({"meter_id": meter, "changed": changed, "place": aggregates.place_of(get_hot_redis(), meter)})


def _actor(req: Request) -> str:
    return req.principal.subject if req.principal else "anonymous"


@router.post("/rules", scopes=OPERATORS)
def create_rule(req: Request) -> Response:
    body = _json_object(req)
    return json_response(RuleStore(get_hot_redis()).create(body, actor=_actor(req)), 201)


def _json_object(req: Request) -> dict[str, Any]:
    try:
        data = json_limits.loads(req.event.body or b"{}")
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError (JsonTooDeep is a 400 of its own)
        raise InvalidInput(f"body is not valid JSON: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"body is a JSON {type(data).__name__}, expected an object", field="body")
    return data


@router.get("/rules", scopes=READERS)
def list_rules(req: Request) -> Response:
    return json_response({"rules": RuleStore(get_hot_redis()).all()})


@router.get("/rules/{rule_id}", scopes=READERS)
def get_rule(req: Request) -> Response:
    return json_response(RuleStore(get_hot_redis()).get(req.params["rule_id"]))


@router.delete("/rules/{rule_id}", scopes=OPERATORS)
def delete_rule(req: Request) -> Response:
    RuleStore(get_hot_redis()).delete(req.params["rule_id"])
    return json_response({"deleted": req.params["rule_id"]})


@router.get("/alerts", scopes=READERS)
def alerts(req: Request) -> Response:
    q = req.query
    found = evaluate.list_alerts(get_hot_redis(), status=q.get("status") or None, rule_id=q.get("rule_id") or None,
                                 subject=q.get("subject") or None, limit=_limit(req))
    return json_response({"alerts": found, "count": len(found)})


@router.post("/rules/{rule_id}/alerts/{alert_id}/ack", scopes=OPERATORS)
def ack(req: Request) -> Response:
    return json_response(evaluate.acknowledge(get_hot_redis(), req.params["rule_id"], req.params["alert_id"],
                                              who=_actor(req)))


@router.post("/rules/evaluate", scopes=OPERATORS)
def evaluate_now(req: Request) -> Response:
    return json_response(evaluate.evaluate(get_hot_redis()))


@router.post("/drain", scopes=OPERATORS | {"service"})
def drain_now(req: Request) -> Response:
    """Apply the aggregation entries waiting since the last tick (the cron tick does this too)."""
    return json_response(aggregates.drain(get_hot_redis()))


@router.post("/archive", scopes=OPERATORS)
def archive_now(req: Request) -> Response:
    return json_response(archive.archive_all(get_hot_redis()))


@router.post("/", scopes={"service"})
def connector(req: Request) -> Response:
    """The cron tick: places from the edge, the rules, and (hourly) the archive."""
    if req.header("X-Connector") != "cron-connector":
        raise InvalidInput("POST / is for the cron connector (X-Connector: cron-connector)")
    r = get_hot_redis()
    steps: list[tuple[str, Any]] = [("places", places.sync_from_edge), ("drained", aggregates.drain),
                                    ("rules", evaluate.evaluate)]
    if r.set(ARCHIVE_DUE, "1", nx=True, ex=ARCHIVE_EVERY_S):
        steps.append(("archive", archive.archive_all))
    out: dict[str, Any] = {}
    for name, step in steps:  # one failing step (e.g. the edge Redis unreachable) does not stop the others
        try:
            out[name] = step(r)
        except MeterTwinError as exc:
            out[name] = {"error": exc.message}
    failed = [name for name in out if isinstance(out[name], dict) and "error" in out[name]]
    return json_response(out, 503 if len(failed) == len(out) else 200)


assert set(LEVELS) == set(load.LEVEL_OF_PATH.values())


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
