"""``python -m loadtest.million`` runs end to end, tiny (200 meters behind 2 concentrators, a few seconds):
its JSON has the issue's keys, and no reading is lost or applied twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_million_bench_tiny_run_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "million.json"
    done = subprocess.run([sys.executable, "-m", "loadtest.million", "--meters", "200", "--per-concentrator", "100",
                           "--minutes", "0.05", "--interval", "1", "--floor-seconds", "0", "--read-rate", "50",
                           "--drain-quiet-s", "20", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"meters", "readings_per_s", "lost", "duplicated", "bytes_per_twin", "read_p99_ms",
            "cpu_us_per_reading"} <= set(result)
    assert result["meters"] == 200
    assert result["sent"] > 0
    assert (result["lost"], result["duplicated"], result["dead_lettered"]) == (0, 0, 0)
    assert result["applied_edge"] == result["accepted_fog"] == result["sent"]
    assert {"broker", "edge_gateway", "fog_gateway", "simulator"} <= set(result["cpu_us_per_reading"])
