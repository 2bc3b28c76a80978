"""A market end to end: gateway process -> p2p-market -> Redis, twin data -> simulated meters get their trade."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from embedded.stack import EmbeddedStack
from meter_sim import FleetThread
from tests.waiting import wait_until as wait_for


@pytest.fixture(scope="module")
def stack() -> Iterator[EmbeddedStack]:
    with EmbeddedStack(zones=("edge",), with_s3=False) as running:
        yield running




def test_twins_negotiate_and_only_the_trade_reaches_each_meter(stack: EmbeddedStack) -> None:
    tag = uuid.uuid4().hex[:6]
    ids = [f"p2p-{tag}-{i}" for i in range(4)]
    credentials = stack.provision(ids)
    assert stack.broker is not None
    # consumers only: their forecasts come from the twin data their meters report
    fleet = FleetThread(broker_host=stack.broker.host, broker_port=stack.broker.port, credentials=credentials,
                        reporting_interval_s=1, link="lan", seed=3, prosumer_share=0.0)
    fleet.start(timeout_s=30)
    try:
        utility = stack.token("utility")

        def mkt(method: str, path: str, **kw: Any) -> Any:
            resp = stack.call("edge", "edge-p2p-market", method, path, token=utility, **kw)
            assert resp.status_code < 300, resp.text
            return resp.json()

        def has_power(meter: str) -> bool:
            resp = stack.call("edge", "edge-read", "GET", f"/meters/{meter}/twin", token=utility)
            return resp.status_code == 200 and "power_w" in str(resp.json())

        for m in ids:
            wait_for(lambda m=m: has_power(m))  # type: ignore[misc]
        market_id = mkt("POST", "/markets", json={"slot_start": time.time() + 900, "feed_in_tariff": 0.08,
                                                  "retail_tariff": 0.30})["id"]
        seller, buyers = ids[0], ids[1:]
        mkt("PUT", f"/markets/{market_id}/participants/{seller}",
            json={"forecast_pv_kwh": 0.2, "min_sell_price": 0.1})
        for m in buyers:
            mkt("PUT", f"/markets/{market_id}/participants/{m}", json={"max_buy_price": 0.28, "price_ramp": 0.05})
        res = mkt("POST", f"/markets/{market_id}/run")
        assert res["converged"]
        assert res["rounds"] > 1
        assert res["sold_kwh"] == pytest.approx(res["bought_kwh"])
        trades = {t["meter_id"]: t for t in mkt("GET", f"/markets/{market_id}/trades")["trades"]}
        assert trades[seller]["kwh"] < 0
        rounds = mkt("GET", f"/markets/{market_id}/rounds")["rounds"]
        assert len(rounds) == res["rounds"]

        for m, t in trades.items():
            if t["kwh"] == 0:
                continue
            command_id = t["delivery"]["command_id"]

            def acked(m: str = m, command_id: str = command_id) -> bool:
                resp = stack.call("edge", "edge-write", "GET", f"/meters/{m}/commands/{command_id}", token=utility)
                return bool(resp.json()["command"]["status"] == "acknowledged")

            wait_for(acked)
            cmds = stack.call("edge", "edge-write", "GET", f"/meters/{m}/commands", token=utility).json()
            trade_cmds = [c for c in cmds["commands"] if c["kind"] == "trade"]
            # one message to the meter for the whole negotiation: its final trade
            assert len(trade_cmds) == 1
            assert trade_cmds[0]["params"] == {"market_id": market_id, "slot_start": pytest.approx(t["slot_start"]),
                                               "kwh": t["kwh"], "price": res["price"]}
        consumer = stack.token("consumer", meter=seller)
        mine = stack.call("edge", "edge-p2p-market", "GET", f"/meters/{seller}/trades", token=consumer)
        assert mine.status_code == 200
        assert [t["market_id"] for t in mine.json()["trades"]] == [market_id]
    finally:
        fleet.stop()
