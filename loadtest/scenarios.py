"""The comparison's scenarios: each takes a running :class:`~loadtest.arch.Arch` and returns measured rows.

* ``probe`` - synthetic: app -> function zone -> hot store (needs only a gateway);
* ``twin`` - seed 000 Scenario 1: app <-> meter through the twin (t1) vs directly (t1');
* ``p2p`` - seed 000 Scenario 2: a P2P negotiation between twins (t2) vs with the meters in every round (t2');
* ``ondemand`` - seed 000 Scenario 3: cache hit (t5), cache miss (t5'), no twin (t5'');
* ``ami`` - seed 001 section 5: households x devices reading plus billing queries, stepped load;
* ``node`` - one gateway's throughput, flat out, without an emulated link.

Locust runs in its own process (``locust --headless --json-file``); final counts come from
its JSON, byte counters from the proxy. A scenario whose dependency is missing returns
"not available: <what is missing>" instead of rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from loadtest.arch import LOADTEST, MDMS_WINDOW_S, ROOT, Arch, CompareError
from loadtest.results import Row, RunConfig, ScenarioResult, rows_from_locust

LOCUST = str(Path(sys.executable).with_name("locust"))


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
