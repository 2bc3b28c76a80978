"""``make demo``: a three-zone metertwin on this machine, simulated meters, and a scenario through every capability.

Starts the embedded stack (Mosquitto, a Redis per zone, S3, a gateway per zone),
provisions twins, starts a fleet of simulated meters, then exercises read (cache,
meter, timeout), write (command, desired state with If-Match, an offline meter
catching up), forward (EMS both ways), ingest, access control, async invocation,
and — where those functions are deployed — MDMS storage, P2P trading and demand
response. Prints a summary; then keeps the stack running until Ctrl-C, or exits
at once with ``--once``. Every process it started is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import json
import logging
import random
import signal
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from embedded.stack import EmbeddedStack
from storage.embedded import free_port


@dataclass
class Tally:
    """Calls per capability: count, outcomes, latencies, the path that served them."""

    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outcomes: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    notes: list[str] = field(default_factory=list)

    def record(self, capability: str, outcome: str, ms: float) -> None:
        self.latencies_ms[capability].append(ms)
        self.outcomes[capability][outcome] += 1

    def table(self) -> str:
        lines = [f"{'capability':<26}{'calls':>6}{'p50 ms':>9}{'p95 ms':>9}  outcomes",
                 "-" * 90]
        for cap, values in self.latencies_ms.items():
            ordered = sorted(values)
            p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            outcomes = ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes[cap].items()))
            lines.append(f"{cap:<26}{len(values):>6}{statistics.median(values):>9.1f}{p95:>9.1f}  {outcomes}")
        return "\n".join(lines)


class Demo:
    def __init__(self, stack: EmbeddedStack, fleet: Any, meters: list[str], tally: Tally) -> None:
        self.stack, self.fleet, self.meters, self.tally = stack, fleet, meters, tally
        self.utility = stack.token("utility", subject="utility-app")

    def call(
        self, capability: str, zone: str, function: str, method: str, path: str, *, token: str | None,
        expect: tuple[int, ...] = (200,), outcome: Callable[[httpx.Response], str] | None = None, **kwargs: Any,
    ) -> httpx.Response:
        t0 = time.perf_counter()
        resp = self.stack.call(zone, function, method, path, token=token, **kwargs)
        ms = (time.perf_counter() - t0) * 1000
        label = outcome(resp) if outcome and resp.status_code in expect else str(resp.status_code)
        self.tally.record(capability, label, ms)
        if resp.status_code not in expect:
            raise RuntimeError(
                f"{capability}: {method} {function}{path} answered {resp.status_code}: {resp.text[:300]}"
            )
        return resp

    def wait(self, what: str, predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(0.05)

    # -- steps -------------------------------------------------------------------------------
    def ingest(self) -> None:
        def all_reported() -> bool:
            return all(self.twin(m)["metadata"]["last_seq"] >= 1 for m in self.meters)

        self.wait("every meter's first readings to reach its twin (MQTT -> edge-ingest)", all_reported, 60)
        seqs = [self.twin(m)["metadata"]["last_seq"] for m in self.meters]
        self.tally.notes.append(f"ingest: {len(self.meters)} twins updated over MQTT; highest seq {max(seqs)}")

    def twin(self, meter: str) -> dict[str, Any]:
        resp = self.stack.call("edge", "edge-read", "GET", f"/meters/{meter}/twin", token=self.utility)
        resp.raise_for_status()
        return dict(resp.json())

    def reads(self) -> None:
        source = lambda r: r.json()["source"]  # noqa: E731
        for meter in self.meters:
            self.call("read (cached)", "edge", "edge-read", "GET", f"/meters/{meter}/reading", token=self.utility,
                      params={"max_age": "300"}, outcome=source)
        for meter in self.meters[:5]:
            self.call("read (live, meter)", "edge", "edge-read", "GET", f"/meters/{meter}/reading",
                      token=self.utility, params={"live": "true", "timeout": "5"}, outcome=source)
        offline = self.meters[-1]
        self.fleet.go_offline(offline, 20)
        resp = self.call("read (meter offline)", "edge", "edge-read", "GET", f"/meters/{offline}/reading",
                         token=self.utility, params={"live": "true", "timeout": "1"}, expect=(504,),
                         outcome=lambda r: "504 with stale value" if "stale" in r.json() else "504")
        self.tally.notes.append(f"read timeout: {resp.json()['message']}")

    def writes(self) -> None:
        meter = self.meters[0]
        resp = self.call("write (command)", "edge", "edge-write", "POST", f"/meters/{meter}/commands",
                         token=self.utility, json={"kind": "load_limit", "params": {"watts": 3500}, "expiry_s": 120},
                         expect=(202,), outcome=lambda r: r.json()["command"]["status"])
        self.await_command(meter, resp.json()["command"]["id"], "acknowledged")
        version = self.twin(meter)["version"]
        resp = self.call("write (desired, If-Match)", "edge", "edge-write", "PATCH", f"/meters/{meter}/desired",
                         token=self.utility, json={"reporting_interval_s": 5},
                         headers={"If-Match": f'"{version}"'}, expect=(202,), outcome=lambda r: "accepted")
        self.await_command(meter, resp.json()["command"]["id"], "acknowledged")
        self.wait("the delta to clear", lambda: self.twin(meter)["state"]["delta"] == {})
        self.call("write (stale If-Match)", "edge", "edge-write", "PATCH", f"/meters/{meter}/desired",
                  token=self.utility, json={"reporting_interval_s": 10}, headers={"If-Match": f'"{version}"'},
                  expect=(412,), outcome=lambda r: "412 version_mismatch")
        offline = self.meters[-1]
        resp = self.call("write (meter offline)", "edge", "edge-write", "POST", f"/meters/{offline}/commands",
                         token=self.utility, json={"kind": "relay", "params": {"state": "open"}, "expiry_s": 300},
                         expect=(202,), outcome=lambda r: r.json()["command"]["status"])
        command_id = resp.json()["command"]["id"]
        time.sleep(0.5)  # let it sit in the broker's session for the offline meter
        self.fleet.go_online(offline)
        status = self.await_command(offline, command_id, "acknowledged")
        self.tally.notes.append(f"write: command sent while {offline} was offline ended {status} after reconnect")

    def await_command(self, meter: str, command_id: str, want: str) -> str:
        final = {"acknowledged", "rejected", "expired"}
        got: dict[str, str] = {}

        def done() -> bool:
            resp = self.stack.call("edge", "edge-write", "GET", f"/meters/{meter}/commands/{command_id}",
                                   token=self.utility)
            got["status"] = resp.json()["command"]["status"]
            return got["status"] in final

        self.wait(f"command {command_id} to be answered", done, 30)
        if got["status"] != want:
            raise RuntimeError(f"command {command_id} for {meter} ended {got['status']}, expected {want}")
        return got["status"]

    def forward(self) -> None:
        meter = self.meters[1]
        ems = self.stack.token("ems", meter=meter, subject="home-ems")
        self.call("forward (EMS route)", "edge", "edge-forward", "PUT", f"/meters/{meter}/ems/route", token=ems,
                  json={"kind": "mqtt"}, outcome=lambda r: r.json()["target"])
        before = len(self.fleet.ems_inbox(meter))
        self.call("forward (EMS -> meter)", "edge", "edge-forward", "POST", f"/meters/{meter}/ems/messages",
                  token=ems, json={"payload": {"heat_pump": "eco", "until": "18:00"}}, expect=(202,),
                  outcome=lambda r: r.json()["message"]["status"])
        self.wait("the meter to receive the EMS message", lambda: len(self.fleet.ems_inbox(meter)) > before)
        t0 = time.perf_counter()
        message_id = self.fleet.send_ems(meter, {"appliance": "ev", "state": "charging"})

        def forwarded() -> bool:
            resp = self.stack.call("edge", "edge-forward", "GET", f"/meters/{meter}/ems/messages", token=ems)
            return any(m["id"] == message_id and m["status"] == "delivered" for m in resp.json()["messages"])

        self.wait("the meter's EMS message to be forwarded", forwarded)
        # Includes the polling of the delivery log (every ~50 ms), so it is an upper bound.
        self.tally.record("forward (meter -> EMS)", "delivered", (time.perf_counter() - t0) * 1000)

    def access(self) -> None:
        meter, other = self.meters[2], self.meters[3]
        consumer = self.stack.token("consumer", meter=meter, subject="household")
        self.call("auth (own meter)", "edge", "edge-read", "GET", f"/meters/{meter}/reading", token=consumer,
                  outcome=lambda r: "200")
        self.call("auth (other meter)", "edge", "edge-read", "GET", f"/meters/{other}/reading", token=consumer,
                  expect=(403,), outcome=lambda r: "403")
        self.call("auth (no token)", "edge", "edge-read", "GET", f"/meters/{meter}/reading", token=None,
                  expect=(401,), outcome=lambda r: "401")

    def async_call(self) -> None:
        received: list[dict[str, Any]] = []
        with callback_receiver(received) as url:
            t0 = time.perf_counter()
            # OpenFaaS async invocations are POSTs: queue a command, get the answer by callback.
            resp = self.stack.http.post(
                f"{self.stack.url('edge')}/async-function/edge-write/meters/{self.meters[0]}/commands",
                headers={"Authorization": f"Bearer {self.utility}", "X-Callback-Url": url},
                json={"kind": "tariff", "params": {"tariff_id": "tou-2026"}},
            )
            if resp.status_code != 202:
                raise RuntimeError(f"async invocation answered {resp.status_code}: {resp.text[:200]}")
            self.wait("the async call's callback", lambda: bool(received))
            self.tally.record("async invocation", f"202 + callback {received[0]['status']}",
                              (time.perf_counter() - t0) * 1000)

    def p2p(self) -> None:
        """A community market for the next 15-minute slot; only the final trades reach the meters."""
        rng = random.Random(7)
        slot = int(time.time() // 900 + 1) * 900
        market = self.call("p2p (open market)", "edge", "edge-p2p-market", "POST", "/markets", token=self.utility,
                           json={"slot_start": slot, "feed_in_tariff": 0.08, "retail_tariff": 0.32},
                           expect=(201,), outcome=lambda r: r.json()["status"]).json()
        market_id = market["id"]
        participants = []
        for i, meter in enumerate(self.meters):
            prosumer = i % 3 == 0
            participants.append({
                "meter_id": meter,
                "forecast_load_kwh": round(rng.uniform(0.1, 0.6), 3),
                "forecast_pv_kwh": round(rng.uniform(0.6, 1.5), 3) if prosumer else 0.0,
                "max_buy_price": round(rng.uniform(0.2, 0.32), 3),
                "min_sell_price": round(rng.uniform(0.08, 0.18), 3),
            })
        self.call("p2p (join)", "edge", "edge-p2p-market", "POST", f"/markets/{market_id}/participants",
                  token=self.utility, json={"participants": participants}, expect=(201,),
                  outcome=lambda r: f"{r.json()['added']} joined")
        result = self.call("p2p (negotiate)", "edge", "edge-p2p-market", "POST", f"/markets/{market_id}/run",
                           token=self.utility, outcome=lambda r: r.json()["status"]).json()
        trades = self.stack.call("edge", "edge-p2p-market", "GET", f"/markets/{market_id}/trades",
                                 token=self.utility).json()["trades"]
        traders = [t for t in trades if t["kwh"] > 0]

        def meters_got_their_trade() -> bool:
            return all(self.fleet.meter(t["meter_id"]).settings.get("last_trade") for t in traders)

        self.wait("every trading meter to receive its trade", meters_got_their_trade, 30)
        self.tally.notes.append(
            f"p2p: {result['participants']} twins, {result['rounds']} rounds in {result['negotiation_ms']:.1f} ms, "
            f"price {result['price']:.4f}/kWh, {result['sold_kwh']:.3f} kWh traded; "
            f"{len(traders)} meters told only their final trade"
        )

    def mdms(self) -> None:
        """The fog MDMS took the same readings through VEE; billing reads them; the cloud archive plans tiers."""
        meter = self.meters[0]
        mdms = self.stack.token("mdms", subject="mdms-app")
        billing = self.stack.token("billing", subject="billing-app")

        def has_rows() -> bool:
            resp = self.stack.call("fog", "fog-mdms-query", "GET", f"/meters/{meter}/latest", token=mdms)
            return resp.status_code == 200 and bool(resp.json().get("registers"))

        self.wait("the fog MDMS to hold validated readings", has_rows, 30)
        now = time.time()
        span = {"from": str(int(now - 3600)), "to": str(int(now + 60))}
        rows = self.call("mdms (intervals)", "fog", "fog-mdms-query", "GET", f"/meters/{meter}/intervals",
                         token=billing, params=span, outcome=lambda r: f"{r.json()['count']} rows").json()["rows"]
        qualities = sorted({(r["quality"], r["tier"]) for r in rows})
        bill = self.call("mdms (TOU bill)", "fog", "fog-mdms-query", "GET", f"/meters/{meter}/billing",
                         token=billing, params=span, outcome=lambda r: "billed").json()
        self.call("mdms (CSV export)", "fog", "fog-mdms-query", "GET", f"/meters/{meter}/intervals", token=billing,
                  params={**span, "format": "csv"}, outcome=lambda r: r.headers["content-type"].split(";")[0])
        plan = self.call("mdms (archive plan)", "cloud", "cloud-mdms-archive", "GET", "/plan", token=mdms,
                         outcome=lambda r: "planned").json()
        self.tally.notes.append(
            f"mdms: {len(rows)} validated rows for {meter} (quality, tier: {qualities}); "
            f"TOU bill {json.dumps(bill.get('bill', {}).get('total', bill.get('bill')))[:60]}; "
            f"archive plan per meter-day (action:reason): {plan['summary']}"
        )

    def demand_response(self) -> None:
        """A stock OpenADR VTN sends a SIMPLE event; each twin answers as its meter's VEN and sheds load."""
        from dr_bridge.demo import run_demo

        # openleadr warns once per VEN about routine corrections; the summary says what matters.
        # A filter, because the bridge sets the logger's level itself when it starts.
        logging.getLogger("openleadr").addFilter(lambda record: record.levelno >= logging.ERROR)
        t0 = time.perf_counter()
        summary: dict[str, Any] = asyncio.run(run_demo(
            self.stack.url("edge"), self.meters, token=self.stack.token("service"), level=2, lead_s=3.0,
            duration_s=8.0,
        ))
        self.tally.record("dr (OpenADR event)", f"optIn={summary['opt_in']} optOut={summary['opt_out']}",
                          (time.perf_counter() - t0) * 1000)
        self.tally.notes.append(
            f"dr: {summary['registered']} VENs registered with a stock openleadr VTN; {summary['opt_in']} opted in, "
            f"{summary['opt_out']} out; load {summary['baseline_w']:.0f} W -> {summary['during_event_w']:.0f} W "
            f"({summary['reduction_pct']:.0f} % shed, measured from meter readings)"
        )

    def upgrade(self) -> None:
        """Move a canary of twins to release v2 while their meters keep reporting; then promote the rest."""
        admin = self.stack.token("admin", subject="operator")
        chosen = self.meters[:6]
        op = self.call("upgrade (start canary)", "edge", "edge-upgrade-manager", "POST", "/operations",
                       token=admin, json={"to": "v2", "select": {"meters": chosen}, "canary": 2, "drain_s": 1,
                                          "min_calls": 1},
                       expect=(201,), outcome=lambda r: r.json()["state"]).json()
        op_id = op["id"]

        def state() -> dict[str, Any]:
            self.stack.call("edge", "edge-upgrade-manager", "POST", f"/operations/{op_id}/advance", token=admin,
                            json={"budget_s": 2})
            return dict(self.stack.call("edge", "edge-upgrade-manager", "GET", f"/operations/{op_id}",
                                        token=admin).json())

        self.wait("the canary to switch and wait for observation", lambda: state()["state"] == "observing", 60)
        self.call("upgrade (promote)", "edge", "edge-upgrade-manager", "POST", f"/operations/{op_id}/promote",
                  token=admin, json={"force": True}, outcome=lambda r: "promoted")
        self.wait("every chosen twin to be on v2", lambda: state()["state"] == "completed", 90)
        final = state()
        self.call("read after upgrade", "edge", "edge-read", "GET", f"/meters/{chosen[0]}/reading",
                  token=self.utility, params={"max_age": "300"},
                  outcome=lambda r: f"answered by {r.headers.get('x-twin-binding', 'v1')}")
        bound = self.stack.call("edge", "edge-upgrade-manager", "GET", f"/meters/{chosen[0]}/binding",
                                token=admin).json()
        self.tally.notes.append(
            f"upgrade: {final['progress']['done']}/{final['progress']['selected']} twins moved v1 -> v2 "
            f"(canary of 2, then promoted) while their meters reported; readings applied by v1 "
            f"{final['readings']['applied_by_old']}, by v2 {final['readings']['applied_by_new']}, "
            f"missing {final['readings']['missing']}; {chosen[0]} now bound to {bound.get('release', bound)}"
        )


