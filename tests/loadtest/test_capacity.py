"""Capacity planner: hand-computed cases and seed 003's own tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.capacity import (
    MBIT_BINARY,
    UK_DSO_REGIONS,
    CapacityError,
    Traffic,
    main,
    mbytes_per_min,
    meters_per_link,
    meters_per_node,
    plan_region,
)

ROOT = Path(__file__).resolve().parents[2]


def test_meters_per_link_hand_computed() -> None:
    # 800 B/min = 106.67 bit/s; 1 Mbit/s (10^6) / 106.67 = 9375 meters.
    assert meters_per_link(1, Traffic(800, 1)) == 9375
    # 100 B every 10 s = 80 bit/s; 8 Mbit/s / 80 = 100,000.
    assert meters_per_link(8, Traffic(100, 6)) == 100_000


def test_reproduces_seed_003_table_i_and_ii() -> None:
    # Table I: one 800-byte event per second, decimal Mbit: 10 Mbps -> 1.5 k, 100 -> 15.6 k, 1 Gbps -> 156 k.
    per_second = Traffic(800, 60)
    assert meters_per_link(10, per_second) == 1562
    assert meters_per_link(100, per_second) == 15625
    assert meters_per_link(1000, per_second) == 156250
    # Table II: one event per minute, 1 Mbit = 2^20 bit.
    per_minute = Traffic(800, 1)
    assert meters_per_link(100, per_minute, mbit=MBIT_BINARY) == 983040
    assert meters_per_link(662, per_minute, mbit=MBIT_BINARY) == 6507724  # seed rounds to 6507725
    assert meters_per_link(8, per_minute, mbit=MBIT_BINARY) == 78643
    assert meters_per_link(1000, per_minute, mbit=MBIT_BINARY) == 9830400


def test_reproduces_seed_003_table_iii_traffic() -> None:
    t = Traffic(800, 1)
    assert round(mbytes_per_min(UK_DSO_REGIONS["East England"], t), 2) == 1590.03
    assert round(mbytes_per_min(UK_DSO_REGIONS["London"], t), 2) == 972.23
    assert round(mbytes_per_min(sum(UK_DSO_REGIONS.values()), t), 2) == 24385.79


def test_meters_per_node_and_region_plan_hand_computed() -> None:
    t = Traffic(800, 1)
    # 2,000 req/s x 60 s = 120,000 requests/min = 120,000 meters at one message per minute.
    assert meters_per_node(2000, t) == 120_000
    assert meters_per_node(2000, Traffic(800, 1, requests_per_message=2)) == 60_000
    # London: 1,274,319 meters / 120,000 -> 11 nodes; 100 Mbit/s uplink carries 937,500 -> 2 uplinks.
    plan = plan_region("London", 1_274_319, t, node_rps=2000, uplink_mbps=100)
    assert (plan.nodes_for_throughput, plan.nodes_for_uplink, plan.fog_nodes) == (11, 2, 11)
    # A slow uplink becomes the bound: 1 Mbit/s carries 9,375 meters -> 136 nodes.
    assert plan_region("X", 1_274_319, t, node_rps=2000, uplink_mbps=1).fog_nodes == 136


def test_rejects_bad_inputs() -> None:
    with pytest.raises(CapacityError, match="message_bytes 0"):
        Traffic(0, 1)
    with pytest.raises(CapacityError, match=r"link bandwidth -1\.0"):
        meters_per_link(-1.0, Traffic())
    with pytest.raises(CapacityError, match="node throughput 0"):
        meters_per_node(0, Traffic())


def test_cli_prints_tables(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--message-bytes", "800", "--rate-per-min", "1", "--link-mbps", "fibre=100", "--link-mbps", "8",
               "--node-throughput", "2000", "--region", "London=1274319", "--fog-uplink-mbps", "100"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| fibre | 100 | 937,500 |" in out
    assert "| link-2 | 8 | 75,000 |" in out
    assert "| London | 1,274,319 | 972.23 | 11 | 2 | 11 |" in out


def test_cli_reads_throughput_from_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"node_throughput_rps": 500.0}))
    assert main(["--from-report", str(results), "--region", "A=30000"]) == 0
    assert "| A | 30,000 | 22.89 | 1 |" in capsys.readouterr().out
    results.write_text("{}")
    assert main(["--from-report", str(results)]) == 2


def test_cli_as_module_with_seed_defaults() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest.capacity", "--node-throughput", "1500"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "Southern England" in done.stdout
    assert "dsl-8" in done.stdout


def test_cli_without_arguments_prints_usage_with_an_example() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest.capacity"], capture_output=True, text=True, timeout=30,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m loadtest.capacity")
    assert "python -m loadtest.capacity --node-throughput 4000" in done.stdout
    assert "error" not in done.stdout + done.stderr
