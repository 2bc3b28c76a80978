"""``python -m loadtest.stream_bench`` runs end to end (a few clients, a second) and reports its keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_stream_bench_reports_fan_out_and_latency(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "loadtest.stream_bench", "--clients", "5", "--rate", "20",
                           "--meters", "3", "--duration", "1", "--warmup", "0.5", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"clients", "events_per_s", "p50_ms", "p99_ms"} <= set(result)
    assert result["clients"] == result["connected"] == 5
    assert result["clients_cut"] == 0
    # Every reading reached every client (the fleet view): 5 clients x 20 readings/s.
    assert result["expected_events_per_s"] > 0
    assert result["events_per_s"] >= 0.95 * result["expected_events_per_s"]  # a ts split across reads is not counted
