"""fog-grid's cron (stack.yml) fires every few seconds, all the time: the aggregates follow the readings within
seconds (issue 13: "as readings arrive"). Seconds are the LAST of six fields for metertwin's cron connector, so
``*/2 * * * * *`` would mean every second of every even minute, and nothing for the odd ones."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from croniter import croniter

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("function", "max_gap_s"), [("fog-grid", 2), ("edge-jobs", 1)])
def test_the_tick_never_pauses_longer_than_a_few_seconds(function: str, max_gap_s: int) -> None:
    schedule = yaml.safe_load((ROOT / "stack.yml").read_text())["functions"][function]["annotations"]["schedule"]
    it = croniter(schedule, datetime(2026, 1, 1, 0, 0, 59, tzinfo=UTC))
    fires = [it.get_next(datetime) for _ in range(200)]  # over three minutes, odd and even ones
    gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(fires)}
    assert max(gaps) <= max_gap_s, f"{function} schedule {schedule!r} pauses {max(gaps):.0f} s"
