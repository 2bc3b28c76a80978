"""Benchmark: upgrade N twins (default 10,000) from v1 to v2 under live traffic (not a unit test).

    python -m loadtest.upgrade_bench --meters 10000 --interval 30 --out upgrade-bench.json

Starts a private Mosquitto with the meters' accounts preloaded (``meter_sim.scale.Broker``),
an edge zone with the versioned functions (``metertwin_upgrade.local.UpgradeZone``), the twins
(written straight into Redis: provisioning is not what is measured) and the simulated
meters in their own process (``loadtest.meters``). Then:

1. **baseline** (``--baseline-s``): readings and commands flow on v1;
2. **upgrade**: one operation, every twin, driven like ``python -m metertwin_upgrade follow``;
3. **after** (one reporting interval and a bit): readings and commands flow on v2.

Measured:

* time to upgrade the N twins (operation start -> completed), and meters/s;
* readings lost or applied twice: the operation's per-switch accounting (``missing``) and,
  for every meter, its v2 reading history checked for gaps and repeats;
* reading delay (applied - measured): for every meter, every reading v2 applied (the v2
  history records when), and for ``--probes`` meters polled every 100 ms in all phases
  (baseline included, so the switch's own share shows);
* the longest gap any meter saw in service during its switch: the largest delay of the
  readings around each meter's flip (last before, first after), and the time between the
  meter's last reading applied by v1 and its first applied by v2, minus the interval;
* command round trip (submitted -> acknowledged by the meter) in each phase.

Targets (issue 7): nothing lost; no reading or command delayed by more than 1 s by the switch.
The measuring (probes, histories, command round trips, CPU) is :mod:`loadtest.upgrade_measures`.
"""


from __future__ import annotations

import argparse
import contextlib
import json
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from loadtest.upgrade_measures import Phase, Samples, command_latencies, cpu_sampler, histories, probe
from meter_sim import scale
from meter_sim.fleet import MeterFleet, raise_nofile_limit, tune_gc
from meter_sim.scale import Broker as PreloadedBroker
from metertwin.twin import keys as twin_keys
from metertwin.twin.state import CREATE_LUA
from metertwin_upgrade.local import UpgradeZone

ROOT = Path(__file__).resolve().parent.parent
MANAGER = "edge-upgrade-manager"


#: stack.yml's edge functions connect as this user (``MQTT_USERNAME: twin-service``).
SERVICE_USER = "twin-service"


def preloaded_broker(passwords: dict[str, str]) -> PreloadedBroker:
    """meter_sim.scale's broker (accounts written before it starts), its all-topics account named as stack.yml wants."""
    saved = scale.BENCH_USER
    scale.BENCH_USER = SERVICE_USER
    try:
        return PreloadedBroker(passwords)
    finally:
        scale.BENCH_USER = saved


@dataclass
class BrokerAccount:
    """The preloaded broker as :class:`UpgradeZone` wants it (its all-topics account is the service account)."""

    broker: PreloadedBroker
    host: str = "127.0.0.1"
    service_user: str = SERVICE_USER

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def service_password(self) -> str:
        return self.broker.bench_password


def create_twins(client: redis.Redis, ids: list[str]) -> None:
    create = client.register_script(CREATE_LUA)
    now = repr(time.time())
    for start in range(0, len(ids), 2000):
        pipe = client.pipeline(transaction=False)
        for meter_id in ids[start:start + 2000]:
            create(keys=[twin_keys.twin(meter_id)], args=[meter_id, "edge", "{}", now], client=pipe)
        pipe.sadd(twin_keys.TWIN_INDEX, *ids[start:start + 2000])  # the index is written apart (TwinStore.create)
        pipe.execute()


