"""loadtest.fleet_bench runs end to end at a small size and writes the issue's JSON keys."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import fleet_bench


def test_fleet_bench_small(tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    result = fleet_bench.main(["--meters", "300", "--feeders", "5", "--transformers", "20", "--runs", "5",
                               "--job-twins", "300", "--job-rate", "200", "--agg-meters", "40", "--agg-readings", "2",
                               "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == result
    assert {"bytes_per_twin", "search_p99_ms", "agg_us_per_reading", "job_per_s"} <= set(saved)
    assert saved["feeder_page"]["mean_count"] == 60  # 300 meters over 5 feeders
    assert 0 < saved["feeder_offline_stale"]["mean_count"] < 60
    # the live indexes answer as reading every twin does, and their ingest cost is measured
    assert saved["feeder_offline_stale_per_twin"]["mean_count"] == saved["feeder_offline_stale"]["mean_count"]
    assert saved["live_index_ingest"]["ingest_index_us_per_reading"] > 0
    assert saved["job_counts"]["succeeded"] == saved["job_counts"]["total"] == 300  # every twin accounted for
    assert saved["job_per_s"] > 0
    assert saved["agg_us_per_reading"] is not None
    assert saved["aggregation"]["agg_readings_per_round"] == 80
