"""The p2p market through its REST routes, with real Redis and Mosquitto."""

from __future__ import annotations

import json
import math
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import paho.mqtt.client as mqtt
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion
from starlette.datastructures import Headers, QueryParams

from metertwin.core import topics
from metertwin.core.auth import issue_token
from metertwin.core.settings import reset_settings
from metertwin.p2p import keys as p2p_keys
from metertwin.p2p import market
from metertwin.p2p.clearing import reference_clearing
from metertwin.p2p.participants import ParticipantIn
from metertwin.twin import keys as twin_keys
from storage.embedded import Mosquitto
from tests.invoke import Context, Event, call, load_handler
from tests.redis_backends import redis_client

MKT = load_handler("p2p-market")
BID = load_handler("p2p-bid")
SLOT = time.time() + 3600


@pytest.fixture
def utility(env: dict[str, str]) -> str:
    return issue_token("operator", {"utility"})


def _twin(r: redis.Redis, meter_id: str, power_w: float | None = None) -> None:
    doc: dict[str, str | int] = {"v": 1, "z": "edge", "r": "{}", "d": "{}"}
    if power_w is not None:
        doc["m"] = json.dumps({"ts": time.time(), "import_kwh": 1.0, "power_w": power_w})
    r.hset(twin_keys.twin(meter_id), mapping=cast(Any, doc))  # redis-py stubs: Mapping keys are invariant


@pytest.fixture
def rds(env: dict[str, str]) -> Iterator[redis.Redis]:
    client = redis_client(env["REDIS_URL"], decode_responses=True)
    yield client
    client.close()


def _ids(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"m-{tag}-{i}" for i in range(n)]


PROFILES: list[dict[str, Any]] = [
    {"forecast_load_kwh": 2.0, "max_buy_price": 0.26, "price_ramp": 0.02},
    {"forecast_load_kwh": 1.5, "max_buy_price": 0.21},
    {"forecast_pv_kwh": 3.0, "min_sell_price": 0.12, "price_ramp": 0.03},
    {"forecast_load_kwh": 0.2, "forecast_pv_kwh": 1.4, "min_sell_price": 0.10,
     "battery": {"capacity_kwh": 5, "soc_kwh": 4, "max_charge_kwh": 1, "max_discharge_kwh": 1,
                 "charge_below_price": 0.09, "discharge_above_price": 0.2}},
]


def _open(token: str, **extra: Any) -> str:
    body = {"slot_start": SLOT, "feed_in_tariff": 0.08, "retail_tariff": 0.30, **extra}
    status, out = call(MKT, "POST", "/markets", body=body, token=token)
    assert status == 201, out
    assert out["status"] == "open"
    return str(out["id"])


