"""A twin's side of the peer-to-peer market: answer a price with a quantity; send the final trade to the meter.

Routes (after ``/function/<zone>-p2p-bid``), for the market coordinator (``service`` token):

* ``POST /bid`` ``{"market_id", "round", "price", "slot_minutes", "participants": [profile, ...]}`` —
  each twin's answer at ``price``: ``{"answers": {meter_id: kWh}}`` (``+`` buy, ``-`` sell).
  A profile without a forecast gets one from its twin in this zone's Redis.
* ``POST /forecast`` ``{"slot_minutes", "meter_ids": [...]}`` — each twin's forecast for the slot from
  its data in this zone (the coordinator fixes it at registration, so every round uses the same one).
* ``POST /outcome`` ``{"market_id", "slot_start", "expiry_s", "trades": [{"meter_id", "kwh", "price"}]}`` —
  each twin sends only its final trade to its meter through the write capability.

The coordinator calls this function through the gateway for twins of *other* zones; for
twins of its own zone it runs the same code (:func:`metertwin.p2p.market.bid`,
:func:`metertwin.p2p.settlement.deliver_trades`) as a library call, which saves an HTTP hop per round.
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from metertwin.core.clients import get_redis
from metertwin.core.errors import InvalidInput
from metertwin.core.http import METER_ID_RE, Context, Event, Request, Response, Router, json_response
from metertwin.p2p.forecast import resolve_bidder, twin_forecast_kwh
from metertwin.p2p.market import MarketParams, bid
from metertwin.p2p.participants import ParticipantIn, Price
from metertwin.p2p.settlement import deliver_trades

router = Router()
COORDINATOR = {"service"}


class Profile(ParticipantIn):
    """A participant as the coordinator forwards it: limits resolved, forecast maybe not."""

    meter_id: str = Field(min_length=1, max_length=64)
    max_buy_price: Price
    min_sell_price: Price


class ForecastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slot_minutes: int = Field(default=15, ge=1, le=1440)
    meter_ids: list[str] = Field(min_length=1, max_length=10_000)


class BidRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    market_id: str = Field(min_length=1, max_length=64)
    round: int = Field(ge=1, le=10_000)
    price: Price
    slot_minutes: int = Field(default=15, ge=1, le=1440)
    participants: list[Profile] = Field(max_length=10_000)


class TradeOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meter_id: str = Field(min_length=1, max_length=64)
    kwh: Annotated[float, Field(ge=-10_000, le=10_000, allow_inf_nan=False)]
    price: Price


class OutcomeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    market_id: str = Field(min_length=1, max_length=64)
    slot_start: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    expiry_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    trades: list[TradeOut] = Field(max_length=10_000)


@router.post("/bid", scopes=COORDINATOR)
def bid_route(req: Request) -> Response:
    body = req.json(BidRequest)
    # Only the price range matters to resolve defaults; limits arrive resolved.
    params = MarketParams(0.0, 10.0)
    bidders = []
    for p in body.participants:
        if not METER_ID_RE.match(p.meter_id):
            raise InvalidInput(f"participants: meter id {p.meter_id!r} is not valid", field="meter_id")
        bidders.append(resolve_bidder(get_redis(), p, p.meter_id, body.slot_minutes, params))
    answers = {b.meter_id: bid(b, body.price) for b in bidders}
    return json_response({"market_id": body.market_id, "round": body.round, "answers": answers})


@router.post("/forecast", scopes=COORDINATOR)
def forecast_route(req: Request) -> Response:
    """Each twin's persistence forecast ``[load_kwh, pv_kwh]`` for a slot from its data here (``null``: none)."""
    body = req.json(ForecastRequest)
    out: dict[str, list[float] | None] = {}
    for meter_id in body.meter_ids:
        if not METER_ID_RE.match(meter_id):
            raise InvalidInput(f"meter_ids: meter id {meter_id!r} is not valid", field="meter_ids")
        fc = twin_forecast_kwh(get_redis(), meter_id, body.slot_minutes)
        out[meter_id] = list(fc) if fc is not None else None
    return json_response({"forecasts": out})


@router.post("/outcome", scopes=COORDINATOR)
def outcome_route(req: Request) -> Response:
    body = req.json(OutcomeRequest)
    trades = [(t.meter_id, t.kwh, t.price) for t in body.trades if t.kwh != 0]
    delivery = deliver_trades(body.market_id, body.slot_start, trades, expiry_s=body.expiry_s)
    return json_response({"market_id": body.market_id, "delivery": delivery})


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
