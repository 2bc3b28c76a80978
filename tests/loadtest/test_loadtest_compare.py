"""The comparison driver: wiring follows the topology, and a short real run's report follows the topology file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loadtest.results import RunConfig, percentile, rows_from_locust
from loadtest.topology import TOPOLOGY_DIR, load_topology, parse_topology
from loadtest.wiring import Endpoint, Wiring

ROOT = Path(__file__).resolve().parents[2]


def test_wiring_chains_one_hop_per_link() -> None:
    tc = load_topology("tc")
    wiring = Wiring(tc)
    entry = wiring.entry(tc.path("apps", "read"), "gw-cloud", 9999)
    hops = [(r["src"], r["dst"], r["link"]) for r in wiring.routes]
    # Built from the far end back: cloud first, apps last; each hop relays to the next one's route.
    assert hops == [("fog", "cloud", "fog-cloud"), ("edge", "fog", "edge-fog"), ("apps", "edge", "apps-edge")]
    assert wiring.routes[0]["target_port"] == 9999
    assert wiring.routes[1]["target_route"] == wiring.routes[0]["name"]
    assert wiring.routes[2]["target_route"] == wiring.routes[1]["name"]
    assert entry == Endpoint(route=wiring.routes[2]["name"])
    assert entry.resolve({wiring.routes[2]["name"]: 4242}) == 4242
    # Same path and service: same entry, no new routes.
    assert wiring.entry(tc.path("apps", "write"), "gw-cloud", 9999) == entry
    assert len(wiring.routes) == 3
    # A service in the same zone needs no hop.
    assert wiring.entry(tc.path("cloud", "hot-store"), "redis", 6379).resolve({}) == 6379
    cfg = wiring.proxy_config()
    assert cfg["links"]["fog-cloud"] == {"latency_ms": 20.0, "jitter_ms": 3.0,
                                         "bandwidth_mbps": {"fog->cloud": 1000.0, "cloud->fog": 1000.0}}


def test_asymmetric_bandwidth_reaches_the_proxy() -> None:
    cc = load_topology("cc")
    cfg = Wiring(cc).proxy_config()
    assert cfg["links"]["meters-cloud"]["bandwidth_mbps"] == {"meters->cloud": 5.75, "cloud->meters": 14.4}


def test_rows_from_locust_json() -> None:
    entries = [{
        "name": "read @8K", "method": "GET", "num_requests": 10, "num_failures": 1, "total_response_time": 500.0,
        "response_times": {"40": 5, "50": 4, "200": 1}, "start_time": 100.0, "last_request_timestamp": 102.0,
    }]
    traffic = {"apps-edge": {"apps->edge": 600, "edge->apps": 1400}}
    (row,) = rows_from_locust(entries, "fcec", "ami", bytes_by_link=traffic)
    assert (row.case, row.step, row.requests, row.failures) == ("read", "8K", 10, 1)
    assert (row.p50_ms, row.p95_ms, row.p99_ms, row.mean_ms, row.rps) == (40.0, 200.0, 200.0, 50.0, 5.0)
    assert row.bytes_per_request == 200.0
    assert percentile({}, 0.5) is None


@pytest.mark.slow
def test_short_run_report_follows_the_topology(tmp_path: Path) -> None:
    """Two real runs (gateway + Redis + proxy) of the synthetic probe; only the link latency differs."""
    base = yaml.safe_load((TOPOLOGY_DIR / "fcec.yml").read_text())
    slow = yaml.safe_load((TOPOLOGY_DIR / "fcec.yml").read_text())
    slow["name"] = "fcec-slow"
    for link in slow["links"]:
        if link["between"] == ["apps", "edge"]:
            link["latency_ms"] = 60
            link["jitter_ms"] = 0
    parse_topology(slow)  # still a valid topology
    files = []
    for doc in (base, slow):
        path = tmp_path / f"{doc['name']}.yml"
        path.write_text(yaml.safe_dump(doc))
        files.append(path)
    out = tmp_path / "report"
    argv = [sys.executable, "-m", "loadtest.compare", "--quick", "--scenario", "probe", "--out", str(out)]
    for f in files:
        argv += ["--topology", str(f)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {name: arch["scenarios"]["probe"]["rows"][0] for name, arch in results["architectures"].items()}
    fast, slowed = rows["fcec"], rows["fcec-slow"]
    assert fast["failures"] == 0
    assert slowed["failures"] == 0
    # 50 ms more each way on apps-edge: the median grows by about 100 ms (and never by less than 80).
    assert slowed["p50_ms"] - fast["p50_ms"] >= 80, (fast, slowed)
    assert sum(v for d in fast["bytes_by_link"]["apps-edge"].values() for v in [d]) > 0
    report = (out / "report.md").read_text()
    assert "| fcec-slow | probe |" in report
    assert (out / "latency-probe.png").stat().st_size > 1000


def test_quick_config_is_bounded() -> None:
    cfg = RunConfig.quick_run()
    assert cfg.max_run_s <= 600
    assert cfg.requests_per_case <= 100
    assert cfg.step_s * len(cfg.ami_steps) <= 30
