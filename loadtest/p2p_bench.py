"""Peer-to-peer negotiation: twins next to each other vs physical meters in every round (seed 000, Scenario 2).

``python -m loadtest.p2p_bench`` starts its own Redis, Mosquitto and one gateway process
(serving ``edge-p2p-market``, ``edge-p2p-bid`` and ``fog-p2p-bid`` from a temporary stack
file), then measures, in one run, side by side:

* **twins, library bids**: ``POST /function/edge-p2p-market/markets/{id}/run`` through the
  gateway; 100 rounds (``min_rounds = max_rounds = 100``) between two twins; every round is
  recorded in Redis. Timed from the client: the whole HTTP call.
* **twins, HTTP bids**: the same, but the twins are registered in zone ``fog`` so every round
  asks them through the gateway (``/function/fog-p2p-bid/bid``): what a twin in another zone costs.
* **twins, in memory**: :func:`metertwin.p2p.negotiation.negotiate` alone (no Redis, no HTTP).
* **meters in the loop**: the same negotiation (:class:`metertwin.p2p.negotiation.Negotiation`), but
  each round asks the two *meters* over MQTT v5 request/response through Mosquitto; a minimal
  in-process responder per meter delays each leg (request and answer) by the link profile
  (``meter_sim.profile.LINKS``: NB-IoT-like 0.4-0.8 s, WiFi-like 60-140 ms, LAN 0). To keep
  the run short these negotiations run fewer rounds (``--wifi-rounds``, ``--nbiot-rounds``);
  the table reports the median round time and that time x 100.
* **rounds to converge** on random markets (2-50 participants; median, p95, max).
* **markets cleared per second**: in memory (10 participants) and through the gateway
  (open + join 10 + run, sequentially, one client).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.server import GatewayProcess
from meter_sim.profile import LINKS, LinkProfile
from metertwin.core import topics
from metertwin.core.auth import issue_token
from metertwin.core.errors import MeterTimeout
from metertwin.core.mqtt import TwinMqtt
from metertwin.core.settings import reset_settings
from metertwin.p2p import market
from metertwin.p2p.clearing import clear
from metertwin.p2p.negotiation import Negotiation, negotiate
from metertwin.p2p.participants import ParticipantIn
from storage.embedded import Mosquitto, RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
FEED_IN, RETAIL = 0.08, 0.30
#: Benchmark-only request topic of the meter-in-the-loop baseline (meters do not bid in metertwin).
BID_SUFFIX = "down/p2p-bid"


class Broker(Mosquitto):
    """The embedded Mosquitto with ``set_tcp_nodelay true``.

    Without it the broker's back-to-back small packets (a PUBACK, then the answer) wait for
    a delayed TCP ACK: about 40 ms added to every MQTT round trip on loopback, which would
    inflate the meter-in-the-loop baseline with an artefact that is not the link.
    """

    def _spawn(self, argv: list[str]) -> None:
        conf = Path(argv[argv.index("-c") + 1])
        conf.write_text(conf.read_text() + "set_tcp_nodelay true\n")
        super()._spawn(argv)


def nodelay(client: mqtt.Client) -> None:
    """Disable Nagle on a connected paho client (paho does not)."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def bid_topic(meter_id: str) -> str:
    return f"{topics.meter_root(meter_id)}/{BID_SUFFIX}"


TWO = [
    {"meter_id": "bench-buyer", "forecast_load_kwh": 3.0, "max_buy_price": 0.25, "price_ramp": 0.02},
    {"meter_id": "bench-seller", "forecast_pv_kwh": 4.0, "min_sell_price": 0.12, "price_ramp": 0.03},
]


def two_bidders(params: market.MarketParams) -> list[market.Bidder]:
    return [ParticipantIn.model_validate(p).to_bidder(str(p["meter_id"]), params, None) for p in TWO]


# --- random markets -------------------------------------------------------------------------
def random_market(rng: random.Random, n: int) -> tuple[list[dict[str, Any]], market.MarketParams]:
    feed = rng.uniform(0.0, 0.15)
    params = market.MarketParams(feed, feed + rng.uniform(0.03, 0.4))
    parts = []
    for i in range(n):
        p: dict[str, Any] = {
            "meter_id": f"r{i:03d}",
            "forecast_load_kwh": rng.choice([0.0, rng.uniform(0, 6)]),
            "forecast_pv_kwh": rng.choice([0.0, rng.uniform(0, 6)]),
            "max_buy_price": rng.uniform(0, 0.6), "min_sell_price": rng.uniform(0, 0.6),
            "price_ramp": rng.choice([0.0, rng.uniform(0.005, 0.1)]),
        }
        if rng.random() < 0.3:
            cap = rng.uniform(0.5, 15)
            lo = rng.uniform(0, 0.5)
            p["battery"] = {"capacity_kwh": cap, "soc_kwh": rng.uniform(0, cap), "max_charge_kwh": rng.uniform(0, 5),
                            "max_discharge_kwh": rng.uniform(0, 5), "charge_below_price": lo,
                            "discharge_above_price": lo + rng.uniform(0, 0.3)}
        parts.append(p)
    return parts, params