def _market_with(token: str, rds: redis.Redis, meters: list[str], zones: dict[str, str] | None = None,
                 **extra: Any) -> str:
    market_id = _open(token, **extra)
    parts: list[dict[str, Any]] = []
    for m, prof in zip(meters, PROFILES * (len(meters) // len(PROFILES) + 1), strict=False):
        _twin(rds, m)
        parts.append({"meter_id": m, **prof, **({"zone": zones[m]} if zones and m in zones else {})})
    status, out = call(MKT, "POST", f"/markets/{market_id}/participants", body={"participants": parts}, token=token)
    assert status == 201, out
    assert out["added"] == len(meters)
    return market_id


def _bidders(meters: list[str], params: market.MarketParams) -> list[market.Bidder]:
    return [
        ParticipantIn.model_validate(p).to_bidder(m, params, None)
        for m, p in zip(meters, PROFILES * (len(meters) // len(PROFILES) + 1), strict=False)
    ]


def test_open_join_run_follow_and_settle(utility: str, rds: redis.Redis) -> None:
    meters = _ids(4)
    market_id = _market_with(utility, rds, meters, deliver=False)
    status, out = call(MKT, "GET", f"/markets/{market_id}/result", token=utility)
    assert (status, out["status"]) == (202, "open")

    status, res = call(MKT, "POST", f"/markets/{market_id}/run", token=utility)
    assert status == 200, res
    assert res["converged"]
    assert res["rounds"] <= 100
    assert 0.08 <= res["price"] <= 0.30
    assert math.isclose(res["bought_kwh"], res["sold_kwh"], abs_tol=1e-9)
    assert res["rounding"] == pytest.approx(res["paid"] - res["received"], abs=1e-9)  # lines rounded to cents
    assert abs(res["rounding"]) <= 0.005 * res["participants"] + 1e-9

    # the same as an independent reference clearing
    params = market.MarketParams(0.08, 0.30)
    bs = _bidders(meters, params)
    ref = reference_clearing(bs, params)
    z = market.excess_demand(market.bid(b, res["price"]) for b in bs)
    assert abs(z) <= 1e-3 or abs(res["price"] - ref.price) <= 1e-5

    status, rounds = call(MKT, "GET", f"/markets/{market_id}/rounds", token=utility)
    assert status == 200
    assert [r["round"] for r in rounds["rounds"]] == list(range(1, res["rounds"] + 1))
    assert rounds["rounds"][-1]["price"] == pytest.approx(res["price"]) or res["status"] == "bracketed"
    status, page = call(MKT, "GET", f"/markets/{market_id}/rounds", token=utility, query={"from": "1", "count": "1"})
    assert [r["round"] for r in page["rounds"]] == [2]

    status, got = call(MKT, "GET", f"/markets/{market_id}", token=utility)
    assert (got["status"], got["participants"], got["result"]["price"]) == ("cleared", 4, res["price"])

    status, trades = call(MKT, "GET", f"/markets/{market_id}/trades", token=utility)
    assert status == 200
    lines = trades["trades"]
    assert sorted(t["meter_id"] for t in lines) == sorted(meters)
    assert math.fsum(t["kwh"] for t in lines) == pytest.approx(0, abs=1e-9)
    assert math.fsum(t["amount"] for t in lines) == pytest.approx(res["rounding"], abs=1e-9)
    assert all(t["amount"] == round(t["amount"], 2) for t in lines)
    for t in lines:
        assert t["price"] == res["price"]
        assert t["benefit"] >= -1e-12
        assert t["slot_start"] == pytest.approx(SLOT)

    # running again, or joining a cleared market, is a conflict
    assert call(MKT, "POST", f"/markets/{market_id}/run", token=utility)[0] == 409
    status, out = call(MKT, "PUT", f"/markets/{market_id}/participants/{meters[0]}",
                       body={"forecast_load_kwh": 1}, token=utility)
    assert status == 409
    assert "'cleared'" in out["message"]


def test_forecast_comes_from_twin_data(utility: str, rds: redis.Redis) -> None:
    buyer, seller, blank = _ids(3)
    _twin(rds, buyer, power_w=2000.0)  # 2 kW for 15 min: 0.5 kWh to buy
    _twin(rds, seller, power_w=-4000.0)
    _twin(rds, blank)
    market_id = _open(utility, deliver=False)
    for m in (buyer, seller):
        status, out = call(MKT, "PUT", f"/markets/{market_id}/participants/{m}", body={}, token=utility)
        assert status == 201, out
    status, out = call(MKT, "PUT", f"/markets/{market_id}/participants/{blank}", body={}, token=utility)
    assert status == 400
    assert blank in out["message"]
    assert "forecast" in out["message"]
    status, _res = call(MKT, "POST", f"/markets/{market_id}/run", token=utility)
    assert status == 200
    trades = call(MKT, "GET", f"/markets/{market_id}/trades", token=utility)[1]["trades"]
    by = {t["meter_id"]: t for t in trades}
    assert by[buyer]["kwh"] == pytest.approx(0.5)
    assert by[seller]["kwh"] == pytest.approx(-0.5)
    assert by[seller]["wanted_kwh"] == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/markets", {"slot_start": SLOT, "feed_in_tariff": 0.3, "retail_tariff": 0.2}, "feed_in_tariff 0.3"),
        ("/markets", {"slot_start": SLOT, "feed_in_tariff": -1, "retail_tariff": 0.2}, "feed_in_tariff"),
        ("/markets", {"slot_start": SLOT, "feed_in_tariff": 0.1, "retail_tariff": 0.2, "start_price": 0.5},
         "start_price 0.5"),
        ("/markets", {"slot_start": "yesterday", "feed_in_tariff": 0.1, "retail_tariff": 0.2}, "slot_start"),
        ("/markets", {"slot_start": SLOT, "feed_in_tariff": 0.1, "retail_tariff": 0.2, "max_rounds": 0},
         "max_rounds"),
        ("/markets", {"slot_start": SLOT, "feed_in_tariff": 0.1, "retail_tariff": 0.2, "bid": 1}, "bid"),
        ("JOIN", {"forecast_load_kwh": 1, "max_buy_price": -0.1}, "max_buy_price"),
        ("JOIN", {"forecast_load_kwh": "lots"}, "forecast_load_kwh"),
        ("JOIN", {"forecast_pv_kwh": 1e9}, "forecast_pv_kwh"),
        ("JOIN", {"forecast_load_kwh": 1, "min_sell_price": "NaN"}, "min_sell_price"),
        ("JOIN", {"forecast_load_kwh": 1, "battery": {"capacity_kwh": 2, "soc_kwh": 3, "max_charge_kwh": 1,
                                                      "max_discharge_kwh": 1, "charge_below_price": 0.1,
                                                      "discharge_above_price": 0.2}}, "soc_kwh 3"),
        ("JOIN", {"forecast_load_kwh": 1, "zone": "mars"}, "zone 'mars'"),
        ("JOIN", {"forecast_load_kwh": 1, "meter_id": "other"}, "meter_id 'other'"),
        ("JOIN", b"{not json", "not valid JSON"),
    ],
)
def test_bad_values_are_rejected_by_name(utility: str, rds: redis.Redis, path: str, body: Any, named: str) -> None:
    if path == "JOIN":
        (meter,) = _ids(1)
        _twin(rds, meter)
        path, method = f"/markets/{_open(utility)}/participants/{meter}", "PUT"
    else:
        method = "POST"
    status, out = call(MKT, method, path, body=body, token=utility)
    assert status == 400, out
    assert out["error"] == "invalid_input"
    assert named in out["message"], out


def test_bad_ids_and_unknown_market(utility: str) -> None:
    assert call(MKT, "GET", "/markets/no%20such", token=utility)[0] == 400
    status, out = call(MKT, "GET", "/markets/nope", token=utility)
    assert status == 404
    assert "'nope'" in out["message"]
    assert call(MKT, "POST", "/markets/nope/run", token=utility)[0] == 404
    assert call(MKT, "GET", "/markets", token=None)[0] == 401


def test_consumer_sees_only_its_own_trades(utility: str, rds: redis.Redis) -> None:
    meters = _ids(4)
    market_id = _market_with(utility, rds, meters, deliver=False)
    assert call(MKT, "POST", f"/markets/{market_id}/run", token=utility)[0] == 200
    mine, other = meters[0], meters[2]
    consumer = issue_token("alice", {"consumer"}, meter=mine)

    status, out = call(MKT, "GET", f"/meters/{mine}/trades", token=consumer)
    assert status == 200
    assert [t["meter_id"] for t in out["trades"]] == [mine]
    assert out["trades"][0]["market_id"] == market_id
    assert call(MKT, "GET", f"/markets/{market_id}/trades/{mine}", token=consumer)[0] == 200
    assert call(MKT, "GET", f"/meters/{other}/trades", token=consumer)[0] == 403
    assert call(MKT, "GET", f"/markets/{market_id}/trades/{other}", token=consumer)[0] == 403
    assert call(MKT, "GET", f"/markets/{market_id}/trades", token=consumer)[0] == 403
    assert call(MKT, "GET", f"/markets/{market_id}/rounds", token=consumer)[0] == 403
    assert call(MKT, "POST", "/markets", body={}, token=consumer)[0] == 403


def test_consumer_joins_with_its_own_meter_only(utility: str, rds: redis.Redis) -> None:
    mine, other = _ids(2)
    _twin(rds, mine)
    market_id = _open(utility)
    consumer = issue_token("bob", {"consumer"}, meter=mine)
    body = {"forecast_load_kwh": 1.0, "max_buy_price": 0.2}
    assert call(MKT, "PUT", f"/markets/{market_id}/participants/{mine}", body=body, token=consumer)[0] == 201
    assert call(MKT, "PUT", f"/markets/{market_id}/participants/{mine}", body=body, token=consumer)[0] == 200
    assert call(MKT, "PUT", f"/markets/{market_id}/participants/{other}", body=body, token=consumer)[0] == 403


def test_meters_get_only_their_final_trade(utility: str, rds: redis.Redis, mosquitto: Mosquitto) -> None:
    meters = _ids(4)
    got: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
    sub.username_pw_set(mosquitto.service_user, mosquitto.service_password)
    subscribed = threading.Event()
    sub.on_message = lambda _c, _u, msg: got.put((msg.topic, json.loads(msg.payload)))
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.connect(mosquitto.host, mosquitto.port)
    sub.loop_start()
    try:
        sub.subscribe("meters/+/down/#", qos=1)
        assert subscribed.wait(5)
        market_id = _market_with(utility, rds, meters)
        status, res = call(MKT, "POST", f"/markets/{market_id}/run", token=utility)
        assert status == 200, res
        lines = call(MKT, "GET", f"/markets/{market_id}/trades", token=utility)[1]["trades"]
        trades = {t["meter_id"]: t for t in lines}
        trading = {m for m, t in trades.items() if t["kwh"] != 0}
        assert trading
        assert res["delivery"] == {"delivered": len(trading)}

        msgs: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + 5
        while len(msgs) < len(trading) and time.monotonic() < deadline:
            try:
                msgs.append(got.get(timeout=0.1))
            except queue.Empty:
                continue
        # one message per trading meter, after many rounds: only the outcome reaches the meter
        assert res["rounds"] > 1
        assert sorted(topic for topic, _ in msgs) == sorted(topics.commands(m) for m in trading)
        for topic, cmd in msgs:
            m = topics.meter_id_of(topic)
            assert cmd["kind"] == "trade"
            assert cmd["params"] == {"market_id": market_id, "slot_start": pytest.approx(SLOT),
                                     "kwh": trades[m]["kwh"], "price": res["price"]}
            assert trades[m]["delivery"]["status"] == "delivered"
            assert trades[m]["delivery"]["command_id"] == cmd["id"]
        time.sleep(0.2)  # nothing else follows (a bounded look for stray messages, not a wait for state)
        assert got.empty()
    finally:
        sub.loop_stop()
        sub.disconnect()


# --- twins in other zones: their p2p-bid function over HTTP --------------------------------
class _BidServer:
    """The p2p-bid handler behind a real HTTP socket, as a zone's gateway serves it."""

    def __init__(self, zone: str, delay_s: float = 0.0) -> None:
        prefix = f"/function/{zone}-p2p-bid"
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                path = self.path.split("?")[0].removeprefix(prefix) or "/"
                event = Event(body, Headers(dict(self.headers.items())), "POST", QueryParams(), path)
                resp = BID.handle(event, Context())
                data = json.dumps(resp["body"]).encode()
                self.send_response(resp["statusCode"])
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                outer.calls += 1

            def log_message(self, *_a: Any) -> None:
                pass

        self.delay_s = delay_s
        self.calls = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _trades(token: str, market_id: str) -> dict[str, tuple[float, float]]:
    lines = call(MKT, "GET", f"/markets/{market_id}/trades", token=token)[1]["trades"]
    return {t["meter_id"]: (t["kwh"], t["price"]) for t in lines}


def test_same_result_whichever_zone_the_twins_run_in(
    utility: str, rds: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    meters = _ids(8)
    fog = _BidServer("fog")
    try:
        monkeypatch.setenv("P2P_ZONE_GATEWAYS", f"fog={fog.url}")
        local = _market_with(utility, rds, meters, deliver=False)
        split = _market_with(utility, rds, meters, zones=dict.fromkeys(meters[::2], "fog"), deliver=False)
        res_local = call(MKT, "POST", f"/markets/{local}/run", token=utility)[1]
        res_split = call(MKT, "POST", f"/markets/{split}/run", token=utility)[1]
        assert fog.calls == res_split["rounds"]  # one call per round for the fog twins
        # the coordinator itself in another zone
        monkeypatch.setenv("ZONE", "fog")
        reset_settings()
        in_fog = _market_with(utility, rds, meters, deliver=False)
        res_fog = call(MKT, "POST", f"/markets/{in_fog}/run", token=utility)[1]
    finally:
        fog.close()
    for res in (res_split, res_fog):
        for name in ("price", "rounds", "status"):
            assert res[name] == res_local[name]
    assert _trades(utility, local) == _trades(utility, split) == _trades(utility, in_fog)


def test_twins_that_time_out_count_as_zero(utility: str, rds: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    meters = _ids(8)
    slow = _BidServer("cloud", delay_s=0.3)
    try:
        monkeypatch.setenv("P2P_ZONE_GATEWAYS", f"cloud={slow.url}")
        late = set(meters[1::3])
        market_id = _market_with(utility, rds, meters, zones=dict.fromkeys(late, "cloud"),
                                 round_timeout_ms=100, deliver=False)
        status, res = call(MKT, "POST", f"/markets/{market_id}/run", token=utility)
    finally:
        slow.close()
    assert status == 200, res
    assert res["converged"]
    assert sorted(res["missing_last_round"]) == sorted(late)
    rounds = call(MKT, "GET", f"/markets/{market_id}/rounds", token=utility)[1]["rounds"]
    assert all(sorted(r["missing"]) == sorted(late) for r in rounds)
    trades = _trades(utility, market_id)
    assert all(trades[m][0] == 0 for m in late)
    # the others cleared exactly as a market without the late twins would
    params = market.MarketParams(0.08, 0.30)
    alive = [b for b in _bidders(meters, params) if b.meter_id not in late]
    z = market.excess_demand(market.bid(b, res["price"]) for b in alive)
    ref = reference_clearing(alive, params)
    assert abs(z) <= 1e-3 or abs(res["price"] - ref.price) <= 1e-5
    assert math.fsum(k for k, _ in trades.values()) == pytest.approx(0, abs=1e-9)


def test_bid_function_validates_and_answers(env: dict[str, str], rds: redis.Redis) -> None:
    service = issue_token("p2p-market", {"service"})
    (meter,) = _ids(1)
    _twin(rds, meter, power_w=-2000)
    body = {"market_id": "x", "round": 1, "price": 0.2, "participants": [
        {"meter_id": meter, "max_buy_price": 0.3, "min_sell_price": 0.1},
    ]}
    status, out = call(BID, "POST", "/bid", body=body, token=service)
    assert status == 200, out
    assert out["answers"] == {meter: pytest.approx(-0.5)}
    bad = {**body, "price": -1}
    status, out = call(BID, "POST", "/bid", body=bad, token=service)
    assert status == 400
    assert "price" in out["message"]
    assert call(BID, "POST", "/bid", body=body, token=issue_token("op", {"utility"}))[0] == 403


def test_a_run_that_died_can_be_restarted(utility: str, rds: redis.Redis) -> None:
    meters = _ids(2)
    market_id = _market_with(utility, rds, meters, deliver=False)
    # a coordinator that died mid-run left the market 'running' with some rounds
    rds.hset(p2p_keys.p2p_market(market_id), mapping={"status": "running", "updated_at": repr(time.time())})
    rds.rpush(p2p_keys.p2p_rounds(market_id), json.dumps({"round": 1}))
    status, out = call(MKT, "POST", f"/markets/{market_id}/run", token=utility)
    assert status == 409
    assert "'running'" in out["message"]
    rds.hset(p2p_keys.p2p_market(market_id), "updated_at", repr(time.time() - 3600))
    status, res = call(MKT, "POST", f"/markets/{market_id}/run", token=utility)
    assert status == 200, res
    rounds = call(MKT, "GET", f"/markets/{market_id}/rounds", token=utility)[1]["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, res["rounds"] + 1))


def test_remote_twin_forecast_is_fixed_at_registration(
    utility: str, rds: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_data, without = _ids(2)
    _twin(rds, with_data, power_w=-2000.0)
    _twin(rds, without)
    fog = _BidServer("fog")
    try:
        monkeypatch.setenv("P2P_ZONE_GATEWAYS", f"fog={fog.url}")
        market_id = _open(utility, deliver=False)
        path = f"/markets/{market_id}/participants"
        status, out = call(MKT, "PUT", f"{path}/{with_data}", body={"zone": "fog"}, token=utility)
        assert status == 201, out
        assert (out["participant"]["forecast_load_kwh"], out["participant"]["forecast_pv_kwh"]) == (0.0, 0.5)
        status, out = call(MKT, "PUT", f"{path}/{without}", body={"zone": "fog"}, token=utility)
        assert status == 400
        assert without in out["message"]
        assert "'fog'" in out["message"]
    finally:
        fog.close()
    # the zone's gateway is gone: registering needs it, and says which zone failed
    status, out = call(MKT, "PUT", f"{path}/{with_data}", body={"zone": "fog"}, token=utility)
    assert status == 503
    assert "'fog'" in out["message"]
