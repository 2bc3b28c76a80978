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
that does not answer in time counts as zero), move the price (see :mod:`metertwin.p2p.market`).
Twins of this zone answer through a library call (the same code the ``p2p-bid`` function runs);
twins of another zone through that zone's gateway (``/function/<zone>-p2p-bid/bid``), with the
gateways listed in ``P2P_ZONE_GATEWAYS`` (``fog=http://fog-gw:8080,cloud=...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

import contextlib
import functools
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, Field

from metertwin.core import auth
from metertwin.core.clients import get_redis
from metertwin.core.errors import BackendUnavailable, InvalidInput, MeterTwinError
from metertwin.core.http import (
    METER_ID_RE,
    Context,
    Event,
    Request,
    Response,
    Router,
    json_response,
    validate,
)
from metertwin.core.settings import get_settings
from metertwin.p2p import market
from metertwin.p2p.store import MarketStore, deliver_trades, get_store, resolve_bidder

log = logging.getLogger("metertwin.p2p")
router = Router()
OPERATORS = {"utility"}
VIEWERS = {"utility", "billing"}
OWN_VIEWERS = {"utility", "billing", "consumer"}
MARKET_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
MAX_EXPIRY_S = 7 * 24 * 3600
#: An answer beyond what any participant may declare (forecast + battery) is no answer.
MAX_ANSWER_KWH = 30_000.0


# --- request bodies -------------------------------------------------------------------------
class NewMarket(BaseModel):
    """A market for one slot. Prices per kWh; ``slot_start`` is ISO 8601 or epoch seconds."""

    model_config = ConfigDict(extra="forbid")

    market_id: str | None = Field(default=None, pattern=MARKET_ID_RE.pattern)
    slot_start: datetime
    slot_minutes: int = Field(default=15, ge=1, le=1440)
    feed_in_tariff: market.Price
    retail_tariff: market.Price
    tolerance_kwh: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)] = 1e-3
    price_tolerance: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1e-6
    max_rounds: int = Field(default=100, ge=1, le=1000)
    min_rounds: int = Field(default=0, ge=0, le=1000)
    start_price: market.Price | None = None
    round_timeout_ms: int = Field(default=1000, ge=1, le=30_000)
    deliver: bool = True


class Participants(BaseModel):
    model_config = ConfigDict(extra="forbid")

    participants: list[market.ParticipantIn] = Field(min_length=1, max_length=5000)


def _market_id(req: Request) -> str:
    market_id = req.params["market_id"]
    if not MARKET_ID_RE.match(market_id):
        raise InvalidInput(f"market id {market_id!r} is not valid: 1-64 of letters, digits and _.:-", field="market_id")
    return market_id


def _params(spec: Mapping[str, Any]) -> market.MarketParams:
    try:
        return market.MarketParams(
            feed_in_tariff=spec["feed_in_tariff"], retail_tariff=spec["retail_tariff"],
            tolerance_kwh=spec["tolerance_kwh"], price_tolerance=spec["price_tolerance"],
            max_rounds=spec["max_rounds"], min_rounds=spec["min_rounds"], start_price=spec["start_price"],
        )
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def _actor(req: Request) -> str:
    return req.principal.subject if req.principal else "anonymous"


# --- bid channels: how the coordinator asks twins ------------------------------------------
class BidChannel(Protocol):
    """Twins reachable one way. ``ask`` returns the answers that arrived by ``deadline`` (perf_counter)."""

    ids: list[str]

    def ask(self, round_no: int, price: float, deadline: float) -> dict[str, float]: ...

    def deliver(self, slot_start: float, trades: list[tuple[str, float, float]], expiry_s: int) -> dict[str, Any]: ...


class LocalChannel:
    """Twins of this zone: the bid logic runs as a library call in this process.

    Bids are pure and take microseconds, so they run inline; an answer computed after
    the deadline is dropped like a late network answer.
    """

    def __init__(self, market_id: str, bidders: list[market.Bidder]) -> None:
        self.market_id = market_id
        self.bidders = bidders
        self.ids = [b.meter_id for b in bidders]

    def ask(self, round_no: int, price: float, deadline: float) -> dict[str, float]:
        out: dict[str, float] = {}
        clock = time.perf_counter
        for b in self.bidders:
            q = market.bid(b, price)
            if clock() > deadline:
                break
            out[b.meter_id] = q
        return out

    def deliver(self, slot_start: float, trades: list[tuple[str, float, float]], expiry_s: int) -> dict[str, Any]:
        return deliver_trades(self.market_id, slot_start, trades, expiry_s=expiry_s)


@functools.cache
def _http() -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(5.0), limits=httpx.Limits(max_connections=64))


_token: tuple[str, float] = ("", 0.0)


