"""Start one architecture on loopback: Redis, Mosquitto, gateways per zone, the delay proxy, meters.

Every function of ``stack.yml`` (and any function folder not yet in it) is re-homed to the
zone the topology places its capability in; every client connects through the proxy so each
request crosses the links its path needs. Twins are provisioned through the registry function
and seeded with a first reading (and MDMS interval data for the billing queries).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtest.arch import (
    CAPABILITY_OF,
    LOADTEST,
    MDMS_WINDOW_S,
    ROOT,
    ZONE_CAPABILITY,
    Arch,
    CompareError,
    stop_process,
)
from loadtest.results import RunConfig
from loadtest.topology import Topology
from loadtest.wiring import Endpoint, Wiring, unique_port
from storage.embedded import Mosquitto, MotoS3, RedisServer, ServiceError


def _stack_functions() -> dict[str, dict[str, Any]]:
    """Function definitions of the repo's stack.yml keyed by base name (zone prefix removed)."""
    from gateway.stack import load_stack

    out: dict[str, dict[str, Any]] = {}
    stack_path = ROOT / "stack.yml"
    if stack_path.exists():
        stack = load_stack(stack_path)
        for name, spec in stack.functions.items():
            prefix, _, base = name.partition("-")
            out.setdefault(base, {"handler": str(spec.handler_dir), "annotations": dict(spec.annotations),
                                  "secrets": list(spec.secrets), "origin": prefix})
    # Functions written but not (yet) in stack.yml still take part, with the default secrets.
    for handler in sorted((ROOT / "functions").glob("*/handler.py")):
        out.setdefault(handler.parent.name, {"handler": str(handler.parent), "annotations": {},
                                             "secrets": ["token-signing-key", "mqtt-password"], "origin": "edge"})
    out["probe"] = {"handler": str(LOADTEST / "probe"), "annotations": {}, "secrets": ["token-signing-key"],
                    "origin": "edge"}
    return out


def _zone_of_function(topo: Topology, base: str, origin: str) -> str:
    cap = CAPABILITY_OF.get(base) or ZONE_CAPABILITY.get(origin, "read")
    return topo.placement.zone_of(cap)


