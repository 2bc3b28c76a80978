"""``make demo``: a three-zone metertwin on this machine, simulated meters, and a scenario through every capability.

Starts the embedded stack (Mosquitto, a Redis per zone, S3, a gateway per zone),
prints and writes every address and credential to ``.run/demo.env``, provisions twins,
back-loads ~35 days of history per meter into the MDMS (``embedded.history``), starts a
fleet of simulated meters continuing from that history, then exercises read (cache,
meter, timeout), write (command, desired state with If-Match, an offline meter
catching up), forward (EMS both ways), ingest, access control, async invocation,
and — where those functions are deployed — MDMS storage, P2P trading and demand
response. Prints a summary and a time-of-use bill by period; then keeps the stack
running until Ctrl-C, or exits at once with ``--once``. Every process it started is
stopped on the way out. Every call goes through :mod:`metertwin.client`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from embedded import demo_env, grid_demo, history
from embedded.callbacks import callback_receiver
from embedded.dashboard import Dashboard
from embedded.stack import EmbeddedStack
from metertwin.client import ApiError, Client

T = TypeVar("T")


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
    def __init__(self, stack: EmbeddedStack, fleet: Any, meters: list[str], tally: Tally, api: Client) -> None:
        self.stack, self.fleet, self.meters, self.tally = stack, fleet, meters, tally
        self.api = api.with_token(stack.token("utility", subject="utility-app"))
        self.billing = api.with_token(stack.token("billing", subject="billing-app"))
        self.mdms_app = api.with_token(stack.token("mdms", subject="mdms-app"))
        self.history: history.History | None = None
        self.bill_text = ""
        self.grid = grid_demo.GridSteps(self, grid_demo.demo_grid())

    def call(self, capability: str, fn: Callable[[], T], *, outcome: Callable[[T], str] | None = None) -> T:
        """One client call, timed and tallied under ``capability``."""
        t0 = time.perf_counter()
        try:
            value = fn()
        except ApiError as exc:
            self.tally.record(capability, str(exc.status), (time.perf_counter() - t0) * 1000)
            raise RuntimeError(f"{capability}: {exc}") from exc
        self.tally.record(capability, outcome(value) if outcome else "200", (time.perf_counter() - t0) * 1000)
        return value

    def refused(self, capability: str, fn: Callable[[], Any], status: int,
                outcome: Callable[[ApiError], str] | None = None) -> ApiError:
        """A call that must fail with ``status``; returns the typed error."""
        t0 = time.perf_counter()
        try:
            fn()
        except ApiError as exc:
            self.tally.record(capability, outcome(exc) if outcome and exc.status == status else str(exc.status),
                              (time.perf_counter() - t0) * 1000)
            if exc.status != status:
                raise RuntimeError(f"{capability}: expected {status}, got {exc}") from exc
            return exc
        raise RuntimeError(f"{capability}: expected {status}, the call succeeded")

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
        return self.api.read.twin(meter)

    def reads(self) -> None:
        read = self.api.read

        def source(r: dict[str, Any]) -> str:
            return str(r["source"])

        for meter in self.meters:
            self.call("read (cached)", functools.partial(read.reading, meter, max_age=300), outcome=source)
        for meter in self.meters[:5]:
            self.call("read (live, meter)", functools.partial(read.reading, meter, live=True, timeout=5),
                      outcome=source)
        offline = self.meters[-1]
        self.fleet.go_offline(offline, 20)
        err = self.refused("read (meter offline)", lambda: self.api.read.reading(offline, live=True, timeout=1), 504,
                           lambda e: "504 with stale value" if "stale" in e.details else "504")
        self.tally.notes.append(f"read timeout: {err.message}")

    def writes(self) -> None:
        meter, write = self.meters[0], self.api.write
        state = lambda r: r["command"]["status"]  # noqa: E731
        resp = self.call("write (command)", lambda: write.command(meter, "load_limit", {"watts": 3500}, expiry_s=120),
                         outcome=state)
        self.await_command(meter, resp["command"]["id"], "acknowledged")
        version = self.twin(meter)["version"]
        resp = self.call("write (desired, If-Match)",
                         lambda: write.set_desired(meter, {"reporting_interval_s": 5}, if_match=version),
                         outcome=lambda r: "accepted")
        self.await_command(meter, resp["command"]["id"], "acknowledged")
        self.wait("the delta to clear", lambda: self.twin(meter)["state"]["delta"] == {})
        self.refused("write (stale If-Match)",
                     lambda: write.set_desired(meter, {"reporting_interval_s": 10}, if_match=version), 412,
                     lambda e: f"412 {e.code}")
        offline = self.meters[-1]
        resp = self.call("write (meter offline)",
                         lambda: write.command(offline, "relay", {"state": "open"}, expiry_s=300), outcome=state)
        command_id = resp["command"]["id"]
        time.sleep(0.5)  # let it sit in the broker's session for the offline meter
        self.fleet.go_online(offline)
        status = self.await_command(offline, command_id, "acknowledged")
        self.tally.notes.append(f"write: command sent while {offline} was offline ended {status} after reconnect")

    def await_command(self, meter: str, command_id: str, want: str) -> str:
        final = {"acknowledged", "rejected", "expired"}
        got: dict[str, str] = {}

        def done() -> bool:
            got["status"] = self.api.write.get_command(meter, command_id)["command"]["status"]
            return got["status"] in final

        self.wait(f"command {command_id} to be answered", done, 30)
        if got["status"] != want:
            raise RuntimeError(f"command {command_id} for {meter} ended {got['status']}, expected {want}")
        return got["status"]

    def forward(self) -> None:
        meter = self.meters[1]
        ems = self.api.with_token(self.stack.token("ems", meter=meter, subject="home-ems")).forward
        self.call("forward (EMS route)", lambda: ems.set_route(meter, "mqtt"), outcome=lambda r: r["target"])
        before = len(self.fleet.ems_inbox(meter))
        self.call("forward (EMS -> meter)", lambda: ems.send(meter, {"heat_pump": "eco", "until": "18:00"}),
                  outcome=lambda r: r["message"]["status"])
        self.wait("the meter to receive the EMS message", lambda: len(self.fleet.ems_inbox(meter)) > before)
        t0 = time.perf_counter()
        message_id = self.fleet.send_ems(meter, {"appliance": "ev", "state": "charging"})

        def forwarded() -> bool:
            return any(m["id"] == message_id and m["status"] == "delivered" for m in ems.messages(meter)["messages"])

        self.wait("the meter's EMS message to be forwarded", forwarded)
        # Includes the polling of the delivery log (every ~50 ms), so it is an upper bound.
        self.tally.record("forward (meter -> EMS)", "delivered", (time.perf_counter() - t0) * 1000)

    def access(self) -> None:
        meter, other = self.meters[2], self.meters[3]
        consumer = self.api.with_token(self.stack.token("consumer", meter=meter, subject="household")).read
        self.call("auth (own meter)", lambda: consumer.reading(meter))
        self.refused("auth (other meter)", lambda: consumer.reading(other), 403)
        self.refused("auth (no token)", lambda: self.api.with_token("").read.reading(meter), 401)

    def async_call(self) -> None:
        received: list[dict[str, Any]] = []
        with callback_receiver(received) as url:
            t0 = time.perf_counter()
            # OpenFaaS async invocations are POSTs: queue a command, get the answer by callback.
            self.api.system("edge").invoke_async("edge-write", f"/meters/{self.meters[0]}/commands",
                                                 callback_url=url,
                                                 json={"kind": "tariff", "params": {"tariff_id": "tou-2026"}})
            self.wait("the async call's callback", lambda: bool(received))
            self.tally.record("async invocation", f"202 + callback {received[0]['status']}",
                              (time.perf_counter() - t0) * 1000)

    def p2p(self) -> None:
        """A community market for the next 15-minute slot; only the final trades reach the meters."""
        rng = random.Random(7)
        slot = int(time.time() // 900 + 1) * 900
        p2p = self.api.p2p
        market = self.call("p2p (open market)",
                           lambda: p2p.open_market(slot, feed_in_tariff=0.08, retail_tariff=0.32),
                           outcome=lambda r: r["status"])
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
        self.call("p2p (join)", lambda: p2p.add_participants(market_id, participants),
                  outcome=lambda r: f"{r['added']} joined")
        result = self.call("p2p (negotiate)", lambda: p2p.run(market_id), outcome=lambda r: r["status"])
        trades = p2p.trades(market_id)["trades"]
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
        meter, billing, mdms = self.meters[0], self.billing, self.mdms_app
        assert self.history is not None
        past = self.history

        def has_rows() -> bool:
            try:
                return bool(mdms.mdms.latest(meter).get("registers", {}).get("seq", 0) > past.final[meter][2])
            except ApiError:
                return False

        self.wait("the fog MDMS to hold live readings after the history", has_rows, 30)
        now = time.time()
        lo, hi = int(now - 3600), int(now + 60)
        rows = self.call("mdms (intervals)", lambda: billing.mdms.intervals(meter, lo, hi),
                         outcome=lambda r: f"{r['count']} rows")["rows"]
        qualities = sorted({(r["quality"], r["tier"]) for r in rows})
        self.call("mdms (CSV export)", lambda: billing.mdms.intervals_csv(meter, lo, hi),
                  outcome=lambda r: "text/csv" if r.startswith("meter_id,") else "?")
        run = self.call("mdms (archive run)", mdms.archive.run, outcome=lambda r: str(r.get("status")))
        start, end = past.start_s, (int(now) // 900) * 900
        bill = self.call("mdms (TOU bill)", lambda: billing.mdms.bill(meter, start, end), outcome=lambda r: "billed")
        profile = self.call("mdms (load profile)", lambda: billing.mdms.load_profile(meter, start, end, interval="1h"),
                            outcome=lambda r: f"{r['count']} intervals")
        tiers = mdms.mdms.tiers(meter)
        plan = self.call("mdms (archive plan)", mdms.archive.plan, outcome=lambda r: "planned")
        self.bill_text = history.bill_text(meter, bill, profile, tiers)
        self.tally.notes.append(
            f"mdms: {len(rows)} validated rows for {meter} in the last hour (quality, tier: {qualities}); "
            f"archive run {json.dumps({k: run.get(k) for k in ('status', 'moved', 'meter_days')})[:120]}; "
            f"TOU bill total {bill['bill']['total']} {bill['bill']['currency']}; "
            f"archive plan per meter-day (action:reason): {plan['summary']}"
        )

    def demand_response(self) -> None:
        """An OpenADR VTN sends a SIMPLE event targeted at a group the topology made; each twin answers as
        its meter's VEN (in the group: opt in and shed load; the others: opt out, not targeted)."""
        from dr_bridge.demo import run_demo

        # openleadr warns once per VEN about routine corrections; the summary says what matters.
        # A filter, because the bridge sets the logger's level itself when it starts.
        logging.getLogger("openleadr").addFilter(lambda record: record.levelno >= logging.ERROR)
        t0 = time.perf_counter()
        summary: dict[str, Any] = asyncio.run(run_demo(
            self.stack.url("edge"), self.meters, token=self.stack.token("service"), level=2, lead_s=3.0,
            duration_s=8.0, targets=[{"group_id": grid_demo.DR_GROUP}],
        ))
        self.tally.record("dr (OpenADR event)", f"optIn={summary['opt_in']} optOut={summary['opt_out']}",
                          (time.perf_counter() - t0) * 1000)
        self.tally.notes.append(
            f"dr: {summary['registered']} VENs registered with a stock openleadr VTN; {summary['opt_in']} opted in, "
            f"{summary['opt_out']} out; load {summary['baseline_w']:.0f} W -> {summary['during_event_w']:.0f} W "
            f"({summary['reduction_pct']:.0f} % shed by those opted in, measured from meter readings)"
        )
        self.tally.notes.append(self.grid.dr_note(summary))

    def upgrade(self) -> None:
        """Move a canary of twins to release v2 while their meters keep reporting; then promote the rest."""
        ops = self.api.with_token(self.stack.token("admin", subject="operator")).upgrades
        chosen = self.meters[:6]
        op = self.call("upgrade (start canary)", lambda: ops.start({"to": "v2", "select": {"meters": chosen},
                                                                    "canary": 2, "drain_s": 1, "min_calls": 1}),
                       outcome=lambda r: r["state"])
        op_id = op["id"]

        def state() -> dict[str, Any]:
            ops.advance(op_id, budget_s=2)
            return ops.operation(op_id)

        self.wait("the canary to switch and wait for observation", lambda: state()["state"] == "observing", 60)
        self.call("upgrade (promote)", lambda: ops.promote(op_id, force=True), outcome=lambda r: "promoted")
        self.wait("every chosen twin to be on v2", lambda: state()["state"] == "completed", 90)
        final = state()
        edge = self.api.zones["edge"].transport
        self.call("read after upgrade",  # the header says which release answered, so the raw response
                  lambda: edge.send("GET", f"/function/edge-read/meters/{chosen[0]}/reading", params={"max_age": 300}),
                  outcome=lambda r: f"answered by {r.headers.get('x-twin-binding', 'v1')}")
        bound = ops.binding(chosen[0])
        self.tally.notes.append(
            f"upgrade: {final['progress']['done']}/{final['progress']['selected']} twins moved v1 -> v2 "
            f"(canary of 2, then promoted) while their meters reported; readings applied by v1 "
            f"{final['readings']['applied_by_old']}, by v2 {final['readings']['applied_by_new']}, "
            f"missing {final['readings']['missing']}; {chosen[0]} now bound to {bound.get('release', bound)}"
        )