def _service_token() -> str:
    """A ``service`` token for peer zones' p2p-bid, renewed well before it expires."""
    global _token
    token, renew_at = _token
    if time.time() >= renew_at:
        token = auth.issue_token("p2p-market", {"service"}, ttl_s=3600)
        _token = (token, time.time() + 1800)
    return token


class GatewayChannel:
    """Twins of another zone: that zone's ``p2p-bid`` function through its gateway."""

    def __init__(
        self, market_id: str, zone: str, base_url: str, profiles: list[dict[str, Any]], slot_minutes: int
    ) -> None:
        self.market_id = market_id
        self.url = f"{base_url.rstrip('/')}/function/{zone}-p2p-bid"
        self.profiles = profiles
        self.slot_minutes = slot_minutes
        self.ids = [p["meter_id"] for p in profiles]
        self._known = frozenset(self.ids)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {_service_token()}"}

    def ask(self, round_no: int, price: float, deadline: float) -> dict[str, float]:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return {}
        body = {"market_id": self.market_id, "round": round_no, "price": price,
                "slot_minutes": self.slot_minutes, "participants": self.profiles}
        try:
            resp = _http().post(f"{self.url}/bid", json=body, headers=self._headers(), timeout=remaining)
            answers = resp.json().get("answers") if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("market %s round %d: %s unreachable: %s", self.market_id, round_no, self.url, exc)
            return {}
        if not isinstance(answers, dict):
            return {}
        # Anything but a finite number for a twin we asked is no answer.
        return {
            k: float(v) for k, v in answers.items()
            if k in self._known and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v) and abs(v) <= MAX_ANSWER_KWH
        }

    def deliver(self, slot_start: float, trades: list[tuple[str, float, float]], expiry_s: int) -> dict[str, Any]:
        body = {"market_id": self.market_id, "slot_start": slot_start, "expiry_s": expiry_s,
                "trades": [{"meter_id": m, "kwh": k, "price": p} for m, k, p in trades]}
        try:
            resp = _http().post(f"{self.url}/outcome", json=body, headers=self._headers(), timeout=30.0)
            resp.raise_for_status()
            delivery = resp.json().get("delivery")
            return delivery if isinstance(delivery, dict) else {}
        except (httpx.HTTPError, ValueError) as exc:
            return {m: {"status": "not_sent", "error": "zone_unreachable", "message": str(exc)} for m, _, _ in trades}


def zone_gateways() -> dict[str, str]:
    """``P2P_ZONE_GATEWAYS`` (``zone=url,zone=url``) as a mapping."""
    raw = os.environ.get("P2P_ZONE_GATEWAYS", "")
    out = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        zone, _, url = item.partition("=")
        if zone and url:
            out[zone.strip()] = url.strip()
    return out


_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="p2p-ask")


def gather(channels: list[BidChannel], round_no: int, price: float, timeout_s: float) -> dict[str, float]:
    """Ask every channel at once; keep what arrived within ``timeout_s``."""
    deadline = time.perf_counter() + timeout_s
    if len(channels) == 1:
        return channels[0].ask(round_no, price, deadline)
    futures = [_pool.submit(ch.ask, round_no, price, deadline) for ch in channels]
    done, _ = wait(futures, timeout=max(0.0, deadline - time.perf_counter()))
    answers: dict[str, float] = {}
    for fut in done:
        if fut.exception() is None:
            answers.update(fut.result())
    return answers


# --- routes ------------------------------------------------------------------------------
@router.post("/markets", scopes=OPERATORS)
def open_market(req: Request) -> Response:
    body = req.json(NewMarket)
    slot = body.slot_start if body.slot_start.tzinfo else body.slot_start.replace(tzinfo=UTC)
    spec = body.model_dump(exclude={"market_id", "slot_start"})
    spec.update(slot_start=slot.timestamp(), slot_start_iso=slot.astimezone(UTC).isoformat(),
                zone=get_settings().zone)
    _params(spec)  # cross-field checks (band, start price, rounds) with named values
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


