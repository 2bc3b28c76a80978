"""`make demo` is the main job: run its scenario once, as a user would, and read its summary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_demo_runs_every_capability_and_stops_what_it_started() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "embedded.demo", "--once", "--meters", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=360,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    for line in ("read (cached)", "read (live, meter)", "504 with stale value", "412 version_mismatch",
                 "forward (meter -> EMS)", "403=1", "401=1", "202 + callback 202", "p2p (negotiate)",
                 "mdms (TOU bill)", "dr (OpenADR event)", "answered by v2", "missing 0",
                 "stopped every process the demo started"):
        assert line in out, f"{line!r} missing from the demo summary:\n{out[-3000:]}"
    assert "optOut=0" in out
    assert "ended acknowledged after reconnect" in out
