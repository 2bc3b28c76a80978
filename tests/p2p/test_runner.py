"""The coordinator's domain modules called directly (no HTTP, no handler), against the real Redis fixture.

:mod:`metertwin.p2p.registration` (profiles), :mod:`metertwin.p2p.forecast`, :mod:`metertwin.p2p.channels`
(grouping, gateways), :mod:`metertwin.p2p.runner` (a whole market) and :mod:`metertwin.p2p.settlement`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from metertwin.core.errors import Conflict, InvalidInput
from metertwin.p2p import keys as p2p_keys
from metertwin.p2p.channels import GatewayChannel, LocalChannel, zone_gateways
from metertwin.p2p.clearing import Allocation, clear
from metertwin.p2p.forecast import twin_forecast_kwh
from metertwin.p2p.market import MarketParams
from metertwin.p2p.negotiation import negotiate
from metertwin.p2p.participants import ParticipantIn
from metertwin.p2p.registration import market_params, register
from metertwin.p2p.runner import build_channels, run_market
from metertwin.p2p.settlement import deliver_outcome, money, settle
from metertwin.p2p.store import MarketStore
from metertwin.twin import keys as twin_keys
from tests.redis_backends import redis_client

FEED_IN, RETAIL = 0.08, 0.30


@pytest.fixture
def rds(env: dict[str, str]) -> Iterator[redis.Redis]:
    client = redis_client(env["REDIS_URL"], decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def store(rds: redis.Redis) -> MarketStore:
    return MarketStore(rds)


def _spec(**extra: Any) -> dict[str, Any]:
    """A market spec as ``POST /markets`` stores it."""
    spec: dict[str, Any] = {
        "slot_start": time.time() + 3600, "slot_minutes": 15, "feed_in_tariff": FEED_IN, "retail_tariff": RETAIL,
        "tolerance_kwh": 1e-3, "price_tolerance": 1e-6, "max_rounds": 100, "min_rounds": 0, "start_price": None,
        "round_timeout_ms": 1000, "deliver": False, "zone": "edge",
    }
    spec.update(extra)
    return spec


def _twin(r: redis.Redis, meter_id: str, power_w: float | None = None) -> None:
    doc: dict[str, str | int] = {"v": 1, "z": "edge", "r": "{}", "d": "{}"}
    if power_w is not None:
        doc["m"] = json.dumps({"ts": time.time(), "import_kwh": 1.0, "power_w": power_w})
    r.hset(twin_keys.twin(meter_id), mapping=doc)  # type: ignore[arg-type]  # stubs: Mapping keys are invariant


def _open(store: MarketStore, spec: dict[str, Any]) -> str:
    market_id = f"mkt-{uuid.uuid4().hex[:8]}"
    store.create(market_id, spec, created_by="test")
    return market_id


BUYER = ParticipantIn(forecast_load_kwh=2.0, max_buy_price=0.26, price_ramp=0.02)
SELLER = ParticipantIn(forecast_pv_kwh=3.0, min_sell_price=0.12, price_ramp=0.03)


# --- registration and forecasts ----------------------------------------------------------------
def test_register_resolves_limits_and_the_local_forecast_from_twin_data(rds: redis.Redis) -> None:
    spec = _spec()
    _twin(rds, "m-load", power_w=2000.0)  # 2 kW for 15 min: 0.5 kWh of load
    profile = register(spec, "m-load", ParticipantIn())
    assert profile["meter_id"] == "m-load"
    assert profile["zone"] == "edge"
    assert (profile["max_buy_price"], profile["min_sell_price"]) == (RETAIL, FEED_IN)
    assert math.isclose(profile["forecast_load_kwh"], 0.5)
    assert profile["forecast_pv_kwh"] == 0.0
    assert register(spec, "m-load", BUYER)["max_buy_price"] == 0.26


def test_register_refuses_by_name(rds: redis.Redis) -> None:
    spec = _spec()
    _twin(rds, "m-quiet")
    with pytest.raises(InvalidInput, match="'m-quiet' has no forecast"):
        register(spec, "m-quiet", ParticipantIn())
    with pytest.raises(InvalidInput, match="'other' in the body differs from 'm-quiet'"):
        register(spec, "m-quiet", ParticipantIn(meter_id="other", forecast_load_kwh=1.0))
    with pytest.raises(InvalidInput, match="zone 'mars' of meter 'm-quiet'"):
        register(spec, "m-quiet", ParticipantIn(zone="mars", forecast_load_kwh=1.0))
    with pytest.raises(InvalidInput, match=r"feed_in_tariff 0\.5"):
        market_params(_spec(feed_in_tariff=0.5))


def test_twin_forecast_from_measurement_or_reported_power(rds: redis.Redis) -> None:
    _twin(rds, "m-pv", power_w=-4000.0)
    assert twin_forecast_kwh(rds, "m-pv", 30) == (0.0, 2.0)
    rds.hset(twin_keys.twin("m-rep"), mapping={"v": 1, "r": json.dumps({"power_w": [1200.0, time.time()]})})
    assert twin_forecast_kwh(rds, "m-rep", 60) == (1.2, 0.0)
    _twin(rds, "m-none")
    assert twin_forecast_kwh(rds, "m-none", 15) is None
    assert twin_forecast_kwh(rds, "m-missing", 15) is None


# --- channels -------------------------------------------------------------------------------------
def test_zone_gateways_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2P_ZONE_GATEWAYS", " fog=http://fog:8080 ,, cloud=http://cloud:8080,broken=,=x")
    assert zone_gateways() == {"fog": "http://fog:8080", "cloud": "http://cloud:8080"}


def test_build_channels_groups_twins_by_how_they_are_reached(env: dict[str, str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2P_ZONE_GATEWAYS", "fog=http://fog-gw:8080")
    profiles = {
        "b": {**BUYER.model_dump(), "meter_id": "b", "zone": "edge"},
        "s": {**SELLER.model_dump(), "meter_id": "s"},  # no zone: the market's own
        "f": {"meter_id": "f", "zone": "fog", "forecast_load_kwh": 1.0, "forecast_pv_kwh": 0.5},
        "g": {"meter_id": "g", "zone": "gone", "forecast_load_kwh": 7.0},
    }
    channels, capacity = build_channels("mkt", _spec(), profiles)
    local, remote = channels
    assert isinstance(local, LocalChannel)
    assert local.ids == ["b", "s"]
    assert isinstance(remote, GatewayChannel)
    assert remote.ids == ["f"]
    assert remote.url == "http://fog-gw:8080/function/fog-p2p-bid"
    # the zone without a gateway has no channel (its twins count as zero) but its capacity is known
    assert math.isclose(capacity, 2.0 + 3.0 + 1.5 + 7.0)


# --- a whole market -------------------------------------------------------------------------------
def test_run_market_negotiates_clears_and_records(store: MarketStore, rds: redis.Redis) -> None:
    spec = _spec()
    market_id = _open(store, spec)
    for meter_id, p in (("buyer", BUYER), ("seller", SELLER)):
        _twin(rds, meter_id)
        store.put_participant(market_id, meter_id, register(spec, meter_id, p))

    result = run_market(market_id, store)

    params = MarketParams(FEED_IN, RETAIL)
    alone = negotiate([BUYER.to_bidder("buyer", params, None), SELLER.to_bidder("seller", params, None)], params)
    assert (result["price"], result["rounds"], result["status"]) == (alone.price, len(alone.rounds), alone.status)
    assert result["converged"]
    assert "delivery" not in result
    assert math.isclose(result["bought_kwh"], result["sold_kwh"], abs_tol=1e-9)
    record = store.get(market_id)
    assert record["status"] == "cleared"
    assert record["result"]["price"] == result["price"]
    assert [r["round"] for r in store.rounds(market_id)] == list(range(1, result["rounds"] + 1))
    trades = store.trades(market_id)
    assert {t["side"] for t in trades.values()} == {"buy", "sell"}
    assert rds.zrange(p2p_keys.p2p_meter_trades("buyer"), 0, -1) == [market_id]
    with pytest.raises(Conflict, match="is 'cleared'"):
        run_market(market_id, store)


def test_a_failed_run_marks_the_market_failed(store: MarketStore) -> None:
    market_id = _open(store, _spec())
    # A profile that no longer validates (as if stored by an older version): the run fails, naming why.
    store.put_participant(market_id, "odd", {"meter_id": "odd", "zone": "edge", "forecast_load_kwh": -1.0})
    with pytest.raises(InvalidInput):
        run_market(market_id, store)
    record = store.get(market_id)
    assert record["status"] == "failed"
    assert "forecast_load_kwh" in record["error"]


# --- settlement -------------------------------------------------------------------------------------
def test_settle_prices_every_line_against_the_grid() -> None:
    params = MarketParams(FEED_IN, RETAIL)
    bs = [BUYER.to_bidder("buyer", params, None), SELLER.to_bidder("seller", params, None)]
    neg = negotiate(bs, params)
    allocations = clear(neg.price, neg.final_answers)
    spec = _spec()
    result, lines = settle("mkt", spec, params, neg, allocations, 1.23456)
    assert set(lines) == {"buyer", "seller"}
    buy, sell = lines["buyer"], lines["seller"]
    # Money is in cents, rounded half-up line by line (issue 12 item 8: a trade showed 0.08620271944660955 EUR).
    for line in (buy, sell):
        for key in ("amount", "grid_amount", "benefit"):
            assert line[key] == round(line[key], 2), (key, line[key])
        assert line["amount"] == float(money(line["kwh"] * line["price"]))
    assert buy["grid_amount"] == float(money(buy["kwh"] * RETAIL))
    assert sell["grid_amount"] == float(money(sell["kwh"] * FEED_IN))
    assert buy["benefit"] == pytest.approx(buy["grid_amount"] - buy["amount"], abs=1e-9)
    assert buy["benefit"] >= 0
    assert sell["benefit"] >= 0
    assert buy["counterparty"] == sell["counterparty"] == "pool"
    assert (result["participants"], result["negotiation_ms"], result["price"]) == (2, 1.235, neg.price)
    # The pool's residual from rounding each line: at most half a cent per line.
    assert result["rounding"] == pytest.approx(result["paid"] - result["received"], abs=1e-9)
    assert abs(result["rounding"]) <= 0.005 * len(lines) + 1e-9


class RecordingSink:
    """Twins reached one way; remembers what it was told and answers for some of them only."""

    def __init__(self, ids: list[str], answers: dict[str, dict[str, Any]]) -> None:
        self.ids = ids
        self.answers = answers
        self.calls: list[tuple[float, list[tuple[str, float, float]], int]] = []

    def deliver(self, slot_start: float, trades: list[tuple[str, float, float]], expiry_s: int) -> dict[str, Any]:
        self.calls.append((slot_start, trades, expiry_s))
        return self.answers


def test_deliver_outcome_sends_only_real_trades_and_records_each(store: MarketStore) -> None:
    spec = _spec()
    market_id = _open(store, spec)
    allocations = [Allocation("a", 1.0, 1.0, 0.2, 0.2), Allocation("b", -1.0, -1.0, 0.2, -0.2),
                   Allocation("idle", 0.0, 0.0, 0.2, 0.0)]
    store.finish(market_id, {}, {a.meter_id: {"meter_id": a.meter_id, "kwh": a.kwh} for a in allocations},
                 spec["slot_start"])
    sink = RecordingSink(["a", "b", "idle"], {"a": {"status": "delivered", "command_id": "c1"}})
    quiet = RecordingSink(["nobody"], {})

    counts = deliver_outcome(store, market_id, spec, [sink, quiet], allocations)

    assert counts == {"delivered": 1, "not_sent": 1}
    ((slot_start, trades, expiry_s),) = sink.calls
    assert (slot_start, trades) == (spec["slot_start"], [("a", 1.0, 0.2), ("b", -1.0, 0.2)])
    assert 3600 + 15 * 60 <= expiry_s <= 3600 + 15 * 60 + 60
    assert quiet.calls == []  # nothing to tell its twins
    assert store.trade(market_id, "a")["delivery"] == {"status": "delivered", "command_id": "c1"}
    assert store.trade(market_id, "b")["delivery"] == {"status": "not_sent", "error": "no_answer"}
    assert "delivery" not in store.trade(market_id, "idle")
