"""``make compare``: run the same workloads against TC, CC and FC-EC on one machine and write a report.

Per architecture (a topology file, :mod:`loadtest.topology`) the driver starts, on loopback:
the hot-store Redis, the Mosquitto broker, one gateway per zone that hosts functions (each
with the functions the topology places there, re-homed from ``stack.yml``), the delay-line
proxy (:mod:`loadtest.proxy`, one process, a listening port per link hop and service), the
simulated meters, and wires every client through the proxy so each request crosses the
links its path needs. It then runs the scenarios, each a small function taking the running
architecture and returning measured rows (or "not available: <what is missing>"):

* ``probe`` - synthetic: app -> function zone -> hot store (needs only a gateway);
* ``twin`` - seed 000 Scenario 1: app <-> meter through the twin (t1) vs directly (t1');
* ``p2p`` - seed 000 Scenario 2: a P2P negotiation between twins (t2) vs with the meters in every round (t2');
* ``ondemand`` - seed 000 Scenario 3: cache hit (t5), cache miss (t5'), no twin (t5'');
* ``ami`` - seed 001 section 5: households x devices reading plus billing queries, stepped load.

Locust runs in its own process (``locust --headless --json-file``); final counts come from its
JSON. Byte counters come from the proxy. The report (``loadtest/reports/<timestamp>/report.md``,
``results.json`` and PNG plots) is written from those numbers only.

``python -m loadtest.compare --quick`` takes about 2 minutes; the full run (seed 001's 1,000 devices,
8K..20K request steps) about 15-20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtest.topology import Topology, load_topology
from storage.embedded import Mosquitto, MotoS3, RedisServer, ServiceError, free_port

ROOT = Path(__file__).resolve().parent.parent
LOADTEST = Path(__file__).resolve().parent
REPORTS = LOADTEST / "reports"
LOCUST = str(Path(sys.executable).with_name("locust"))
#: Which capability decides where a stack function runs (by its name without the zone prefix).
CAPABILITY_OF: dict[str, str] = {
    "read": "read", "registry": "read", "write": "write", "forward": "write", "ingest": "ingest",
    "p2p-market": "p2p", "p2p-bid": "p2p", "mdms-query": "mdms-query", "mdms": "mdms-query",
    "mdms-ingest": "mdms-query", "mdms-archive": "cold-store", "dr-event": "write", "probe": "read",
}
#: Default zone of a function whose capability is unknown, by its original prefix.
ZONE_CAPABILITY: dict[str, str] = {"edge": "read", "fog": "mdms-query", "cloud": "cold-store"}


class CompareError(RuntimeError):
    """The comparison could not be set up or run."""


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class RunConfig:
    """How big and long the run is; ``quick()`` for tests and smoke runs."""

    quick: bool = False
    scenarios: tuple[str, ...] = ("probe", "twin", "p2p", "ondemand", "ami", "node")
    users: int = 10
    requests_per_case: int = 400
    case_time_s: float = 20.0
    meters: int = 20
    probe_ops: int = 2
    households: int = 200
    devices_per_household: int = 5
    #: Seed 001 Fig. 10: 8K..20K requests; each step is sent within ``step_s`` seconds.
    ami_steps: tuple[int, ...] = (8000, 10000, 12000, 14000, 16000, 18000, 20000)
    ami_scale: float = 1.0
    step_s: float = 30.0
    p2p_iterations: int = 100
    p2p_negotiations: int = 10
    meter_timeout_s: float = 5.0
    node_users: int = 16
    node_requests: int = 6000
    node_time_s: float = 15.0
    max_run_s: float = 3600.0

    @classmethod
    def quick_run(cls, scenarios: tuple[str, ...] | None = None) -> RunConfig:
        return cls(
            quick=True, scenarios=scenarios or cls.scenarios, users=4, requests_per_case=30, case_time_s=6.0,
            meters=4, households=40, ami_steps=(8000, 14000, 20000), ami_scale=0.02, step_s=4.0,
            p2p_iterations=10, p2p_negotiations=2, meter_timeout_s=4.0, node_users=8, node_requests=600,
            node_time_s=5.0, max_run_s=600.0,
        )


# --------------------------------------------------------------------------- wiring
_handed_out: set[int] = set()


def unique_port() -> int:
    """A free loopback port not handed out before by this process (ports are bound later, in other
    processes, so two calls to ``free_port`` alone could return the same one)."""
    for _ in range(1000):
        port = free_port()
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise CompareError("no unused loopback port found")


@dataclass(frozen=True)
class Endpoint:
    """Where a client connects: a service's own port (no hop) or the first hop of a proxy chain."""

    port: int = 0
    route: str | None = None

    def resolve(self, ports: dict[str, int]) -> int:
        """The port, once the proxy has bound its routes (``ports``: route name -> port)."""
        return ports[self.route] if self.route is not None else self.port


