"""``python -m loadtest.mdms_bench`` exits 1 only when readings were lost or rejected, and says so; a missed
speed target is printed, not a silent exit 1 (issue 12 item 8)."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.mdms_bench import verdict


def _figures(**ingest: Any) -> dict[str, Any]:
    return {"ingest": {"lost": 0, "dead_letters": 0, "published": 100, "ratio_to_raw": 0.46, **ingest},
            "archive": {"rows": 10, "expected_rows": 10, "ratio_json_to_parquet": 12.0}}


def test_a_missed_speed_target_is_named_and_not_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    assert verdict(_figures()) == 0
    assert "target not met: ingest 0.46 x raw is below the 0.5 x target" in capsys.readouterr().err


def test_lost_readings_fail_with_the_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert verdict(_figures(lost=3, ratio_to_raw=0.9)) == 1
    assert "mdms_bench FAILED: 3 of 100 readings lost" in capsys.readouterr().err
