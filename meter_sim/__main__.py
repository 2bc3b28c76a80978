"""Command line: ``python -m meter_sim run|provision|register ...`` (see ``--help`` and docs/meter_sim.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from meter_sim import accounts
from meter_sim.concentrator import ConcentratorFleet
from meter_sim.fleet import FleetStats, MeterFleet, raise_nofile_limit, tune_gc
from meter_sim.profile import LinkProfile
from meter_sim.topology import GridTopology, TopologyError, parse_feeder_pv


def _broker(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"broker {spec!r} is not HOST:PORT")
    return host, int(port)


def _link(spec: str) -> LinkProfile:
    try:
        return LinkProfile.parse(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _offline(spec: str) -> tuple[str, float, float]:
    """``WHO:AT:FOR`` where WHO is a meter id or a share like ``10%``; AT and FOR in seconds."""
    who, _, rest = spec.rpartition(":")
    who, _, at = who.rpartition(":")
    try:
        at_s, for_s = float(at), float(rest)
    except ValueError:
        raise argparse.ArgumentTypeError(f"offline {spec!r} is not WHO:AT_S:FOR_S (e.g. 10%:20:30)") from None
    if not who or at_s < 0 or for_s <= 0:
        raise argparse.ArgumentTypeError(f"offline {spec!r} needs a meter id or share, AT >= 0 and FOR > 0")
    return who, at_s, for_s


def _feeder_pv(spec: str) -> tuple[str, float]:
    try:
        return parse_feeder_pv(spec)
    except TopologyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_topology_args(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_argument_group("grid topology (meter_sim.topology)")
    grid.add_argument("--topology", type=Path, default=None,
                      help="JSON file: regions -> substations -> feeders (pv_share) -> transformers -> meters")
    grid.add_argument("--grid", default=None, metavar="RxSxFxT",
                      help="or a generated tree: regions x substations x feeders x transformers, e.g. 1x2x2x2")
    grid.add_argument("--feeder-pv", type=_feeder_pv, action="append", default=[], metavar="FEEDER=SHARE",
                      help="with --grid: one feeder's PV share (repeatable; the others take --prosumers)")


def topology_of(args: argparse.Namespace) -> GridTopology | None:
    """The topology the arguments name (``--topology`` or ``--grid``), or None."""
    if args.topology is not None and args.grid is not None:
        raise TopologyError("give --topology or --grid, not both")
    if args.topology is not None:
        return GridTopology.load(args.topology)
    if args.grid is not None:
        return GridTopology.generate(args.grid, pv_share=args.prosumers, feeder_pv=dict(args.feeder_pv))
    if args.feeder_pv:
        raise TopologyError("--feeder-pv needs --grid")
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m meter_sim", description="Simulated smart meters over MQTT.")
    sub = parser.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="run a fleet of simulated meters")
    run.add_argument("--broker", type=_broker, default=("127.0.0.1", 1883), help="HOST:PORT (127.0.0.1:1883)")
    run.add_argument("--credentials", type=Path, default=None,
                     help='JSON {"meters": [{"meter_id", "password"}]} (the registry\'s bulk provisioning answer)')
    run.add_argument("--concentrators", type=Path, default=None,
                     help='concentrator mode: JSON {"concentrators": [{"concentrator_id", "username", "password", '
                          '"meters": [...]}]} (the registry\'s answers); each publishes its meters\' readings '
                          'in batches (meter_sim.concentrator)')
    run.add_argument("--batch-max", type=int, default=1000, help="readings per concentrator message at most (1000)")
    run.add_argument("--spread", action="store_true",
                     help="concentrator mode: each concentrator reports at its own offset within the interval")
    run.add_argument("--meters-from", choices=("creds",), default="creds",
                     help="where the meter list comes from: the credentials file")
    run.add_argument("--meters", type=int, default=None, help="use only the first N meters of the file")
    run.add_argument("--interval", type=float, default=15.0, help="reporting interval, seconds (15)")
    run.add_argument("--prosumers", type=float, default=0.3, help="share of PV prosumers, 0..1 (0.3)")
    run.add_argument("--link", type=_link, default=LinkProfile.parse("lan"),
                     help="nbiot (0.4-0.8 s), wifi (0.06-0.14 s), lan, or LO-HI seconds (lan)")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--duration", type=float, default=60.0, help="seconds to run; 0 = until Ctrl-C (60)")
    run.add_argument("--time-scale", type=float, default=1.0, help="speed of the meters' physical clock (1)")
    run.add_argument("--ems-interval", type=float, default=None, help="seconds between EMS messages up (off)")
    run.add_argument("--connect-concurrency", type=int, default=100, help="connects in flight at most (100)")
    run.add_argument("--offline", type=_offline, action="append", default=[],
                     help="WHO:AT:FOR, e.g. 10%%:20:30 or <meter_id>:5:10 (repeatable)")
    run.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    run.add_argument("--summary-json", type=Path, default=None, help="write final counters here")
    run.add_argument("-v", "--verbose", action="store_true")
    _add_topology_args(run)

    reg = sub.add_parser("register", help="provision twins through the registry, with their grid topology")
    reg.add_argument("--gateway", default=os.environ.get("EDGE_GATEWAY_URL", "http://127.0.0.1:8080"),
                     help="the edge gateway ($EDGE_GATEWAY_URL)")
    reg.add_argument("--token", default=None, help="an admin token (else $METERTWIN_TOKEN or --signing-key-file)")
    reg.add_argument("--signing-key-file", type=Path, default=None, help="mint an admin token with this key")
    reg.add_argument("--count", type=int, required=True)
    reg.add_argument("--prefix", default="sim")
    reg.add_argument("--prosumers", type=float, default=0.3, help="PV share of feeders with none given (0.3)")
    reg.add_argument("--seed", type=int, default=1, help="which meters of a feeder get PV (1)")
    reg.add_argument("--link", default="wifi", help="the profile's link (wifi)")
    reg.add_argument("--out", type=Path, required=True, help="credentials file to write (for run --credentials)")
    _add_topology_args(reg)

    prov = sub.add_parser("provision", help="create meter accounts in Mosquitto's dynamic security")
    prov.add_argument("--broker", type=_broker, default=("127.0.0.1", 1883))
    prov.add_argument("--admin-user", required=True, help="an account allowed to administer dynamic security")
    prov.add_argument("--admin-password-file", type=Path, required=True)
    prov.add_argument("--count", type=int, required=True)
    prov.add_argument("--prefix", default="sim")
    prov.add_argument("--out", type=Path, required=True, help="credentials file to write")
    return parser


class Progress:
    """One refreshing status line on a terminal, periodic lines otherwise."""

    def __init__(self, out: TextIO, interval_s: float) -> None:
        self.out = out
        self.tty = out.isatty()
        self.interval_s = 0.5 if self.tty else interval_s
        self.t0 = time.monotonic()
        self.last: FleetStats | None = None
        self.last_t = self.t0

    def line(self, s: FleetStats) -> str:
        now = time.monotonic()
        dt = max(now - self.last_t, 1e-9)
        prev = self.last
        rate = (s.readings_sent - prev.readings_sent) / dt if prev else 0.0
        msgs = (s.messages_total - prev.messages_total) / dt if prev else 0.0
        self.last, self.last_t = s, now
        return (
            f"[{now - self.t0:7.1f}s] connected {s.connected}/{s.meters}  offline {s.offline}  "
            f"readings {s.readings_sent} ({rate:.0f}/s)  buffered {s.buffered}  "
            f"commands {s.commands_applied} applied/{s.commands_rejected} rejected  "
            f"reads {s.reads_answered}  ems {s.ems_received} in/{s.ems_sent} out  msgs {msgs:.0f}/s"
        )

    def show(self, s: FleetStats) -> None:
        text = self.line(s)
        if self.tty:
            self.out.write("\r\x1b[2K" + text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


async def run_fleet(args: argparse.Namespace, out: TextIO = sys.stdout) -> FleetStats:
    credentials = accounts.load_credentials(args.credentials)
    if args.meters is not None:
        credentials = dict(list(credentials.items())[: args.meters])
    if not credentials:
        raise SystemExit(f"no meters in {args.credentials}")
    host, port = args.broker
    grid = topology_of(args)
    prosumers = None
    if grid is not None:
        grid.assign(list(credentials), seed=args.seed)
        prosumers = grid.prosumers()
        out.write(f"meter_sim: grid {grid.summary()}\n")
    fleet = MeterFleet(
        host, port, credentials, seed=args.seed, reporting_interval_s=args.interval,
        prosumer_share=args.prosumers, link=args.link, time_scale=args.time_scale,
        ems_interval_s=args.ems_interval, connect_concurrency=args.connect_concurrency, prosumers=prosumers,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    out.write(f"meter_sim: {len(credentials)} meters -> {host}:{port}, link {args.link.name} "
              f"[{args.link.lo_s:g}-{args.link.hi_s:g} s], interval {args.interval:g} s, "
              f"prosumers {args.prosumers:.0%}, seed {args.seed}, time scale {args.time_scale:g}\n")
    ids = list(credentials)
    for who, at_s, for_s in args.offline:
        if who.endswith("%"):
            chosen = ids[: max(1, round(len(ids) * float(who[:-1]) / 100.0))]
        elif who in credentials:
            chosen = [who]
        else:
            raise SystemExit(f"offline: meter {who!r} is not in {args.credentials}")
        for meter_id in chosen:
            loop.call_later(at_s, fleet.go_offline, meter_id, for_s)

    progress = Progress(out, args.progress_interval)
    tune_gc()  # this process is the fleet's: keep full collections from stalling the loop
    await fleet.start()
    gc_tuned_again = False
    deadline = loop.time() + args.duration if args.duration > 0 else None
    try:
        while not stop.is_set():
            timeout = progress.interval_s
            if deadline is not None:
                timeout = min(timeout, deadline - loop.time())
                if timeout <= 0:
                    break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout)
            stats = fleet.stats()
            if not gc_tuned_again and stats.connected == stats.meters:
                tune_gc()  # freeze the connected sessions too
                gc_tuned_again = True
            progress.show(stats)
    finally:
        progress.done()
        out.write("stopping...\n")
        await fleet.stop()
    final = fleet.stats()
    out.write("done: " + progress.line(final) + "\n")
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(asdict(final), indent=1))
    return final


def run_concentrators(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Concentrator mode: N concentrators x M meters, batches every ``--interval`` for ``--duration``."""
    specs = json.loads(args.concentrators.read_text())["concentrators"]
    host, port = args.broker
    fleet = ConcentratorFleet(host, port, specs, reporting_interval_s=args.interval, batch_max=args.batch_max,
                              seed=args.seed, prosumer_share=args.prosumers, spread=args.spread)
    meters = sum(len(s["meters"]) for s in specs)
    out.write(f"meter_sim: {len(specs)} concentrators x {meters} meters -> {host}:{port}, "
              f"interval {args.interval:g} s, batches of at most {args.batch_max}\n")
    with fleet, contextlib.suppress(KeyboardInterrupt):
        time.sleep(args.duration if args.duration > 0 else 10**9)  # the run's length, not a wait
    final = fleet.stats()
    out.write(f"done: {final.readings} readings in {final.batches} batches, {final.reads_answered} reads, "
              f"{final.commands_applied} commands applied\n")
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(asdict(final), indent=1))
    return 0