@dataclass
class Wiring:
    """Proxy routes for one topology: every path becomes a chain of hops, one listening port each.

    The proxy binds every route's port itself (port 0) and chains hops by route name, so no port is
    picked in advance except the target services' own.
    """

    topo: Topology
    routes: list[dict[str, Any]] = field(default_factory=list)
    _memo: dict[tuple[tuple[str, ...], str], Endpoint] = field(default_factory=dict)

    def entry(self, path: list[str], service: str, target_port: int) -> Endpoint:
        """What the first node of ``path`` connects to, to reach ``service`` listening on ``target_port``."""
        if len(path) == 1:
            return Endpoint(port=target_port)
        key = (tuple(path), service)
        if key in self._memo:
            return self._memo[key]
        target: dict[str, Any] = {"target_port": target_port}
        name = ""
        for src, dst in reversed(list(itertools.pairwise(path))):
            link = self.topo.link(src, dst)
            name = f"{service}:{'>'.join(path)}:{src}->{dst}"
            self.routes.append({"name": name, "link": link.name, "src": src, "dst": dst, "listen_port": 0,
                                "target_host": "127.0.0.1", **target})
            target = {"target_route": name}
        self._memo[key] = Endpoint(route=name)
        return self._memo[key]

    def proxy_config(self) -> dict[str, Any]:
        links: dict[str, Any] = {}
        for link in self.topo.links:
            a, b = link.between
            bw = {d: v for d, v in ((f"{a}->{b}", link.bandwidth_from(a)), (f"{b}->{a}", link.bandwidth_from(b)))
                  if v is not None}
            links[link.name] = {"latency_ms": link.latency_ms, "jitter_ms": link.jitter_ms, "bandwidth_mbps": bw}
        return {"links": links, "routes": self.routes}


# --------------------------------------------------------------------------- running architecture
@dataclass
class Arch:
    """One running architecture: URLs as the apps see them (through the links), tokens, meters, proxy stats."""

    topo: Topology
    dir: Path
    signing_key: str
    app_urls: dict[str, str]  # capability -> gateway base URL through the apps' links
    direct_urls: dict[str, str]  # zone -> gateway base URL without links (set-up only)
    function_names: dict[str, str]  # capability or base name -> deployed function name
    app_broker_port: int
    mosquitto: Mosquitto
    stats_port: int
    meters: list[str] = field(default_factory=list)
    ami_meters: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def token(self, *scopes: str) -> str:
        from metertwin.core.auth import issue_token

        return issue_token("loadtest", set(scopes), ttl_s=4 * 3600, key=self.signing_key)

    def fn_url(self, base: str) -> str | None:
        """URL of the function serving ``base`` (``read``, ``probe``, ``mdms-query``...) as apps reach it."""
        name = self.function_names.get(base)
        if name is None:
            return None
        cap = CAPABILITY_OF.get(base, base)
        return f"{self.app_urls[cap]}/function/{name}"

    def proxy_stats(self) -> dict[str, Any]:
        r = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats", timeout=5)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def reset_proxy(self) -> None:
        httpx.post(f"http://127.0.0.1:{self.stats_port}/reset", timeout=5).raise_for_status()


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
        stack.callback(_stop_process, proxy)
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
        _provision(arch, cfg, meter_port, stack)
        yield arch


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _provision(arch: Arch, cfg: RunConfig, meter_port: int, stack: contextlib.ExitStack) -> None:
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


#: Seed 001: two readings per device and day; the billing queries cover this window.
MDMS_WINDOW_S = 86_400.0


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
        _stop_process(proc)
        log.close()
        raise CompareError(f"meters did not start: {(arch.dir / 'meters.log').read_text()[-2000:]}")

    def stop() -> None:
        _stop_process(proc)
        log.close()

    return stop


# --------------------------------------------------------------------------- locust
def percentile(hist: dict[str, int], q: float) -> float | None:
    """Percentile (0..1) of a Locust response-time histogram ``{ms: count}``."""
    total = sum(hist.values())
    if not total:
        return None
    need = q * total
    seen = 0
    for ms in sorted(hist, key=float):
        seen += hist[ms]
        if seen >= need:
            return float(ms)
    return float(max(hist, key=float))


