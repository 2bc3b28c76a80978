"""Scale check: how many simulated meters one process sustains (not a unit test).

``python -m meter_sim.scale --meters 10000 --interval 15 --duration 60`` starts a
private Mosquitto (dynamic security, ``max_connections -1``) whose meter accounts
are written straight into its dynamic-security file before it starts (creating
10,000 accounts through ``$CONTROL`` is quadratic in Mosquitto 2.0: it rewrites
the whole file after every command), runs the fleet in this process and prints:
connect ramp time, connected meters, readings/s sent and received by the broker,
CPU and RSS of the simulator and of the broker, and the round trip of read
requests to random meters under that load. ``--broker``/``--credentials`` use an
existing broker instead.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import getpass
import hashlib
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from meter_sim import accounts
from meter_sim.fleet import MeterFleet, raise_nofile_limit, tune_gc
from meter_sim.profile import LinkProfile
from metertwin.core import topics
from metertwin.twin import dynsec
from storage.embedded import _dynsec_plugin, free_port, wait_for_port

BENCH_USER = "scale-bench"


def _client_entry(username: str, password: str, roles: list[str]) -> dict[str, Any]:
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return {
        "username": username, "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(), "iterations": 101,
        "roles": [{"rolename": r} for r in roles],
    }


def dynsec_config(meters: dict[str, str], bench_password: str) -> dict[str, Any]:
    """A dynamic-security file with a bench account (everything, $SYS included) and one account per meter."""
    every = [{"acltype": t, "topic": topic, "allow": True}
             for topic in ("#", "$SYS/#")
             for t in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")]
    roles: list[dict[str, Any]] = [{"rolename": "bench", "acls": every}]
    clients = [_client_entry(BENCH_USER, bench_password, ["bench"])]
    for meter_id, password in meters.items():
        roles.append({"rolename": dynsec.role_name(meter_id), "acls": dynsec.meter_acls(meter_id)})
        clients.append(_client_entry(meter_id, password, [dynsec.role_name(meter_id)]))
    return {
        "clients": clients, "roles": roles, "groups": [],
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True,
                             "subscribe": False, "unsubscribe": True},
    }


class Broker:
    """A private Mosquitto for the scale run, accounts preloaded."""

    def __init__(self, meters: dict[str, str], *, nodelay: bool = True) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="meter-sim-scale-"))
        self.port = free_port()
        self.bench_password = secrets.token_hex(12)
        dynsec = self.dir / "dynamic-security.json"
        dynsec.write_text(json.dumps(dynsec_config(meters, self.bench_password)))
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join([
            "per_listener_settings false", f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1",
            "allow_anonymous false", f"plugin {_dynsec_plugin()}", f"plugin_opt_config_file {dynsec}",
            "max_connections -1", "max_queued_messages 100000", "max_inflight_messages 1000",
            "persistence false", "sys_interval 1", f"set_tcp_nodelay {'true' if nodelay else 'false'}", "",
        ]))
        self.log = open(self.dir / "mosquitto.log", "wb")  # noqa: SIM115 - the child writes to it
        # The child inherits this process's raised open-file limit.
        self.proc = subprocess.Popen([shutil.which("mosquitto") or "mosquitto", "-c", str(conf)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.port, proc=self.proc, timeout_s=60)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _proc_stat(pid: int | str) -> tuple[float, float]:
    """(CPU seconds, RSS MB) of a process from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(stat[11]) + int(stat[12])) / ticks
    rss_mb = int(stat[21]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    return cpu, rss_mb


@dataclass
class Sample:
    t: float
    connected: int
    readings_sent: int
    sim_cpu: float
    sim_rss_mb: float
    broker_cpu: float | None
    broker_rss_mb: float | None
    broker_received: int | None


@dataclass
class Probe:
    rtts_ms: list[float] = field(default_factory=list)
    timeouts: int = 0


async def _probe_reads(host: str, port: int, user: str, password: str, meter_ids: list[str],
                       stop: asyncio.Event, probe: Probe, sys_state: dict[str, int]) -> None:
    """Read requests to random meters, one every 0.2 s, and the broker's $SYS counters."""
    requester = f"scale-{secrets.token_hex(3)}"
    pending: dict[bytes, float] = {}
    async with aiomqtt.Client(host, port, username=user, password=password, identifier=requester,
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe([(topics.all_responses(requester), 1),
                                ("$SYS/broker/publish/messages/received", 0)])

        async def listen() -> None:
            async for msg in client.messages:
                if msg.topic.value.startswith("$SYS"):
                    with contextlib.suppress(ValueError):
                        sys_state["received"] = int(_text(msg.payload))
                    continue
                corr = getattr(msg.properties, "CorrelationData", None)
                sent = pending.pop(corr, None) if isinstance(corr, bytes) else None
                if sent is not None:
                    probe.rtts_ms.append((time.monotonic() - sent) * 1000.0)

        listener = asyncio.create_task(listen())
        rng = random.Random(0)
        while not stop.is_set():
            meter_id = rng.choice(meter_ids)
            corr = secrets.token_bytes(8)
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = topics.responses(meter_id, requester)
            props.CorrelationData = corr
            now = time.monotonic()
            pending[corr] = now
            for c, sent in list(pending.items()):
                if now - sent > 5.0:
                    pending.pop(c)
                    probe.timeouts += 1
            await client.publish(topics.read_requests(meter_id), b"{}", qos=1, properties=props)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        listener.cancel()


def _text(payload: Any) -> str:
    return payload.decode() if isinstance(payload, bytes | bytearray) else str(payload)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    nofile = raise_nofile_limit()
    base_cpu, base_rss = _proc_stat("self")
    broker: Broker | None = None
    if args.broker:
        host, _, port_s = args.broker.rpartition(":")
        port = int(port_s)
        creds = accounts.load_credentials(args.credentials)
        if args.meters:
            creds = dict(list(creds.items())[: args.meters])
        bench_user, bench_password = args.bench_user, Path(args.bench_password_file).read_text().strip()
    else:
        creds = {f"scale-{n:05d}": secrets.token_urlsafe(9) for n in range(args.meters)}
        t = time.monotonic()
        broker = Broker(creds, nodelay=not args.broker_nagle)
        print(f"private mosquitto on :{broker.port} with {len(creds)} accounts ({time.monotonic() - t:.1f} s)")
        host, port, bench_user, bench_password = "127.0.0.1", broker.port, BENCH_USER, broker.bench_password
    try:
        fleet = MeterFleet(host, port, creds, seed=1, reporting_interval_s=args.interval,
                           prosumer_share=0.3, link=LinkProfile.parse(args.link),
                           connect_concurrency=args.connect_concurrency)
        _, built_rss = _proc_stat("self")
        if not args.no_gc_tuning:
            tune_gc()
        stop = asyncio.Event()
        probe = Probe()
        sys_state: dict[str, int] = {}
        t0 = time.monotonic()
        await fleet.start()
        samples: list[Sample] = []
        connected_at: float | None = None
        prober: asyncio.Task[None] | None = None
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic() - t0
            cpu, rss = _proc_stat("self")
            bcpu = brss = None
            if broker is not None:
                bcpu, brss = _proc_stat(broker.proc.pid)
            connected = fleet.connected_count()
            samples.append(Sample(now, connected, sum(m.readings_sent for m in fleet.meters.values()),
                                  cpu, rss, bcpu, brss, sys_state.get("received")))
            if connected_at is None and connected == len(creds):
                connected_at = now
                if not args.no_gc_tuning:
                    tune_gc()
                prober = asyncio.create_task(
                    _probe_reads(host, port, bench_user, bench_password, list(creds), stop, probe, sys_state))
            print(f"t={now:6.1f}s connected {connected}/{len(creds)} readings {samples[-1].readings_sent} "
                  f"rss {rss:.0f} MB cpu {cpu - base_cpu:.1f} s", flush=True)
            if connected_at is not None and now - connected_at >= args.duration:
                break
            if connected_at is None and now > args.connect_timeout:
                break
        stop.set()
        if prober is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(prober, 5)
        steady = [s for s in samples if connected_at is not None and s.t >= connected_at + min(10.0, args.interval)]
        result: dict[str, Any] = {
            "meters": len(creds), "interval_s": args.interval, "link": args.link, "nofile": nofile,
            "gc_tuned": not args.no_gc_tuning,
            "connected": samples[-1].connected, "ramp_s": connected_at,
            "expected_readings_per_s": len(creds) / args.interval,
            "rss_base_mb": round(base_rss, 1), "rss_after_build_mb": round(built_rss, 1),
            "rss_mb": round(samples[-1].sim_rss_mb, 1),
            "rss_per_meter_kb": round((samples[-1].sim_rss_mb - base_rss) * 1000.0 / len(creds), 1),
        }
        if len(steady) >= 2:
            a, b = steady[0], steady[-1]
            span = b.t - a.t
            result["steady_s"] = round(span, 1)
            result["readings_per_s"] = round((b.readings_sent - a.readings_sent) / span, 1)
            result["sim_cpu_pct"] = round(100.0 * (b.sim_cpu - a.sim_cpu) / span, 1)
            if a.broker_cpu is not None and b.broker_cpu is not None:
                result["broker_cpu_pct"] = round(100.0 * (b.broker_cpu - a.broker_cpu) / span, 1)
                result["broker_rss_mb"] = b.broker_rss_mb
            if a.broker_received is not None and b.broker_received is not None:
                result["broker_received_per_s"] = round((b.broker_received - a.broker_received) / span, 1)
        if probe.rtts_ms:
            rtts = sorted(probe.rtts_ms)
            result["read_rtt_ms_p50"] = round(statistics.median(rtts), 1)
            result["read_rtt_ms_p99"] = round(rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))], 1)
            result["read_probes"] = len(rtts)
            result["read_timeouts"] = probe.timeouts
        t_stop = time.monotonic()
        await fleet.stop()
        result["stop_s"] = round(time.monotonic() - t_stop, 1)
        return result
    finally:
        if broker is not None:
            broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meter_sim.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--meters", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=15.0)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of steady state after the ramp")
    parser.add_argument("--link", default="lan")
    parser.add_argument("--connect-concurrency", type=int, default=100)
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    parser.add_argument("--broker", default=None, help="HOST:PORT of an existing broker (default: a private one)")
    parser.add_argument("--credentials", type=Path, default=None)
    parser.add_argument("--bench-user", default="twin-service")
    parser.add_argument("--bench-password-file", type=Path, default=None)
    parser.add_argument("--broker-nagle", action="store_true",
                        help="leave Nagle's algorithm on in the private broker (Mosquitto's default)")
    parser.add_argument("--no-gc-tuning", action="store_true", help="leave Python's collector as it is")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.broker and not (args.credentials and args.bench_password_file):
        parser.error("--broker needs --credentials and --bench-password-file")
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
