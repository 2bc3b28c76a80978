"""Peer-to-peer market coordinator: open a market for a slot, let the twins negotiate, settle, tell the meters.

Routes (after ``/function/<zone>-p2p-market``); ``admin`` and ``service`` reach every route:

* ``POST /markets`` (utility) ``{"slot_start", "feed_in_tariff", "retail_tariff", ...}`` — 201, an ``open`` market.
* ``GET /markets`` (utility, billing) — recent markets.
* ``GET /markets/{market_id}`` (utility, billing) — spec, status and (once cleared) the result.
* ``PUT /markets/{market_id}/participants/{meter_id}`` (utility; consumer for its own meter) — join
  with an owner profile (forecast, limits, battery); ``POST /markets/{market_id}/participants``
  (utility) ``{"participants": [...]}`` joins many, all or none.
* ``GET /markets/{market_id}/participants`` (utility).
* ``POST /markets/{market_id}/run`` (utility) — negotiate round by round, clear, record, tell the meters.
* ``GET /markets/{market_id}/rounds?from=0&count=1000`` (utility, billing) — follow the rounds.
* ``GET /markets/{market_id}/result`` (utility, billing) — the clearing price and totals.
* ``GET /markets/{market_id}/trades`` (utility, billing) — every trade and settlement line.
* ``GET /markets/{market_id}/trades/{meter_id}``, ``GET /meters/{meter_id}/trades`` (utility, billing;
  consumer for its own meter).

A round: announce the price to every twin, gather their answers until the round timeout (a twin
that does not answer in time counts as zero), move the price (see :mod:`metertwin.p2p.negotiation`).
Twins of this zone answer through a library call (the same code the ``p2p-bid`` function runs);
twins of another zone through that zone's gateway (``/function/<zone>-p2p-bid/bid``), with the
gateways listed in ``P2P_ZONE_GATEWAYS`` (``fog=http://fog-gw:8080,cloud=...``); see
:mod:`metertwin.p2p.channels`. This handler holds the routes, scopes and request bodies; the
market itself runs in :mod:`metertwin.p2p.runner` (registration, settlement: their own modules).
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from metertwin.core.errors import InvalidInput
from metertwin.core.http import Context, Event, Request, Response, Router, json_response
from metertwin.core.settings import get_settings
from metertwin.p2p.participants import ParticipantIn, Price
from metertwin.p2p.registration import market_params, register
from metertwin.p2p.runner import run_market
from metertwin.p2p.store import get_store

router = Router()
OPERATORS = {"utility"}
VIEWERS = {"utility", "billing"}
OWN_VIEWERS = {"utility", "billing", "consumer"}
MARKET_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


# --- request bodies -------------------------------------------------------------------------
class NewMarket(BaseModel):
    """A market for one slot. Prices per kWh; ``slot_start`` is ISO 8601 or epoch seconds."""

    model_config = ConfigDict(extra="forbid")

    market_id: str | None = Field(default=None, pattern=MARKET_ID_RE.pattern)
    slot_start: datetime
    slot_minutes: int = Field(default=15, ge=1, le=1440)
    feed_in_tariff: Price
    retail_tariff: Price
    tolerance_kwh: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)] = 1e-3
    price_tolerance: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1e-6
    max_rounds: int = Field(default=100, ge=1, le=1000)
    min_rounds: int = Field(default=0, ge=0, le=1000)
    start_price: Price | None = None
    round_timeout_ms: int = Field(default=1000, ge=1, le=30_000)
    deliver: bool = True


class Participants(BaseModel):
    model_config = ConfigDict(extra="forbid")

    participants: list[ParticipantIn] = Field(min_length=1, max_length=5000)


def _market_id(req: Request) -> str:
    market_id = req.params["market_id"]
    if not MARKET_ID_RE.match(market_id):
        raise InvalidInput(f"market id {market_id!r} is not valid: 1-64 of letters, digits and _.:-", field="market_id")
    return market_id


def _actor(req: Request) -> str:
    return req.principal.subject if req.principal else "anonymous"


# --- routes ------------------------------------------------------------------------------
@router.post("/markets", scopes=OPERATORS)
def open_market(req: Request) -> Response:
    body = req.json(NewMarket)
    slot = body.slot_start if body.slot_start.tzinfo else body.slot_start.replace(tzinfo=UTC)
    spec = body.model_dump(exclude={"market_id", "slot_start"})
    spec.update(slot_start=slot.timestamp(), slot_start_iso=slot.astimezone(UTC).isoformat(),
                zone=get_settings().zone)
    market_params(spec)  # cross-field checks (band, start price, rounds) with named values
    market_id = body.market_id or f"mkt-{uuid.uuid4().hex[:12]}"
    record = get_store().create(market_id, spec, created_by=_actor(req))
    return json_response(record, 201)


@router.get("/markets", scopes=VIEWERS)
def list_markets(req: Request) -> Response:
    limit = int(_query_int(req, "limit", 50, 1, 1000))
    return json_response({"markets": get_store().list_markets(limit=limit)})


@router.get("/markets/{market_id}", scopes=VIEWERS)
def get_market(req: Request) -> Response:
    store = get_store()
    market_id = _market_id(req)
    record = store.get(market_id)
    record["participants"] = len(store.participants(market_id))
    return json_response(record)


@router.put("/markets/{market_id}/participants/{meter_id}", scopes={"utility", "consumer"})
def join(req: Request) -> Response:
    store = get_store()
    market_id, meter_id = _market_id(req), req.params["meter_id"]
    p = req.json(ParticipantIn)
    spec = store.get(market_id)["spec"]
    profile = register(spec, meter_id, p)
    created = store.put_participant(market_id, meter_id, profile)
    return json_response({"market_id": market_id, "participant": profile}, 201 if created else 200)


@router.post("/markets/{market_id}/participants", scopes=OPERATORS)
def join_many(req: Request) -> Response:
    store = get_store()
    market_id = _market_id(req)
    body = req.json(Participants)
    spec = store.get(market_id)["spec"]
    seen: set[str] = set()
    profiles = []
    for i, p in enumerate(body.participants):
        if p.meter_id is None:
            raise InvalidInput(f"participants.{i}.meter_id is missing", field=f"participants.{i}.meter_id")
        if p.meter_id in seen:
            raise InvalidInput(f"participants.{i}.meter_id {p.meter_id!r} appears twice", field="meter_id")
        seen.add(p.meter_id)
        try:
            profiles.append(register(spec, p.meter_id, p))
        except InvalidInput as exc:
            raise InvalidInput(f"participants.{i}: {exc.message}", **exc.details) from None
    created = sum(store.put_participant(market_id, prof["meter_id"], prof) for prof in profiles)
    return json_response({"market_id": market_id, "added": created, "updated": len(profiles) - created}, 201)


@router.get("/markets/{market_id}/participants", scopes=OPERATORS)
def participants(req: Request) -> Response:
    store = get_store()
    market_id = _market_id(req)
    store.get(market_id)
    return json_response({"market_id": market_id, "participants": list(store.participants(market_id).values())})


@router.post("/markets/{market_id}/run", scopes=OPERATORS)
def run(req: Request) -> Response:
    return json_response(run_market(_market_id(req)))


@router.get("/markets/{market_id}/rounds", scopes=VIEWERS)
def rounds(req: Request) -> Response:
    store = get_store()
    market_id = _market_id(req)
    record = store.get(market_id)
    start = _query_int(req, "from", 0, 0, 100_000)
    count = _query_int(req, "count", 1000, 1, 1000)
    return json_response({"market_id": market_id, "status": record["status"],
                          "rounds": store.rounds(market_id, start=start, count=count)})


@router.get("/markets/{market_id}/result", scopes=VIEWERS)
def result(req: Request) -> Response:
    record = get_store().get(_market_id(req))
    if record["status"] != "cleared":
        return json_response({"market_id": record["id"], "status": record["status"], "result": None,
                              **({"error": record["error"]} if "error" in record else {})}, 202
                             if record["status"] in ("open", "running") else 200)
    return json_response({"market_id": record["id"], "status": "cleared", "result": record["result"]})


@router.get("/markets/{market_id}/trades", scopes=VIEWERS)
def trades(req: Request) -> Response:
    store = get_store()
    market_id = _market_id(req)
    store.get(market_id)
    return json_response({"market_id": market_id, "trades": list(store.trades(market_id).values())})


@router.get("/markets/{market_id}/trades/{meter_id}", scopes=OWN_VIEWERS)
def trade(req: Request) -> Response:
    return json_response(get_store().trade(_market_id(req), req.params["meter_id"]))


@router.get("/meters/{meter_id}/trades", scopes=OWN_VIEWERS)
def meter_trades(req: Request) -> Response:
    limit = _query_int(req, "limit", 100, 1, 1000)
    meter_id = req.params["meter_id"]
    return json_response({"meter_id": meter_id, "trades": get_store().meter_trades(meter_id, limit=limit)})


def _query_int(req: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = req.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {name}={raw!r} is not an integer", field=name) from None
    if not lo <= value <= hi:
        raise InvalidInput(f"query parameter {name}={raw!r} is outside [{lo}, {hi}]", field=name)
    return value


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)