@contextlib.contextmanager
def start_arch(topo: Topology, cfg: RunConfig, workdir: Path) -> Iterator[Arch]:
    """Start everything one architecture needs; stop it all on exit."""
    from gateway.server import GatewayProcess

    workdir.mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()
    with stack:
        secrets_dir = workdir / "secrets"
        secrets_dir.mkdir(exist_ok=True)
        signing_key = secrets.token_hex(24)
        redis = stack.enter_context(RedisServer())
        mosq = stack.enter_context(Mosquitto(max_queued_messages=100_000))
        (secrets_dir / "token-signing-key").write_text(signing_key)
        (secrets_dir / "mqtt-password").write_text(mosq.service_password)

        p = topo.placement
        functions = _stack_functions()
        # The cold tier (S3) only when an MDMS function takes part.
        s3 = stack.enter_context(MotoS3()) if any(b.startswith("mdms") for b in functions) else None
        by_zone: dict[str, list[str]] = {}
        for base, fn in functions.items():
            by_zone.setdefault(_zone_of_function(topo, base, fn["origin"]), []).append(base)
        gw_ports = {zone: unique_port() for zone in by_zone}

        wiring = Wiring(topo)
        zone_eps: dict[str, dict[str, Endpoint]] = {}
        for zone in by_zone:
            zone_eps[zone] = {"redis": wiring.entry(topo.path(zone, "hot-store"), "redis", redis.port),
                              "mqtt": wiring.entry(topo.path(zone, "broker"), "mqtt", mosq.port)}
            if s3 is not None:
                zone_eps[zone]["s3"] = wiring.entry(topo.path(zone, "cold-store"), "s3", s3.port)
        app_eps: dict[str, Endpoint] = {}
        for cap in ("read", "write", "mdms-query", "p2p", "ingest"):
            zone = p.zone_of(cap)
            if zone in gw_ports:
                app_eps[cap] = wiring.entry(topo.path("apps", cap), f"gw-{zone}", gw_ports[zone])
        meter_ep = wiring.entry(topo.path("meters", "broker"), "mqtt", mosq.port)
        app_broker_ep = wiring.entry(topo.path("apps", "broker"), "mqtt", mosq.port)

        # Proxy: one process for all hops of this architecture.
        proxy_cfg = workdir / "proxy.json"
        proxy_cfg.write_text(json.dumps(wiring.proxy_config(), indent=1))
        proxy_log = open(workdir / "proxy.log", "wb")  # noqa: SIM115 - closed by the exit stack
        stack.callback(proxy_log.close)
        proxy = subprocess.Popen(
            [sys.executable, "-m", "loadtest.proxy", "--config", str(proxy_cfg), "--stats-port", "0",
             "--stats-file", str(workdir / "proxy-stats.json"), "--max-duration", str(cfg.max_run_s)],
            stdout=subprocess.PIPE, stderr=proxy_log, cwd=ROOT, start_new_session=True,
        )
        stack.callback(stop_process, proxy)
        assert proxy.stdout is not None
        ready_line = proxy.stdout.readline()
        if not ready_line:
            raise CompareError(f"proxy did not start: {(workdir / 'proxy.log').read_text()[-2000:]}")
        ready = json.loads(ready_line)
        stats_port = int(ready["stats_port"])
        ports: dict[str, int] = {k: int(v) for k, v in ready["ports"].items()}

        zone_env: dict[str, dict[str, str]] = {}
        for zone, eps in zone_eps.items():
            zone_env[zone] = {
                "ZONE": zone, "REDIS_URL": f"redis://127.0.0.1:{eps['redis'].resolve(ports)}/0",
                "MQTT_HOST": "127.0.0.1", "MQTT_PORT": str(eps["mqtt"].resolve(ports)),
                "MQTT_USERNAME": mosq.service_user,
            }
            if "s3" in eps:
                zone_env[zone]["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{eps['s3'].resolve(ports)}"
                zone_env[zone]["MDMS_DATA_ZONE"] = p.hot_store
                # The registry function does not write the MDMS registry entry (keys.registry_entry):
                # without this, the MDMS would refuse the seeded readings of twins it was not told about.
                zone_env[zone]["MDMS_REQUIRE_REGISTERED_METER"] = "false"
        app_urls = {cap: f"http://127.0.0.1:{ep.resolve(ports)}" for cap, ep in app_eps.items()}
        meter_port = meter_ep.resolve(ports)
        app_broker_port = app_broker_ep.resolve(ports)

        # One stack file per architecture: every function re-homed to the zone the topology names.
        names: dict[str, str] = {}
        stack_doc: dict[str, Any] = {"version": 1.0, "provider": {"name": "openfaas", "gateway": "http://127.0.0.1"},
                                     "functions": {}}
        for zone, bases in by_zone.items():
            for base in bases:
                fn = functions[base]
                name = f"{zone}-{base}"
                names[base] = name
                entry: dict[str, Any] = {"lang": "python3-http", "handler": fn["handler"],
                                         "environment": zone_env[zone], "secrets": fn["secrets"]}
                if fn["annotations"]:
                    entry["annotations"] = fn["annotations"]
                stack_doc["functions"][name] = entry
        stack_file = workdir / "stack.yml"
        stack_file.write_text(yaml.safe_dump(stack_doc, sort_keys=False))

        direct: dict[str, str] = {}
        for zone, port in gw_ports.items():
            gw = GatewayProcess(stack_file, zone, port=port, secrets_dir=secrets_dir,
                                log_path=workdir / f"gateway-{zone}.log", args=["--log-level", "warning"])
            stack.callback(gw.stop)
            direct[zone] = gw.url

        arch = Arch(topo=topo, dir=workdir, signing_key=signing_key, app_urls=app_urls, direct_urls=direct,
                    function_names=names, app_broker_port=app_broker_port, mosquitto=mosq, stats_port=stats_port)
        provision(arch, cfg, meter_port, stack)
        yield arch


@contextlib.contextmanager
def started_arch(topo: Topology, cfg: RunConfig, workdir: Path, attempts: int = 3) -> Iterator[Arch]:
    """:func:`start_arch`, retried: free ports are picked then bound, and other programs on the
    machine can take one in between (then a service exits before listening)."""
    for attempt in range(1, attempts + 1):
        cm = start_arch(topo, cfg, workdir / f"try{attempt}")
        try:
            arch = cm.__enter__()
        except (ServiceError, CompareError, OSError) as exc:
            if attempt == attempts:
                raise
            print(f"[compare] {topo.name}: start failed ({exc}); retrying", flush=True)
            continue
        try:
            yield arch
        except BaseException:
            if not cm.__exit__(*sys.exc_info()):
                raise
        else:
            cm.__exit__(None, None, None)
        return


def provision(arch: Arch, cfg: RunConfig, meter_port: int, stack: contextlib.ExitStack) -> None:
    """Create twins (registry), start simulated meters for them, seed the AMI twins' readings."""
    if not set(cfg.scenarios) - {"probe"}:
        return  # the synthetic probe needs no twins
    if "registry" not in arch.function_names:
        arch.notes.append("no registry function in stack.yml: twins not provisioned")
        return
    zone = arch.topo.placement.read
    base = f"{arch.direct_urls[zone]}/function/{arch.function_names['registry']}"
    admin = {"Authorization": f"Bearer {arch.token('admin')}"}
    run_id = secrets.token_hex(3)
    live_ids = [f"lt{run_id}-m{i:04d}" for i in range(cfg.meters)]
    ami_ids = [f"lt{run_id}-h{h:03d}d{d}" for h in range(cfg.households) for d in range(cfg.devices_per_household)]
    credentials: dict[str, str] = {}
    with httpx.Client(timeout=60) as client:
        for chunk_start in range(0, len(live_ids) + len(ami_ids), 500):
            ids = (live_ids + ami_ids)[chunk_start:chunk_start + 500]
            r = client.post(f"{base}/meters/bulk", json={"meters": [{"meter_id": m} for m in ids]}, headers=admin)
            if r.status_code >= 300:
                raise CompareError(f"registry bulk provisioning answered {r.status_code}: {r.text[:500]}")
            for c in r.json().get("meters", []):
                credentials[c["meter_id"]] = c["password"]
        arch.ami_meters = [m for m in ami_ids if m in credentials]
        # Every twin starts with a cached reading, so cache hits are hits from the first request.
        _seed_readings(arch, client, [m for m in live_ids + ami_ids if m in credentials])
        _seed_mdms(arch, client, arch.ami_meters)
    fleet = _start_meters(arch, {m: credentials[m] for m in live_ids if m in credentials}, meter_port)
    if fleet is not None:
        stack.callback(fleet)
        arch.meters = [m for m in live_ids if m in credentials]


def _seed_readings(arch: Arch, client: httpx.Client, meter_ids: list[str]) -> None:
    """Give the AMI twins a cached reading through the ingest function (as if each meter had reported)."""
    if "ingest" not in arch.function_names or not meter_ids:
        return
    zone = arch.topo.placement.ingest
    url = f"{arch.direct_urls[zone]}/function/{arch.function_names['ingest']}/"
    headers = {"Authorization": f"Bearer {arch.token('service')}"}
    now = time.time()
    for i, meter in enumerate(meter_ids):
        body = {"ts": now, "import_kwh": 1000.0 + i, "export_kwh": 0.0, "power_w": 600.0, "voltage_v": 230.0,
                "seq": 1}
        r = client.post(url, json=body, headers={**headers, "X-Topic": f"meters/{meter}/up/reading"})
        if r.status_code >= 300:
            raise CompareError(f"seeding reading of {meter} answered {r.status_code}: {r.text[:300]}")


def _seed_mdms(arch: Arch, client: httpx.Client, meter_ids: list[str]) -> None:
    """Interval data for the billing queries: two readings a day per device (seed 001), via mdms-ingest."""
    if "mdms-ingest" not in arch.function_names or not meter_ids:
        return
    zone = arch.topo.placement.zone_of(CAPABILITY_OF["mdms-ingest"])
    url = f"{arch.direct_urls[zone]}/function/{arch.function_names['mdms-ingest']}/readings/batch"
    now = time.time()
    t0, t1 = now - MDMS_WINDOW_S * 0.75, now - MDMS_WINDOW_S * 0.25
    readings = []
    for i, m in enumerate(meter_ids):
        readings.append({"meter_id": m, "seq": 1, "ts": round(t0), "import": 1000.0 + i, "power": 500.0})
        readings.append({"meter_id": m, "seq": 2, "ts": round(t1), "import": 1006.0 + i, "power": 500.0})
    headers = {"Authorization": f"Bearer {arch.token('mdms')}"}
    for start in range(0, len(readings), 2000):
        r = client.post(url, json={"source": "loadtest", "units": {}, "readings": readings[start:start + 2000]},
                        headers=headers)
        if r.status_code >= 300 or r.json().get("rejected"):
            arch.notes.append(f"MDMS seeding: mdms-ingest answered {r.status_code}: {r.text[:300]}")
            return


def _start_meters(arch: Arch, creds: dict[str, str], port: int) -> Callable[[], None] | None:
    """Run the simulated meters in their own process (``loadtest.meters``); returns a stopper."""
    if not creds:
        return None
    try:
        import meter_sim

        if not hasattr(meter_sim, "MeterFleet"):
            raise ImportError("meter_sim.MeterFleet")
    except ImportError:
        arch.notes.append("meter_sim.MeterFleet is not available: no simulated meters")
        return None
    cred_file = arch.dir / "meters.json"
    cred_file.write_text(json.dumps({"host": "127.0.0.1", "port": port, "meters": creds}))
    log = open(arch.dir / "meters.log", "wb")  # noqa: SIM115 - closed by the stopper
    proc = subprocess.Popen([sys.executable, "-m", "loadtest.meters", str(cred_file)], stdout=subprocess.PIPE,
                            stderr=log, cwd=ROOT, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line or not json.loads(line).get("ready"):
        stop_process(proc)
        log.close()
        raise CompareError(f"meters did not start: {(arch.dir / 'meters.log').read_text()[-2000:]}")

    def stop() -> None:
        stop_process(proc)
        log.close()

    return stop