def _register(spec: Mapping[str, Any], meter_id: str, p: market.ParticipantIn) -> dict[str, Any]:
    if p.meter_id is not None and p.meter_id != meter_id:
        raise InvalidInput(f"meter_id {p.meter_id!r} in the body differs from {meter_id!r} in the path",
                           field="meter_id")
    if not METER_ID_RE.match(meter_id):
        raise InvalidInput(f"meter id {meter_id!r} is not valid", field="meter_id")
    params = _params(spec)
    here = get_settings().zone
    zone = p.zone or here
    profile = p.model_dump(exclude={"meter_id", "zone"})
    profile.update(meter_id=meter_id, zone=zone)
    profile["max_buy_price"] = p.max_buy_price if p.max_buy_price is not None else params.retail_tariff
    profile["min_sell_price"] = p.min_sell_price if p.min_sell_price is not None else params.feed_in_tariff
    if zone == here:
        # The forecast comes from the twin data of this zone: resolve it now, so a twin without
        # one is refused at the door (naming it) and every round uses the same forecast.
        b = resolve_bidder(get_redis(), p, meter_id, spec["slot_minutes"], params)
        profile.update(forecast_load_kwh=b.load_kwh, forecast_pv_kwh=b.pv_kwh)
    elif zone not in zone_gateways():
        raise InvalidInput(
            f"zone {zone!r} of meter {meter_id!r} is neither this zone ({here!r}) nor one of the "
            f"zones with a gateway {sorted(zone_gateways())}", field="zone",
        )
    elif p.forecast_load_kwh is None and p.forecast_pv_kwh is None:
        # The twin's data lives in its own zone: ask that zone's p2p-bid once, now.
        fc = _remote_forecast(zone, zone_gateways()[zone], meter_id, spec["slot_minutes"])
        if fc is None:
            raise InvalidInput(
                f"meter {meter_id!r} has no forecast: give forecast_load_kwh/forecast_pv_kwh or let its twin "
                f"in zone {zone!r} report power_w", field="forecast_load_kwh", meter_id=meter_id,
            )
        profile.update(forecast_load_kwh=fc[0], forecast_pv_kwh=fc[1])
    return profile


def _remote_forecast(zone: str, base_url: str, meter_id: str, slot_minutes: int) -> tuple[float, float] | None:
    url = f"{base_url.rstrip('/')}/function/{zone}-p2p-bid/forecast"
    try:
        resp = _http().post(url, json={"slot_minutes": slot_minutes, "meter_ids": [meter_id]},
                            headers={"Authorization": f"Bearer {_service_token()}"}, timeout=5.0)
        resp.raise_for_status()
        value = resp.json()["forecasts"][meter_id]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise BackendUnavailable(f"zone {zone!r} did not give the forecast of meter {meter_id!r}: {exc}") from None
    if value is None:
        return None
    load, pv = (float(v) for v in value)
    if not (math.isfinite(load) and math.isfinite(pv) and load >= 0 and pv >= 0):
        raise BackendUnavailable(f"zone {zone!r} gave an invalid forecast {value!r} for meter {meter_id!r}")
    return load, pv


@router.put("/markets/{market_id}/participants/{meter_id}", scopes={"utility", "consumer"})
def join(req: Request) -> Response:
    store = get_store()
    market_id, meter_id = _market_id(req), req.params["meter_id"]
    p = req.json(market.ParticipantIn)
    spec = store.get(market_id)["spec"]
    profile = _register(spec, meter_id, p)
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
            profiles.append(_register(spec, p.meter_id, p))
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


# --- the negotiation ---------------------------------------------------------------------
def build_channels(market_id: str, spec: Mapping[str, Any], profiles: Mapping[str, dict[str, Any]]
                   ) -> tuple[list[BidChannel], float]:
    """Group the participants by how they are reached; also the total capacity (kWh) known here."""
    here = spec.get("zone") or get_settings().zone
    params = _params(spec)
    local: list[market.Bidder] = []
    remote: dict[str, list[dict[str, Any]]] = {}
    for mid in sorted(profiles):
        prof = profiles[mid]
        zone = prof.get("zone") or here
        if zone == here:
            p = validate({k: v for k, v in prof.items() if k != "meter_id"} | {"zone": zone}, market.ParticipantIn)
            local.append(p.to_bidder(mid, params, None))
        else:
            remote.setdefault(zone, []).append(prof)
    channels: list[BidChannel] = []
    if local:
        channels.append(LocalChannel(market_id, local))
    gateways = zone_gateways()
    for zone, profs in sorted(remote.items()):
        if zone in gateways:
            channels.append(GatewayChannel(market_id, zone, gateways[zone], profs, spec["slot_minutes"]))
        else:
            # Its gateway was configured at registration and is gone now: those twins never answer.
            log.error("market %s: no gateway for zone %r; its %d twins count as zero", market_id, zone, len(profs))
    capacity = math.fsum(b.capacity_kwh() for b in local) + math.fsum(
        (p.get("forecast_load_kwh") or 0.0) + (p.get("forecast_pv_kwh") or 0.0)
        for profs in remote.values() for p in profs
    )
    return channels, capacity


