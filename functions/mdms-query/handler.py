"""MDMS query (fog): interval data, energy, demand and TOU billing for billing and MDMS apps.

Hot (Redis) and cold (S3 Parquet) rows are merged transparently; each row carries its
quality flag and the tier it came from. JSON by default, ``format=csv`` for CSV. Long
ranges are paginated (``limit``, ``cursor``). A consumer token reaches only its meter.
See docs/mdms.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

import time
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field

from metertwin.core.http import Context, Event, Request, Response, Router, json_response
from metertwin.mdms import keys, load_profile, tiering
from metertwin.mdms import query as mdms_query
from metertwin.mdms.hot_store import get_hot_redis
from metertwin.mdms.intervals import iso_ms
from metertwin.mdms.tou import BUILTIN_TARIFFS, Tariff, builtin_tariff

router = Router()


def _q(name: str, typ: str = "string", *, desc: str | None = None) -> dict[str, Any]:
    """An OpenAPI query parameter."""
    out: dict[str, Any] = {"name": name, "in": "query", "schema": {"type": typ}}
    if desc:
        out["description"] = desc
    return out


_MID = {"name": "meter_id", "in": "path", "required": True, "schema": {"type": "string"}}
_RANGE = [_q("from", desc="epoch s or ISO 8601"), _q("to", desc="epoch s or ISO 8601")]
_FORMAT = _q("format", desc="json or csv (without it, Accept: text/csv asks for CSV)")
_PAGE = [_q("limit", "integer"), _q("cursor"), _FORMAT]
OPENAPI_PATHS: dict[str, Any] = {
    "/meters/{meter_id}/intervals": {"get": {
        "summary": "Interval rows of a meter, hot and cold merged, with quality and tier (JSON or CSV, paginated)",
        "parameters": [_MID, *_RANGE, *_PAGE]}},
    "/intervals": {"get": {"summary": "Interval rows of several meters (meters=a,b,c)",
                           "parameters": [_q("meters", desc="comma-separated meter ids"), *_RANGE, *_PAGE]}},
    "/meters/{meter_id}/energy": {"get": {"summary": "Energy and maximum demand per day or month",
                                          "parameters": [_MID, *_RANGE, _q("period", desc="day or month"),
                                                         _q("tz", desc="IANA time zone"), _FORMAT]}},
    "/meters/{meter_id}/billing": {
        "get": {"summary": "TOU billing determinants and bill under a built-in tariff",
                "parameters": [_MID, *_RANGE, _q("tariff", desc="built-in tariff name"), _FORMAT]},
        "post": {"summary": "TOU billing determinants and bill under {from, to, tariff}", "parameters": [_MID]},
    },
    "/meters/{meter_id}/load-profile": {"get": {
        "summary": "kWh import/export and average/maximum kW per 15m, 30m or 1h interval, each with its quality "
                   "(valid, estimated, edited, suspect, missing); JSON, or CSV with format=csv or Accept: text/csv",
        "parameters": [_MID, *_RANGE, _q("interval", desc="15m, 30m or 1h (default 15m)"), _FORMAT]}},
    "/tariffs": {"get": {"summary": "Built-in tariffs"}},
    "/meters/{meter_id}/latest": {"get": {"summary": "Latest registers and counters", "parameters": [_MID]}},
    "/meters/{meter_id}/tiers": {"get": {"summary": "Hot and cold days of a meter and the archive decisions",
                                         "parameters": [_MID]}},
}
READERS = {"mdms", "billing", "utility", "consumer"}
APPS = {"mdms", "billing", "utility"}


def _page_response(req: Request, meters: list[str]) -> Response:
    lo, hi = mdms_query.time_range(req.query)
    limit = mdms_query.limit_of(req.query)
    fmt = mdms_query.format_of(req.query, req.header("Accept"))
    mdms_query.require_known(meters)
    page, cursor = mdms_query.interval_page(meters, lo, hi, limit=limit, cursor=req.query.get("cursor") or None)
    if fmt == "csv":
        headers = {"Content-Type": "text/csv"}
        if cursor:
            headers["X-Next-Cursor"] = cursor
        return {"statusCode": 200, "body": mdms_query.rows_csv(page), "headers": headers}
    return json_response({
        "meters": meters, "from": iso_ms(lo), "to": iso_ms(hi), "count": len(page),
        "rows": mdms_query.rows_json(page), "next_cursor": cursor,
    })


@router.get("/meters/{meter_id}/intervals", scopes=READERS)
def meter_intervals(req: Request) -> Response:
    """Rows of one meter over ``from``..``to`` (inclusive)."""
    return _page_response(req, [req.params["meter_id"]])


@router.get("/intervals", scopes=APPS)
def many_intervals(req: Request) -> Response:
    """Rows of several meters (``meters=a,b,c``), meter by meter."""
    return _page_response(req, mdms_query.meters_of(req.query))


@router.get("/meters/{meter_id}/energy", scopes=READERS)
def energy(req: Request) -> Response:
    """Energy and maximum demand per local day or month (``period``, ``tz``)."""
    meter = req.params["meter_id"]
    lo, hi = mdms_query.time_range(req.query)
    fmt = mdms_query.format_of(req.query, req.header("Accept"))
    mdms_query.require_known([meter])
    result = mdms_query.energy(meter, lo, hi, req.query.get("period") or "day", req.query.get("tz") or "UTC")
    if fmt == "csv":
        cols = ("period", "import_kwh", "export_kwh", "net_kwh", "max_demand_kw", "max_demand_at", "intervals",
                "missing_intervals")
        return {"statusCode": 200, "body": mdms_query.dicts_csv(result["periods"], cols),
                "headers": {"Content-Type": "text/csv"}}
    return json_response(result)


@router.get("/meters/{meter_id}/load-profile", scopes=READERS)
def meter_load_profile(req: Request) -> Response:
    """Energy and demand per interval (``interval=15m|30m|1h``) over ``from``..``to``, hot and cold merged."""
    meter = req.params["meter_id"]
    lo, hi = mdms_query.time_range(req.query)
    fmt = mdms_query.format_of(req.query, req.header("Accept"))
    step_s = load_profile.interval_s_of(req.query.get("interval"))
    load_profile.check_range(lo, hi, step_s)
    mdms_query.require_known([meter])
    result = load_profile.load_profile(meter, lo, hi, req.query.get("interval"))
    if fmt == "csv":
        return {"statusCode": 200, "body": load_profile.profile_csv(result), "headers": {"Content-Type": "text/csv"}}
    return json_response(result)


class BillingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: float | str = Field(alias="from")
    end: float | str = Field(alias="to")
    tariff: Tariff | str = "tou-3"


def _billing(req: Request, meter: str, lo: int, hi: int, tariff: Tariff) -> Response:
    mdms_query.require_known([meter])
    result = mdms_query.billing(meter, lo, hi, tariff)
    if mdms_query.format_of(req.query, req.header("Accept")) == "csv":
        bill = result["bill"]
        lines = [*bill["lines"], {"item": "total", "unit": bill["currency"], "amount": bill["total"]}]
        return {"statusCode": 200, "body": mdms_query.dicts_csv(lines, ("item", "quantity", "unit", "rate", "amount")),
                "headers": {"Content-Type": "text/csv"}}
    return json_response(result)


@router.get("/meters/{meter_id}/billing", scopes=READERS)
def billing_get(req: Request) -> Response:
    """Billing determinants and bill under a built-in tariff (``tariff=tou-3``)."""
    lo, hi = mdms_query.time_range(req.query)
    return _billing(req, req.params["meter_id"], lo, hi, builtin_tariff(req.query.get("tariff") or "tou-3"))


@router.post("/meters/{meter_id}/billing", scopes=READERS)
def billing_post(req: Request) -> Response:
    """Billing determinants and bill under a tariff given in the body (or a built-in name)."""
    body = req.json(BillingRequest)
    lo, hi = mdms_query.time_ms(body.start, "from"), mdms_query.time_ms(body.end, "to")
    mdms_query.time_range({"from": str(lo / 1000), "to": str(hi / 1000)})
    tariff = body.tariff if isinstance(body.tariff, Tariff) else builtin_tariff(body.tariff)
    return _billing(req, req.params["meter_id"], lo, hi, tariff)


@router.get("/tariffs", scopes=READERS)
def tariffs(req: Request) -> Response:
    return json_response({"tariffs": {name: t.model_dump() for name, t in BUILTIN_TARIFFS.items()}})


@router.get("/meters/{meter_id}/latest", scopes=READERS)
def latest(req: Request) -> Response:
    """Latest registers and the meter's MDMS counters."""
    meter = req.params["meter_id"]
    mdms_query.require_known([meter])
    r = get_hot_redis()
    reg = cast(dict[str, str], r.hgetall(keys.mdms_latest(meter)))
    counters = {k: int(v) for k, v in cast(dict[str, str], r.hgetall(keys.mdms_counters(meter))).items()}
    registers: dict[str, Any] | None = None
    if reg:
        registers = {"ts": iso_ms(int(reg["ts_ms"])), "seq": int(reg["seq"]) if reg.get("seq") else None,
                     "import_kwh": float(reg["import_kwh"]), "export_kwh": float(reg["export_kwh"]),
                     "power_w": float(reg["power_w"]) if reg.get("power_w") else None,
                     "voltage_v": float(reg["voltage_v"]) if reg.get("voltage_v") else None}
    return json_response({"meter_id": meter, "registers": registers, "counters": counters})


@router.get("/meters/{meter_id}/tiers", scopes={"mdms", "utility"})
def tiers(req: Request) -> Response:
    """What of this meter is hot, what is cold, and what the next archive run would do and why."""
    meter = req.params["meter_id"]
    mdms_query.require_known([meter])
    return json_response(tiering.meter_tiers(meter, time.time()))


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