def to_bidders(parts: list[dict[str, Any]], params: market.MarketParams) -> list[market.Bidder]:
    return [ParticipantIn.model_validate(p).to_bidder(p["meter_id"], params, None) for p in parts]


def rounds_to_converge(count: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    rounds, capped = [], 0
    for _ in range(count):
        parts, params = random_market(rng, rng.randint(2, 50))
        neg = negotiate(to_bidders(parts, params), params)
        rounds.append(len(neg.rounds))
        capped += neg.status == "max_rounds"
    rounds.sort()
    return {"markets": count, "median": statistics.median(rounds), "p95": rounds[int(0.95 * (count - 1))],
            "max": rounds[-1], "hit_round_limit": capped}


def markets_per_second_in_memory(count: int, seed: int) -> float:
    rng = random.Random(seed)
    cases = [random_market(rng, 10) for _ in range(count)]
    prepared = [(to_bidders(parts, params), params) for parts, params in cases]
    t0 = time.perf_counter()
    for bs, params in prepared:
        neg = negotiate(bs, params)
        clear(neg.price, neg.final_answers)
    return count / (time.perf_counter() - t0)


# --- twins through the gateway ---------------------------------------------------------------
class Api:
    def __init__(self, url: str, token: str) -> None:
        self.base = f"{url}/function/edge-p2p-market"
        self.http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=60.0)

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        resp = self.http.request(method, self.base + path, json=body)
        if resp.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {resp.status_code} {resp.text[:300]}")
        out: dict[str, Any] = resp.json()
        return out

    def new_market(self, parts: list[dict[str, Any]], params: market.MarketParams, **extra: Any) -> str:
        body = {"slot_start": time.time() + 3600, "feed_in_tariff": params.feed_in_tariff,
                "retail_tariff": params.retail_tariff, "deliver": False, **extra}
        market_id = str(self.call("POST", "/markets", body)["id"])
        self.call("POST", f"/markets/{market_id}/participants", {"participants": parts})
        return market_id


def time_runs(api: Api, parts: list[dict[str, Any]], rounds: int, repeats: int) -> tuple[list[float], list[float]]:
    params = market.MarketParams(FEED_IN, RETAIL)
    walls, server = [], []
    for _ in range(repeats):
        market_id = api.new_market(parts, params, min_rounds=rounds, max_rounds=rounds)
        t0 = time.perf_counter()
        res = api.call("POST", f"/markets/{market_id}/run")
        walls.append(time.perf_counter() - t0)
        server.append(res["negotiation_ms"] / 1000)
        assert res["rounds"] == rounds, res
    return walls, server


def markets_per_second_gateway(api: Api, count: int, seed: int) -> float:
    rng = random.Random(seed)
    cases = [random_market(rng, 10) for _ in range(count)]
    t0 = time.perf_counter()
    for parts, params in cases:
        market_id = api.new_market(parts, params)
        api.call("POST", f"/markets/{market_id}/run")
    return count / (time.perf_counter() - t0)


# --- meters in the loop ------------------------------------------------------------------------
class MeterResponder:
    """Simulated physical meters that bid themselves: each leg of a request/answer is delayed by the link."""

    def __init__(self, broker: Mosquitto, bidders: list[market.Bidder], link: LinkProfile, seed: int = 1) -> None:
        self.bidders = {b.meter_id: b for b in bidders}
        self.link = link
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"p2p-meters-{os.getpid()}-{link.name}",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(broker.service_user, broker.service_password)
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.connect(broker.host, broker.port)
        nodelay(self.client)
        self.client.loop_start()
        self.client.subscribe(f"{topics.ROOT}/+/{BID_SUFFIX}", qos=1)
        if not ready.wait(10):
            raise RuntimeError("meter responder could not subscribe")

    def _delay(self) -> float:
        with self._lock:
            return self.link.sample(self.rng)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        meter_id = topics.meter_id_of(msg.topic)
        response_topic = getattr(msg.properties, "ResponseTopic", None)
        correlation = getattr(msg.properties, "CorrelationData", None)
        price = float(json.loads(msg.payload)["price"])
        bidder = self.bidders.get(meter_id)
        if bidder is None or not response_topic:
            return

        def answer() -> None:  # after the downlink leg: the meter bids, then the uplink leg
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation
            body = json.dumps({"kwh": market.bid(bidder, price)}).encode()
            _later(self._delay(), lambda: self.client.publish(response_topic, body, qos=1, properties=props))

        _later(self._delay(), answer)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _later(delay_s: float, fn: Callable[[], Any]) -> None:
    if delay_s <= 0:
        fn()
        return
    t = threading.Timer(delay_s, fn)
    t.daemon = True
    t.start()