def run_market(market_id: str) -> dict[str, Any]:
    """Negotiate, clear, record and deliver one ``open`` market; returns its result."""
    store = get_store()
    spec = store.get(market_id)["spec"]
    params = _params(spec)
    # A run is bounded by its rounds' timeouts; one 'running' for much longer died with its process.
    stale_after_s = spec["max_rounds"] * spec["round_timeout_ms"] / 1000.0 + 300.0
    store.begin_run(market_id, stale_after_s=stale_after_s)
    started = time.perf_counter()
    try:
        profiles = store.participants(market_id)
        channels, capacity = build_channels(market_id, spec, profiles)
        neg = market.Negotiation(params, frozenset(profiles), capacity_kwh=capacity or 1.0)
        timeout_s = spec["round_timeout_ms"] / 1000.0
        while not neg.done:
            answers = gather(channels, len(neg.rounds) + 1, neg.price, timeout_s) if channels else {}
            rec = neg.observe(answers)
            # Each round is recorded as it happens, so the operator can watch the market converge.
            store.append_round(market_id, rec.to_dict())
        negotiation_ms = (time.perf_counter() - started) * 1000
        final = {mid: neg.final_answers.get(mid, 0.0) for mid in profiles}
        allocations = market.clear(neg.price, final)
        result, trade_records = _outcome(market_id, spec, params, neg, allocations, negotiation_ms)
        store.finish(market_id, result, trade_records, spec["slot_start"])
    except Exception as exc:
        why = exc.message if isinstance(exc, MeterTwinError) else f"{type(exc).__name__}: {exc}"
        # Best effort: the original error is the one to report (Redis may be what failed).
        with contextlib.suppress(MeterTwinError):
            store.move(market_id, "running", "failed", field="error", value=why)
        raise
    if spec.get("deliver", True):
        result["delivery"] = _deliver(store, market_id, spec, channels, allocations)
    result["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 3)
    return result


def _outcome(market_id: str, spec: Mapping[str, Any], params: market.MarketParams, neg: market.Negotiation,
             allocations: list[market.Allocation], negotiation_ms: float
             ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    trade_records: dict[str, dict[str, Any]] = {}
    for a in allocations:
        # What the same energy would have cost (or earned) with the grid alone.
        grid = a.kwh * (params.retail_tariff if a.kwh > 0 else params.feed_in_tariff)
        trade_records[a.meter_id] = {
            "market_id": market_id, "meter_id": a.meter_id, "slot_start": spec["slot_start"],
            "slot_minutes": spec["slot_minutes"], "side": a.side, "wanted_kwh": a.wanted_kwh, "kwh": a.kwh,
            "price": a.price, "amount": a.amount, "grid_amount": grid, "benefit": grid - a.amount,
            "counterparty": "pool" if a.kwh else None,
        }
    bought = math.fsum(a.kwh for a in allocations if a.kwh > 0)
    sold = math.fsum(-a.kwh for a in allocations if a.kwh < 0)
    last = neg.rounds[-1] if neg.rounds else None
    result = {
        "market_id": market_id, "slot_start": spec["slot_start"], "slot_minutes": spec["slot_minutes"],
        "status": neg.status, "converged": neg.status in ("converged", "bracketed", "at_retail", "at_feed_in"),
        "price": neg.price, "rounds": len(neg.rounds), "participants": len(allocations),
        "excess_kwh": market.excess_demand(neg.final_answers.values()),
        "bought_kwh": bought, "sold_kwh": sold,
        "paid": math.fsum(a.amount for a in allocations if a.amount > 0),
        "received": math.fsum(-a.amount for a in allocations if a.amount < 0),
        "missing_last_round": last.missing if last else [],
        "negotiation_ms": round(negotiation_ms, 3),
        "feed_in_tariff": params.feed_in_tariff, "retail_tariff": params.retail_tariff,
    }
    return result, trade_records


def _deliver(store: MarketStore, market_id: str, spec: Mapping[str, Any], channels: list[BidChannel],
             allocations: list[market.Allocation]) -> dict[str, int]:
    """Each twin sends its final trade (and only that) to its meter; record what happened."""
    slot_end = spec["slot_start"] + spec["slot_minutes"] * 60
    expiry_s = int(min(MAX_EXPIRY_S, max(60, slot_end - time.time() + 60)))
    by_meter = {a.meter_id: a for a in allocations if a.kwh != 0}
    counts: dict[str, int] = {}
    for ch in channels:
        todo = [(m, by_meter[m].kwh, by_meter[m].price) for m in ch.ids if m in by_meter]
        if not todo:
            continue
        outcome = ch.deliver(spec["slot_start"], todo, expiry_s)
        for meter_id, _, _ in todo:
            delivery = outcome.get(meter_id) or {"status": "not_sent", "error": "no_answer"}
            store.set_delivery(market_id, meter_id, delivery)
            counts[delivery["status"]] = counts.get(delivery["status"], 0) + 1
    return counts


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)