@contextlib.contextmanager
def callback_receiver(received: list[dict[str, Any]]) -> Iterator[str]:
    """A one-route HTTP server on loopback that records POSTed callbacks."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            received.append({"status": self.headers.get("X-Function-Status"), "body": body[:200]})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            return

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/callback"
    finally:
        server.shutdown()
        server.server_close()


def run(args: argparse.Namespace) -> int:
    from meter_sim import FleetThread

    tally = Tally()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("starting the embedded stack: Mosquitto, Redis x3, S3 (moto), gateways edge/fog/cloud ...", flush=True)
    # Everything is on loopback here, callback receivers included: allow it (production must not).
    with EmbeddedStack(extra_env={"DESTINATION_ALLOWED_CIDRS": "127.0.0.1/32"}) as stack:
        for zone in stack.gateways:
            print(f"  {zone:<6} gateway {stack.url(zone)}   (functions: {stack.url(zone)}/system/functions)")
        meters = [f"demo-{i:04d}" for i in range(args.meters)]
        t0 = time.perf_counter()
        credentials = stack.provision(meters, profile={"kind": "household", "link": args.link})
        print(f"provisioned {len(meters)} twins and meter accounts in {time.perf_counter() - t0:.2f} s")
        assert stack.broker is not None
        fleet = FleetThread(
            broker_host=stack.broker.host, broker_port=stack.broker.port, credentials=credentials,
            reporting_interval_s=args.interval, link=args.link, prosumer_share=0.3, seed=args.seed,
            ems_interval_s=None,
        )
        fleet.start(timeout_s=60)
        try:
            demo = Demo(stack, fleet, meters, tally)
            for step in (demo.ingest, demo.reads, demo.writes, demo.forward, demo.access, demo.async_call, demo.p2p,
                         demo.mdms, demo.demand_response, demo.upgrade):
                print(f"-- {step.__name__}", flush=True)
                step()
            print_summary(stack, fleet, tally)
            if not args.once:
                print("\nstack running; Ctrl-C to stop", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    while not stop.wait(5):
                        s = fleet.stats()
                        print(f"  meters connected {s.connected}/{len(meters)}  messages {s.messages_total}",
                              flush=True)
        finally:
            fleet.stop()
    print("stopped every process the demo started")
    return 0


def print_summary(stack: EmbeddedStack, fleet: Any, tally: Tally) -> None:
    print("\n================ metertwin demo summary ================")
    print(tally.table())
    stats = fleet.stats()
    print(f"\nmeters: {stats.connected} connected; {stats.messages_total} MQTT messages")
    counts = stack.http.get(f"{stack.url('edge')}/system/functions", auth=("admin", stack.basic_auth_password)).json()
    print("edge invocations: " + ", ".join(f"{f['name']}={f['invocationCount']}" for f in counts))
    for note in tally.notes:
        print(f"  * {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedded.demo", description=__doc__)
    parser.add_argument("--once", action="store_true", help="run the scenario, print the summary and exit")
    parser.add_argument("--meters", type=int, default=20)
    parser.add_argument("--interval", type=float, default=2.0, help="meters' reporting interval, seconds")
    parser.add_argument("--link", default="wifi", choices=["lan", "wifi", "nbiot"])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.meters < 5:
        parser.error(f"--meters {args.meters} is too few for the scenario (at least 5)")
    try:
        return run(args)
    except RuntimeError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