def meters_in_the_loop(twin: TwinMqtt, bidders: list[market.Bidder], rounds: int, timeout_s: float) -> list[float]:
    """Per-round times of a negotiation whose every round asks the meters themselves."""
    params = market.MarketParams(FEED_IN, RETAIL, min_rounds=rounds, max_rounds=rounds)
    neg = Negotiation(params, frozenset(b.meter_id for b in bidders),
                             capacity_kwh=math.fsum(b.capacity_kwh() for b in bidders))
    per_round = []
    with ThreadPoolExecutor(max_workers=len(bidders)) as pool:
        while not neg.done:
            price, t0 = neg.price, time.perf_counter()

            def ask(meter_id: str, price: float = price) -> tuple[str, float | None]:
                try:
                    answer = twin.request(meter_id, bid_topic(meter_id), {"price": price}, timeout_s=timeout_s)
                except MeterTimeout:
                    return meter_id, None
                return meter_id, float(answer["kwh"])

            futures = [pool.submit(ask, b.meter_id) for b in bidders]
            wait(futures, timeout=timeout_s + 1)
            answers = {m: q for f in futures if f.done() for m, q in [f.result()] if q is not None}
            neg.observe(answers)
            per_round.append(time.perf_counter() - t0)
    return per_round


# --- the run ------------------------------------------------------------------------------------
def _stack(path: Path, redis_url: str, broker: Mosquitto, gateway_url: str) -> None:
    env = {"ZONE": "edge", "REDIS_URL": redis_url, "MQTT_HOST": broker.host, "MQTT_PORT": str(broker.port),
           "MQTT_USERNAME": broker.service_user, "P2P_ZONE_GATEWAYS": f"fog={gateway_url}"}
    functions = {
        "edge-p2p-market": ROOT / "functions/p2p-market",
        "edge-p2p-bid": ROOT / "functions/p2p-bid",
        "fog-p2p-bid": ROOT / "functions/p2p-bid",
    }
    doc = {
        "version": "1.0",
        "provider": {"name": "openfaas", "gateway": gateway_url},
        "functions": {
            name: {"lang": "python3-http", "handler": str(folder), "environment": env,
                   "secrets": ["token-signing-key", "mqtt-password"]}
            for name, folder in functions.items()
        },
    }
    path.write_text(json.dumps(doc, indent=2))  # JSON is YAML


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.p2p_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=100, help="rounds of the twin negotiations")
    ap.add_argument("--repeats", type=int, default=20, help="twin negotiations timed per case")
    ap.add_argument("--wifi-rounds", type=int, default=10, help="rounds of the WiFi meter-in-the-loop run")
    ap.add_argument("--nbiot-rounds", type=int, default=5, help="rounds of the NB-IoT meter-in-the-loop run")
    ap.add_argument("--random-markets", type=int, default=300, help="random markets for rounds-to-converge")
    ap.add_argument("--gateway-markets", type=int, default=40, help="full market cycles through the gateway")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)

    figures: dict[str, Any] = {}
    with RedisServer() as rs, Broker() as broker, tempfile.TemporaryDirectory(prefix="p2p-bench-") as tmp:
        secrets = Path(tmp) / "secrets"
        secrets.mkdir()
        signing_key = os.urandom(16).hex()
        (secrets / "token-signing-key").write_text(signing_key)
        (secrets / "mqtt-password").write_text(broker.service_password)
        os.environ.update(SECRETS_DIR=str(secrets), REDIS_URL=rs.url)
        reset_settings()
        port = free_port()
        stack = Path(tmp) / "stack.yml"
        _stack(stack, rs.url, broker, f"http://127.0.0.1:{port}")
        print("starting redis, mosquitto and a gateway process ...", flush=True)
        with GatewayProcess(stack, "all", port=port, secrets_dir=secrets, args=["--no-background"]) as gw:
            api = Api(gw.url, issue_token("bench", {"utility"}, key=signing_key))
            api.new_market(TWO, market.MarketParams(FEED_IN, RETAIL))  # warm-up: imports, connections
            time_runs(api, TWO, args.rounds, 3)
            print(f"twins: {args.repeats} x {args.rounds}-round negotiations through the gateway ...", flush=True)
            lib_wall, lib_server = time_runs(api, TWO, args.rounds, args.repeats)
            series = {n: statistics.median(time_runs(api, TWO, n, args.repeats)[0]) for n in (1, 10, 25, 50)}
            series[args.rounds] = statistics.median(lib_wall)
            fog = [{**p, "zone": "fog"} for p in TWO]
            time_runs(api, fog, args.rounds, 2)
            http_wall, _ = time_runs(api, fog, args.rounds, max(5, args.repeats // 2))
            print("markets cleared per second through the gateway ...", flush=True)
            gw_mps = markets_per_second_gateway(api, args.gateway_markets, seed=7)

        params = market.MarketParams(FEED_IN, RETAIL, min_rounds=args.rounds, max_rounds=args.rounds)
        mem = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            negotiate(two_bidders(params), params)
            mem.append(time.perf_counter() - t0)

        twin = TwinMqtt(broker.host, broker.port, username=broker.service_user, password=broker.service_password)
        twin.connect()
        nodelay(twin._client)  # the coordinator's session: same reason as Broker
        meter_rounds: dict[str, list[float]] = {}
        try:
            for name, rounds in (("lan", 20), ("wifi", args.wifi_rounds), ("nbiot", args.nbiot_rounds)):
                print(f"meters in the loop over {name}: {rounds} rounds ...", flush=True)
                responder = MeterResponder(broker, two_bidders(params), LINKS[name])
                try:
                    meter_rounds[name] = meters_in_the_loop(twin, two_bidders(params), rounds, timeout_s=5.0)
                finally:
                    responder.close()
        finally:
            twin.close()

    print("rounds to converge on random markets ...", flush=True)
    conv = rounds_to_converge(args.random_markets, seed=11)
    mem_mps = markets_per_second_in_memory(1000, seed=13)

    twin_med = statistics.median(lib_wall)
    rows: list[tuple[str, str, str, str, str]] = []

    def row(case: str, rounds: int, total: float, per_round: float, extrapolated: bool) -> None:
        x100 = per_round * 100
        rows.append((case, str(rounds), _ms(total), _ms(per_round), _ms(x100) + (" (x100)" if extrapolated else "")))

    row("twins, library bids, via gateway", args.rounds, twin_med, twin_med / args.rounds, False)
    row("twins, HTTP bids (other zone)", args.rounds, statistics.median(http_wall),
        statistics.median(http_wall) / args.rounds, False)
    row("twins, in memory (no I/O)", args.rounds, statistics.median(mem), statistics.median(mem) / args.rounds, False)
    for name in ("lan", "wifi", "nbiot"):
        per = meter_rounds[name]
        row(f"meters in the loop, {name} link", len(per), math.fsum(per), statistics.median(per), True)

    widths = [max(len(r[i]) for r in [("case", "rounds", "measured", "per round", "100 rounds"), *rows])
              for i in range(5)]
    line = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    print()
    print(line.format("case", "rounds", "measured", "per round", "100 rounds"))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r))
    print()
    print("time vs iterations (seed Fig. 9): twins measured through the gateway; meters = median round x n")
    print(f"{'iterations':>10}  {'twins':>10}  {'WiFi meters':>12}  {'NB-IoT meters':>14}")
    for n, t in sorted(series.items()):
        wifi, nb = (statistics.median(meter_rounds[k]) * n for k in ("wifi", "nbiot"))
        print(f"{n:>10}  {_ms(t):>10}  {_ms(wifi):>12}  {_ms(nb):>14}")
    ratios = {name: statistics.median(meter_rounds[name]) * 100 / twin_med for name in ("wifi", "nbiot")}
    print()
    print(f"twins vs meters in the loop (100 rounds): {ratios['wifi']:,.0f}x faster than WiFi meters, "
          f"{ratios['nbiot']:,.0f}x faster than NB-IoT meters (seed 000: ~87x)")
    print(f"100-round twin negotiation via the gateway: median {_ms(twin_med)}, p95 "
          f"{_ms(sorted(lib_wall)[int(0.95 * (len(lib_wall) - 1))])} (target <= 50 ms); "
          f"server-side negotiation median {_ms(statistics.median(lib_server))}")
    print(f"rounds to converge, {conv['markets']} random markets of 2-50 participants: median {conv['median']}, "
          f"p95 {conv['p95']}, max {conv['max']}, hit the round limit {conv['hit_round_limit']}")
    print(f"markets cleared per second: {mem_mps:,.0f} in memory (10 participants), "
          f"{gw_mps:,.1f} through the gateway (open + join 10 + run, one client)")
    figures.update(
        twins_gateway_s={"median": twin_med, "p95": sorted(lib_wall)[int(0.95 * (len(lib_wall) - 1))],
                         "server_median": statistics.median(lib_server)},
        twins_http_bids_s=statistics.median(http_wall), twins_memory_s=statistics.median(mem),
        meters_per_round_s={k: statistics.median(v) for k, v in meter_rounds.items()},
        ratio=ratios, rounds_to_converge=conv, twins_by_iterations_s=series,
        markets_per_s={"memory": mem_mps, "gateway": gw_mps},
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    ok = twin_med <= 0.050 and min(ratios.values()) >= 80
    print("targets met" if ok else "TARGETS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