@dataclass
class Row:
    """One measured case of one architecture."""

    arch: str
    scenario: str
    case: str
    requests: int
    failures: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    rps: float
    bytes_by_link: dict[str, dict[str, int]] = field(default_factory=dict)
    note: str = ""
    step: str = ""
    #: Requests of the whole Locust run the byte counters belong to (several rows can share one run).
    run_requests: int = 0

    @property
    def total_bytes(self) -> int:
        """Bytes on all links during the run this row belongs to."""
        return sum(sum(d.values()) for d in self.bytes_by_link.values())

    @property
    def bytes_per_request(self) -> float | None:
        n = self.run_requests or self.requests
        return self.total_bytes / n if n else None


def rows_from_locust(entries: list[dict[str, Any]], arch: str, scenario: str, *, divide: float = 1.0,
                     bytes_by_link: dict[str, dict[str, int]] | None = None) -> list[Row]:
    rows = []
    run_requests = sum(int(e["num_requests"]) for e in entries)
    for e in entries:
        n = int(e["num_requests"])
        hist = {str(k): int(v) for k, v in e.get("response_times", {}).items()}
        span = max(1e-9, float(e.get("last_request_timestamp") or 0) - float(e.get("start_time") or 0))

        def d(x: float | None) -> float | None:
            return None if x is None else round(x / divide, 2)

        name = str(e["name"])
        case, _, step = name.partition(" @")
        rows.append(Row(
            arch=arch, scenario=scenario, case=case, step=step, requests=n, failures=int(e["num_failures"]),
            p50_ms=d(percentile(hist, 0.50)), p95_ms=d(percentile(hist, 0.95)), p99_ms=d(percentile(hist, 0.99)),
            mean_ms=d(float(e["total_response_time"]) / n) if n else None,
            rps=round(n / span, 2) if n > 1 else float(n),
            bytes_by_link=bytes_by_link or {}, run_requests=run_requests,
        ))
    return rows