def run(args: argparse.Namespace) -> int:
    from meter_sim import FleetThread

    tally = Tally()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("starting the embedded stack: Mosquitto, Redis x3, S3 (moto), gateways edge/fog/cloud ...", flush=True)
    # A demo fleet fits one cold-tier object per day (the default 16 buckets are for large fleets): the
    # archive of 35 days of history then takes seconds against moto, not minutes. The gateways inherit it.
    os.environ.setdefault("MDMS_METER_BUCKETS", "1")
    # Everything is on loopback here, callback receivers included: allow it (production must not).
    with EmbeddedStack(extra_env={"DESTINATION_ALLOWED_CIDRS": "127.0.0.1/32"}) as stack:
        env = demo_env.values(stack, admin_token=stack.token("admin", subject="demo-admin"),
                              billing_token=stack.token("billing", subject="demo-billing"))
        print(demo_env.describe(env, demo_env.write(env, args.env_file)), flush=True)
        board = Dashboard(stack).start()
        print(board.login_line(), flush=True)
        api = Client(edge=stack.url("edge"), fog=stack.url("fog"), cloud=stack.url("cloud"),
                     token=env["ADMIN_TOKEN"], basic_auth=(demo_env.GATEWAY_USER, stack.basic_auth_password))
        meters = [f"demo-{i:04d}" for i in range(args.meters)]
        t0 = time.perf_counter()
        credentials: dict[str, str] = {}
        topology = grid_demo.demo_grid()
        places = topology.assign(meters, seed=args.seed)  # the twins' topology at provisioning (meter_sim)
        for first in range(0, len(meters), 5000):
            made = api.registry.provision_bulk([{"meter_id": m, "profile": {**places[m].profile(), "link": args.link}}
                                                for m in meters[first:first + 5000]])
            credentials.update({m["meter_id"]: m["password"] for m in made["meters"]})
        print(f"provisioned {len(meters)} twins and meter accounts in {time.perf_counter() - t0:.2f} s "
              f"on the grid: {topology.summary()}")
        grid_demo.await_places(api.grid, meters)
        assert stack.broker is not None
        fleet = FleetThread(
            broker_host=stack.broker.host, broker_port=stack.broker.port, credentials=credentials,
            reporting_interval_s=args.interval, link=args.link, prosumer_share=0.3, seed=args.seed,
            ems_interval_s=None, prosumers=topology.prosumers(),
        )
        sims = {m: fleet.fleet.meters[m] for m in meters}
        past = history.back_load(api.with_token(stack.token("mdms", subject="head-end")), sims, days=args.history_days)
        history.continue_meters(sims, past)
        print(f"back-loaded {past.accepted}/{past.readings} readings ({args.history_days:g} days x {len(meters)} "
              f"meters, 15 min) through fog-mdms-ingest /readings/batch in {past.seconds:.1f} s", flush=True)
        fleet.start(timeout_s=60)
        try:
            demo = Demo(stack, fleet, meters, tally, api)
            demo.history, demo.grid.topology = past, topology
            for step in (demo.ingest, demo.reads, demo.writes, demo.forward, demo.access, demo.async_call, demo.p2p,
                         demo.mdms, demo.demand_response, demo.upgrade, demo.grid.feeder_load, demo.grid.overload,
                         demo.grid.feeder_job):
                print(f"-- {step.__name__}", flush=True)
                step()
            print_summary(api, fleet, tally)
            print(demo.bill_text)
            if not args.once:
                print("\nstack running; Ctrl-C to stop", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    while not stop.wait(5):
                        s = fleet.stats()
                        print(f"  meters connected {s.connected}/{len(meters)}  messages {s.messages_total}",
                              flush=True)
        finally:
            fleet.stop()
            board.stop()
    print("stopped every process the demo started")
    return 0


def print_summary(api: Client, fleet: Any, tally: Tally) -> None:
    print("\n================ metertwin demo summary ================")
    print(tally.table())
    stats = fleet.stats()
    print(f"\nmeters: {stats.connected} connected; {stats.messages_total} MQTT messages")
    counts = api.system("edge").functions()
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
    parser.add_argument("--history-days", type=float, default=35.0, help="days of readings back-loaded per meter")
    parser.add_argument("--env-file", type=Path, default=demo_env.DEFAULT_PATH,
                        help="where to write the addresses and credentials (a sourceable shell file)")
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