def wait_first_readings(client: redis.Redis, ids: list[str], timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        pipe = client.pipeline(transaction=False)
        for meter_id in ids:
            pipe.hget(twin_keys.twin(meter_id), "s")
        missing = sum(1 for s in pipe.execute() if s is None or int(s) < 0)
        if not missing:
            return time.monotonic() - started
        print(f"  waiting for first readings: {missing} meters without one", flush=True)
        time.sleep(2.0)
    raise TimeoutError(f"not every meter reported within {timeout_s} s")


def commands(zone: UpgradeZone, ids: list[str], phase: Phase, sent: dict[str, list[tuple[str, str]]],
             stop: threading.Event, rate_per_s: float) -> None:
    token = zone.token("utility")
    rng = random.Random(7)
    i = 0
    while not stop.is_set():
        meter_id = rng.choice(ids)
        i += 1
        resp = zone.call("edge-write", "POST", f"/meters/{meter_id}/commands", token=token,
                         json={"kind": "load_limit", "params": {"watts": 1000 + i % 5000}})
        if resp.status_code == 202:
            sent.setdefault(phase.name, []).append((meter_id, resp.json()["command"]["id"]))
        else:
            sent.setdefault("errors", []).append((meter_id, f"{resp.status_code} {resp.text[:100]}"))
        stop.wait(1.0 / rate_per_s)


def drive(zone: UpgradeZone, op_id: str, timeout_s: float) -> dict[str, Any]:
    token = zone.token("admin")
    deadline = time.monotonic() + timeout_s
    last_print = 0.0
    while True:
        status = zone.call(MANAGER, "POST", f"/operations/{op_id}/advance", token=token,
                           json={"budget_s": 2.0}, timeout=60).json()
        if time.monotonic() - last_print > 2.0:
            p = status["progress"]
            print(f"  [{status['state']}] done {p['done']}/{p['selected']} in flight "
                  f"{sum(p[s] for s in ('admitted', 'prepared', 'synced', 'rebinding', 'switched'))} "
                  f"failed {p['failed']} rate {p['rate_per_s']}/s", flush=True)
            last_print = time.monotonic()
        if status["state"] in ("completed", "rolled_back", "paused"):
            return dict(status)
        if time.monotonic() > deadline:
            raise TimeoutError(f"operation {op_id} not done within {timeout_s} s: {status['progress']}")
        time.sleep(0.2)


async def _fleet(creds: Path, interval_s: float, max_duration_s: float) -> int:
    """The meters, in their own process (``--fleet``): loadtest.meters' loop plus meter_sim's GC tuning.

    Without ``tune_gc`` full collections over 10,000 meters' objects stall the fleet's loop for
    seconds, which a benchmark of the twins' delays would wrongly charge to the switch.
    """
    import asyncio
    import signal

    data = json.loads(creds.read_text())
    fleet = MeterFleet(data["host"], int(data["port"]), dict(data["meters"]), link="lan",
                       reporting_interval_s=interval_s)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with fleet:
        ok = await fleet.wait_connected(timeout_s=120)
        tune_gc()  # freeze the connected sessions
        print(json.dumps({"ready": ok, "connected": fleet.connected_count()}), flush=True)
        if not ok:
            return 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max_duration_s)
    return 0