def run_locust(arch: Arch, tag: str, locustfile: str, user_class: str, config: dict[str, Any], *,
               users: int, run_time_s: float) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Run Locust headless in its own process; returns its JSON stats and the bytes each link carried."""
    cfg_path = arch.dir / f"locust-{tag}.json"
    cfg_path.write_text(json.dumps(config))
    out_prefix = arch.dir / f"stats-{tag}"
    argv = [LOCUST, "-f", str(LOADTEST / locustfile), "--headless", "--only-summary",
            "--json-file", str(out_prefix), "--stop-timeout", "3", "--exit-code-on-error", "0"]
    if config.get("scenario") != "ami":
        argv += ["-u", str(users), "-r", str(users), "--run-time", f"{max(1, int(run_time_s))}s"]
    argv.append(user_class)
    arch.reset_proxy()
    env = {**os.environ, "MT_LOCUST_CONFIG": str(cfg_path), "PYTHONPATH": str(ROOT)}
    with open(arch.dir / f"locust-{tag}.log", "wb") as log:
        try:
            subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                           timeout=run_time_s + 60, check=False)
        except subprocess.TimeoutExpired:
            raise CompareError(f"locust {tag} overran {run_time_s + 60:.0f} s") from None
    traffic = arch.proxy_stats()["links"]
    result = Path(f"{out_prefix}.json")
    if not result.exists():
        raise CompareError(f"locust {tag} wrote no JSON: {(arch.dir / f'locust-{tag}.log').read_text()[-2000:]}")
    entries: list[dict[str, Any]] = json.loads(result.read_text())
    return entries, {k: v for k, v in traffic.items() if any(v.values())}


# --------------------------------------------------------------------------- scenarios
@dataclass
class ScenarioResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    unavailable: str | None = None


def _headers(arch: Arch, *scopes: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {arch.token(*scopes)}"}


def scenario_probe(arch: Arch, cfg: RunConfig) -> ScenarioResult:
    """Synthetic: app -> function zone -> hot store and back (needs only a gateway)."""
    res = ScenarioResult("probe")
    url = arch.fn_url("probe")
    if url is None:
        res.unavailable = "probe function not deployed"
        return res
    conf = {"scenario": "probe", "probe_url": url, "headers": _headers(arch, "utility"), "ops": cfg.probe_ops,
            "max_requests": cfg.requests_per_case}
    entries, traffic = run_locust(arch, "probe", "locustfile.py", "ProbeUser", conf, users=cfg.users,
                                  run_time_s=cfg.case_time_s)
    res.rows = rows_from_locust(entries, arch.topo.name, "probe", bytes_by_link=traffic)
    return res


def _twin_case(arch: Arch, cfg: RunConfig, case: str, scenario: str, *, divide: float = 1.0,
               meters: list[str] | None = None) -> list[Row]:
    conf: dict[str, Any] = {
            "scenario": "twin", "case": case, "read_url": arch.fn_url("read"), "headers": _headers(arch, "utility"),
            "meters": meters or arch.meters, "max_requests": cfg.requests_per_case,
            "meter_timeout_s": cfg.meter_timeout_s, "timeout_s": cfg.meter_timeout_s + 5}
    entries, traffic = run_locust(arch, f"{scenario}-{case}", "locustfile.py", "TwinUser", conf,
                                  users=min(cfg.users, max(1, len(conf["meters"]))), run_time_s=cfg.case_time_s)
    rows = rows_from_locust(entries, arch.topo.name, scenario, divide=divide, bytes_by_link=traffic)
    if not rows:
        arch.notes.append(f"{scenario} {case}: no request completed within {cfg.case_time_s:.0f} s")
    return rows


def _direct_case(arch: Arch, cfg: RunConfig, case: str, scenario: str, *, divide: float = 1.0,
                 requests: int | None = None) -> list[Row]:
    mosq = arch.mosquitto
    conf = {"scenario": "direct", "case": case, "broker_host": "127.0.0.1", "broker_port": arch.app_broker_port,
            "username": mosq.service_user, "password": mosq.service_password, "meters": arch.meters,
            "max_requests": requests or cfg.requests_per_case, "meter_timeout_s": cfg.meter_timeout_s,
            "iterations": cfg.p2p_iterations}
    # t2': negotiations run side by side (each between two meters), like the markets of t2 one after another.
    users = min(4, cfg.p2p_negotiations) if case == "t2'" else min(cfg.users, max(1, len(arch.meters)))
    run_time = cfg.case_time_s
    if case == "t2'":
        # Long enough for at least two negotiations each of N meter round trips over the emulated links.
        topo = arch.topo
        rtt_s = 2 * (topo.one_way_ms(topo.path("apps", "broker")) + topo.one_way_ms(topo.path("meters", "broker")))
        run_time = cfg.case_time_s * 4 + 2 * cfg.p2p_iterations * rtt_s * 1.5 / 1000
    entries, traffic = run_locust(arch, f"{scenario}-{case}", "locustfile_mqtt.py", "DirectMeterUser", conf,
                                  users=users, run_time_s=run_time)
    rows = rows_from_locust(entries, arch.topo.name, scenario, divide=divide, bytes_by_link=traffic)
    if not rows:
        arch.notes.append(f"{scenario} {case}: no request completed within {run_time:.0f} s")
    return rows


def _need_meters(arch: Arch, res: ScenarioResult) -> bool:
    if "read" not in arch.function_names:
        res.unavailable = "not available: read function not in stack.yml"
        return False
    if not arch.meters:
        res.unavailable = "not available: " + ("; ".join(arch.notes) or "no simulated meters")
        return False
    return True


def scenario_twin(arch: Arch, cfg: RunConfig) -> ScenarioResult:
    """Seed 000 Scenario 1: end-to-end delay app <-> meter, through the twin (t1) and directly (t1'); RTT/2."""
    res = ScenarioResult("twin")
    if not _need_meters(arch, res):
        return res
    res.rows = _twin_case(arch, cfg, "t1", "twin", divide=2.0) + _direct_case(arch, cfg, "t1'", "twin", divide=2.0)
    return res


def scenario_ondemand(arch: Arch, cfg: RunConfig) -> ScenarioResult:
    """Seed 000 Scenario 3: on-demand read, cache hit (t5), cache miss (t5'), no twin (t5'': app asks the meter)."""
    res = ScenarioResult("ondemand")
    if not _need_meters(arch, res):
        return res
    res.rows = (_twin_case(arch, cfg, "t5", "ondemand") + _twin_case(arch, cfg, "t5'", "ondemand")
                + _direct_case(arch, cfg, "t5''", "ondemand"))
    return res


#: Owner profiles for the P2P markets: alternately a PV seller and a buyer (kWh per slot).
P2P_PROFILES: tuple[dict[str, Any], ...] = (
    {"forecast_load_kwh": 0.3, "forecast_pv_kwh": 1.6},
    {"forecast_load_kwh": 1.2, "forecast_pv_kwh": 0.0},
)


def _open_markets(arch: Arch, cfg: RunConfig) -> list[str]:
    """Markets of ``p2p_iterations`` rounds over the live meters, opened before the timed runs."""
    zone = arch.topo.placement.p2p
    base = f"{arch.direct_urls[zone]}/function/{arch.function_names['p2p-market']}"
    headers = _headers(arch, "utility")
    parts = [{"meter_id": m, **P2P_PROFILES[i % len(P2P_PROFILES)]} for i, m in enumerate(arch.meters)]
    ids = []
    with httpx.Client(timeout=30) as client:
        for _ in range(cfg.p2p_negotiations):
            body = {"slot_start": time.time() + 3600, "feed_in_tariff": 0.08, "retail_tariff": 0.30,
                    "max_rounds": cfg.p2p_iterations, "min_rounds": cfg.p2p_iterations, "deliver": True}
            r = client.post(f"{base}/markets", json=body, headers=headers)
            if r.status_code != 201:
                raise CompareError(f"opening a market answered {r.status_code}: {r.text[:300]}")
            market_id = str(r.json()["id"])
            r = client.post(f"{base}/markets/{market_id}/participants", json={"participants": parts}, headers=headers)
            if r.status_code != 201:
                raise CompareError(f"joining market {market_id} answered {r.status_code}: {r.text[:300]}")
            ids.append(market_id)
    return ids


def scenario_p2p(arch: Arch, cfg: RunConfig) -> ScenarioResult:
    """Seed 000 Scenario 2: a negotiation of N rounds between twins (t2) vs with the meters in every round (t2')."""
    res = ScenarioResult("p2p")
    if "p2p-market" not in arch.function_names:
        res.unavailable = "not available: no p2p-market function"
        return res
    if not _need_meters(arch, res):
        return res
    markets = _open_markets(arch, cfg)
    conf = {"scenario": "p2p", "market_url": arch.fn_url("p2p-market"), "markets": markets,
            "headers": _headers(arch, "utility"), "max_requests": len(markets), "timeout_s": 120}
    entries, traffic = run_locust(arch, "p2p-t2", "locustfile.py", "P2PUser", conf, users=1,
                                  run_time_s=cfg.case_time_s * 4)
    rows = rows_from_locust(entries, arch.topo.name, "p2p", bytes_by_link=traffic)
    rows += _direct_case(arch, cfg, "t2'", "p2p", requests=cfg.p2p_negotiations)
    for r in rows:
        r.note = f"{cfg.p2p_iterations} rounds per negotiation"
    res.rows = rows
    return res


def scenario_ami(arch: Arch, cfg: RunConfig) -> ScenarioResult:
    """Seed 001 section 5: devices reading through their twins plus billing queries, stepped 8K..20K requests."""
    res = ScenarioResult("ami")
    if "read" not in arch.function_names or not arch.ami_meters:
        res.unavailable = "not available: read/registry/ingest functions needed to provision and read twins"
        return res
    steps = []
    total = 0
    per_user_rps = 2.0
    for n in cfg.ami_steps:
        budget = max(1, int(n * cfg.ami_scale))
        rate = budget / cfg.step_s
        users = max(1, round(rate / per_user_rps))
        steps.append({"label": f"{n // 1000}K", "users": users, "duration_s": cfg.step_s, "budget": budget})
        total += budget
    conf: dict[str, Any] = {
        "scenario": "ami", "read_url": arch.fn_url("read"), "meters": arch.ami_meters, "steps": steps,
        "headers": _headers(arch, "utility", "billing", "mdms"), "max_requests": total,
        "per_user_rps": per_user_rps, "timeout_s": 10,
    }
    mdms = arch.fn_url("mdms-query")
    if mdms:
        now = time.time()
        conf["mdms_url"] = mdms
        conf["billing_path"] = f"/meters/{{meter}}/billing?from={now - MDMS_WINDOW_S:.0f}&to={now:.0f}"
    else:
        arch.notes.append("billing queries not available: no mdms-query function (AMI runs reads only)")
    entries, traffic = run_locust(arch, "ami", "locustfile.py", "AmiUser", conf, users=0,
                                  run_time_s=cfg.step_s * len(steps) + 10)
    rows = rows_from_locust(entries, arch.topo.name, "ami", bytes_by_link=traffic)
    res.rows = sorted(rows, key=lambda r: ([s["label"] for s in steps].index(r.step)
                                           if r.step in [s["label"] for s in steps] else 99, r.case))
    return res


def scenario_node(arch: Arch, cfg: RunConfig) -> ScenarioResult:
    """Throughput of one node: cached reads sent straight to the read zone's gateway (no emulated link),
    as fast as it answers. The capacity planner takes the best of these as the per-node throughput."""
    res = ScenarioResult("node")
    if "read" not in arch.function_names or not arch.ami_meters:
        res.unavailable = "not available: read/registry/ingest functions needed"
        return res
    zone = arch.topo.placement.read
    direct = f"{arch.direct_urls[zone]}/function/{arch.function_names['read']}"
    conf: dict[str, Any] = {
        "scenario": "twin", "case": "t5", "read_url": direct,
        "headers": _headers(arch, "utility"), "meters": arch.ami_meters, "max_requests": cfg.node_requests,
        "timeout_s": 10,
    }
    entries, traffic = run_locust(arch, "node", "locustfile.py", "TwinUser", conf, users=cfg.node_users,
                                  run_time_s=cfg.node_time_s)
    res.rows = rows_from_locust(entries, arch.topo.name, "node", bytes_by_link=traffic)
    for r in res.rows:
        r.case = f"cached read @{zone} gateway"
    return res


SCENARIOS: dict[str, Callable[[Arch, RunConfig], ScenarioResult]] = {
    "node": scenario_node,
    "probe": scenario_probe, "twin": scenario_twin, "p2p": scenario_p2p, "ondemand": scenario_ondemand,
    "ami": scenario_ami,
}


# --------------------------------------------------------------------------- driver
@dataclass
class ArchResult:
    topo: Topology
    scenarios: dict[str, ScenarioResult]
    notes: list[str]
    seconds: float


def run_compare(topologies: list[Topology], cfg: RunConfig, out_dir: Path) -> Path:
    """Run every scenario on every architecture, write the report, return its path."""
    from loadtest import report

    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + cfg.max_run_s
    results: list[ArchResult] = []
    work_root = Path(tempfile.mkdtemp(prefix="metertwin-compare-"))
    try:
        for topo in topologies:
            t0 = time.monotonic()
            scen: dict[str, ScenarioResult] = {}
            with _started_arch(topo, cfg, work_root / topo.name) as arch:
                for name in cfg.scenarios:
                    if time.monotonic() > deadline:
                        budget = f"not run: the {cfg.max_run_s:.0f} s budget ran out"
                        scen[name] = ScenarioResult(name, unavailable=budget)
                        continue
                    print(f"[compare] {topo.name}: {name}", flush=True)
                    try:
                        scen[name] = SCENARIOS[name](arch, cfg)
                    except (CompareError, httpx.HTTPError, ServiceError) as exc:
                        scen[name] = ScenarioResult(name, unavailable=f"failed: {exc}")
                    except Exception as exc:  # one broken scenario must not lose the others' results
                        scen[name] = ScenarioResult(name, unavailable=f"failed: {type(exc).__name__}: {exc}")
                notes = list(arch.notes)
                _keep_logs(arch.dir, out_dir / "logs" / topo.name)
            results.append(ArchResult(topo, scen, notes, time.monotonic() - t0))
        return report.write_report(results, cfg, out_dir)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)


@contextlib.contextmanager
def _started_arch(topo: Topology, cfg: RunConfig, workdir: Path, attempts: int = 3) -> Iterator[Arch]:
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


def _keep_logs(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*"):
        if f.is_file() and f.suffix in (".log", ".json", ".yml") and f.name not in ("meters.json",):
            shutil.copy2(f, dst / f.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~2-minute run (small counts, short steps)")
    parser.add_argument("--topology", action="append", default=[],
                        help="tc, cc, fcec or a YAML path (repeatable; default: tc cc fcec)")
    parser.add_argument("--scenario", action="append", default=[], choices=sorted(SCENARIOS),
                        help="run only these scenarios (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default loadtest/reports/<timestamp>)")
    args = parser.parse_args(argv)
    scenarios = tuple(args.scenario) or RunConfig.scenarios
    cfg = RunConfig.quick_run(scenarios) if args.quick else RunConfig(scenarios=scenarios)
    topologies = [load_topology(t) for t in (args.topology or ["tc", "cc", "fcec"])]
    out = args.out or REPORTS / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = run_compare(topologies, cfg, out)
    print(f"[compare] report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