def register(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Provision ``--count`` twins through the registry (``POST /meters/bulk``), each with its place on
    the grid as its profile's topology; write the credentials for ``run --credentials``."""
    from metertwin.client import ApiError, Client
    from metertwin.core.auth import issue_token

    token = args.token or os.environ.get("METERTWIN_TOKEN")
    if not token and args.signing_key_file is not None:
        token = issue_token("meter-sim", {"admin"}, key=args.signing_key_file.read_text().strip())
    if not token:
        raise TopologyError("no token: pass --token, set METERTWIN_TOKEN, or --signing-key-file")
    grid = topology_of(args) or GridTopology.generate("1x1x1x1", pv_share=args.prosumers)
    places = grid.assign(accounts.new_meter_ids(args.count, args.prefix), seed=args.seed)
    creds: dict[str, str] = {}
    with Client(edge=args.gateway, token=token) as api:
        ids = list(places)
        for first in range(0, len(ids), 5000):
            body = [{"meter_id": m, "profile": {**places[m].profile(), "link": args.link}}
                    for m in ids[first:first + 5000]]
            try:
                made = api.registry.provision_bulk(body)
            except ApiError as exc:
                print(f"meter_sim: the registry refused: {exc}", file=sys.stderr)
                return 1
            creds.update({m["meter_id"]: m["password"] for m in made["meters"]})
    accounts.save_credentials(args.out, creds)
    out.write(f"registered {len(creds)} twins with their topology ({grid.summary()}); credentials in {args.out}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "provision":
        host, port = args.broker
        password = args.admin_password_file.read_text().strip()
        creds = accounts.provision(host, port, args.admin_user, password,
                                   accounts.new_meter_ids(args.count, args.prefix), timeout_s=600)
        accounts.save_credentials(args.out, creds)
        print(f"created {len(creds)} meter accounts; credentials in {args.out}")
        return 0
    if args.cmd == "register":
        try:
            return register(args)
        except TopologyError as exc:
            print(f"meter_sim: {exc}", file=sys.stderr)
            return 2
    if args.concentrators is not None:
        return run_concentrators(args)
    if args.credentials is None:
        print("meter_sim: run needs --credentials or --concentrators", file=sys.stderr)
        return 2
    raise_nofile_limit()
    try:
        asyncio.run(run_fleet(args))
    except ValueError as exc:
        print(f"meter_sim: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