def bulk(n: int, batch: int) -> dict[str, Any]:
    """The manager alone over ``n`` twins (``--bulk``): its bookkeeping at 100,000, without broker or gateway.

    The meters' side is played in-process: each rebind is acknowledged at once (``on_ack``),
    so this measures planning, prepare, sync, flip, drain and the per-meter accounting.
    """
    from metertwin.twin.messages import CommandAck
    from metertwin.upgrade.operations import OperationSpec, UpgradeManager
    from storage.embedded import RedisServer

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        ids = [f"bulk-{i:06d}" for i in range(n)]
        create_twins(client, ids)
        measure = client.register_script("return redis.call('HSET', KEYS[1], 's', ARGV[1], 'm', ARGV[2])")
        for start in range(0, n, 5000):
            pipe = client.pipeline(transaction=False)
            for i, meter_id in enumerate(ids[start:start + 5000]):
                m = json.dumps({"ts": time.time(), "import_kwh": 1000.0 + i, "export_kwh": 0.0, "power_w": 500.0,
                                "voltage_v": 230.0})
                measure(keys=[twin_keys.twin(meter_id)], args=[0, m], client=pipe)
            pipe.execute()
        holder: dict[str, UpgradeManager] = {}

        def meter(meter_id: str, payload: dict[str, Any], ttl_s: int) -> None:
            holder["m"].on_ack(meter_id, CommandAck(id=payload["params"]["id"], status="applied", ts=time.time()))

        mgr = holder["m"] = UpgradeManager(client, instance="bulk", publish=meter, metrics=lambda url: "")
        spec = OperationSpec.model_validate({"to": "v2", "select": {"all": True}, "batch": batch,
                                             "max_in_flight": 4 * batch, "drain_s": 0, "rebind_rate_per_s": 100_000})
        started = time.monotonic()
        op = mgr.start(spec)
        last = 0.0
        while True:
            status = mgr.advance(op["id"], budget_s=2.0)
            if time.monotonic() - last > 5:
                print(f"  [{status['state']}] {status['progress']['done']}/{status['progress']['selected']}",
                      flush=True)
                last = time.monotonic()
            if status["state"] == "completed":
                break
        elapsed = time.monotonic() - started
        memory = client.info("memory")["used_memory"]
        client.close()
        return {"bulk_twins": n, "seconds": round(elapsed, 1), "twins_per_s": round(n / elapsed, 1),
                "done": status["progress"]["done"], "missing": status["readings"]["missing"],
                "redis_used_memory_mb": round(memory / 2**20, 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile_limit()
    ids = [f"ub-{i:05d}" for i in range(args.meters)]
    passwords = {m: secrets.token_hex(8) for m in ids}
    rng = random.Random(3)
    probes = rng.sample(ids, min(args.probes, len(ids)))
    workdir = Path(tempfile.mkdtemp(prefix="upgrade-bench-"))
    print(f"broker with {len(ids)} meter accounts ...", flush=True)
    broker = preloaded_broker(passwords)
    fleet: subprocess.Popen[str] | None = None
    stop = threading.Event()
    try:
        with UpgradeZone(broker=BrokerAccount(broker), schedule="*/5 * * * * *",
                         gateway_args=args.gateway_arg) as zone:
            assert zone.redis is not None
            client = redis.Redis.from_url(zone.redis.url, decode_responses=True)
            create_twins(client, ids)
            creds = workdir / "creds.json"
            creds.write_text(json.dumps({"host": "127.0.0.1", "port": broker.port, "meters": passwords}))
            print(f"starting {len(ids)} meters (reporting every {args.interval} s) ...", flush=True)
            t0 = time.monotonic()
            fleet = subprocess.Popen(
                [sys.executable, "-m", "loadtest.upgrade_bench", "--fleet", str(creds), "--interval",
                 str(args.interval)], stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
            assert fleet.stdout is not None
            ready = json.loads(fleet.stdout.readline() or '{"ready": false}')
            if not ready.get("ready"):
                raise RuntimeError(f"meters did not connect: {ready}")
            print(f"  connected in {time.monotonic() - t0:.1f} s", flush=True)
            wait_first_readings(client, ids, timeout_s=args.interval * 3 + 60)
            phase = Phase()
            samples = Samples()
            sent: dict[str, list[tuple[str, str]]] = {}
            threads = [
                threading.Thread(target=probe, args=(client, probes, phase, samples, stop), daemon=True),
                threading.Thread(target=commands, args=(zone, probes, phase, sent, stop, args.command_rate),
                                 daemon=True),
            ]
            for t in threads:
                t.start()
            cpu: list[dict[str, Any]] = []
            pids = {"gateway": zone.gateway.proc.pid, "meters": fleet.pid, "broker": broker.proc.pid,
                    **({"redis": zone.redis.proc.pid} if zone.redis.proc else {})}
            threads.append(threading.Thread(target=cpu_sampler, args=(pids, cpu, stop), daemon=True))
            threads[-1].start()
            phase.set("baseline")
            print(f"baseline {args.baseline_s} s ...", flush=True)
            stop.wait(args.baseline_s)
            phase.set("upgrade")
            print(f"upgrading {len(ids)} twins ...", flush=True)
            started_wall = time.time()
            started = time.monotonic()
            op = zone.call(MANAGER, "POST", "/operations", token=zone.token("admin"), json={
                "to": "v2", "select": {"all": True}, "batch": args.batch, "max_in_flight": args.max_in_flight,
                "drain_s": args.drain_s, "resend_after_s": 10, "max_failed": 0,
                "rebind_rate_per_s": args.rebind_rate,
            }, timeout=60).json()
            status = drive(zone, op["id"], timeout_s=args.timeout_s)
            upgrade_s = time.monotonic() - started
            ended_wall = time.time()
            phase.set("after")
            print(f"  {status['state']} in {upgrade_s:.1f} s; after-phase {args.interval + 5:.0f} s ...", flush=True)
            stop.wait(args.interval + 5)
            stop.set()
            for t in threads:
                t.join(10)
            time.sleep(2.0)  # let the last commands be acknowledged before reading their records
            final = zone.call(MANAGER, "GET", f"/operations/{op['id']}", token=zone.token("admin")).json()
            bound_v2 = 0
            for start in range(0, len(ids), 2000):
                pipe = client.pipeline(transaction=False)
                for meter_id in ids[start:start + 2000]:
                    pipe.hget(twin_keys.twin(meter_id), "b")
                bound_v2 += sum(1 for b in pipe.execute() if b == "v2")
            result = {
                "meters": len(ids), "interval_s": args.interval, "batch": args.batch, "probes": len(probes),
                "rebind_rate_per_s": args.rebind_rate, "gateway_args": args.gateway_arg,
                "upgrade_s": round(upgrade_s, 2), "meters_per_s": round(len(ids) / upgrade_s, 1),
                "state": final["state"], "progress": final["progress"], "readings": final["readings"],
                "bound_to_v2": bound_v2,
                "histories": histories(client, ids, args.interval, (started_wall, ended_wall + args.interval + 5)),
                "probe_reading_delay": {**samples.summary(), "worst": samples.worst(started_wall)},
                "command_round_trip": command_latencies(client, sent, started_wall),
                "cpu_per_s": [{**c, "t": round(c["t"] - started_wall, 1)} for c in cpu],
                "gateway": zone.url,
            }
            client.close()
            return result
    finally:
        stop.set()
        if fleet is not None:
            fleet.terminate()
            try:
                fleet.wait(30)
            except subprocess.TimeoutExpired:
                fleet.kill()
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.upgrade_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meters", type=int, default=10_000)
    ap.add_argument("--interval", type=float, default=30.0, help="meters' reporting interval, s (30)")
    ap.add_argument("--probes", type=int, default=300, help="meters polled every 100 ms (300)")
    ap.add_argument("--command-rate", type=float, default=10.0, help="commands per second to probe meters (10)")
    ap.add_argument("--baseline-s", type=float, default=30.0)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--max-in-flight", type=int, default=2_000)
    ap.add_argument("--drain-s", type=float, default=2.0)
    ap.add_argument("--rebind-rate", type=float, default=250.0, help="rebinds per second at most (250)")
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra argument for python -m gateway")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    ap.add_argument("--bulk", type=int, default=0, help="only the manager over this many twins (no meters)")
    ap.add_argument("--fleet", type=Path, default=None, help=argparse.SUPPRESS)  # the meters' process
    args = ap.parse_args(argv)
    if args.bulk:
        print(json.dumps(bulk(args.bulk, args.batch), indent=2))
        return 0
    if args.fleet is not None:
        import asyncio

        raise_nofile_limit()
        return asyncio.run(_fleet(args.fleet, args.interval, 3600.0))
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["readings"]["missing"] == 0 and result["histories"]["seq_gaps"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
