"""Batch uploads and estimation (issue 12 item 3): the count tells what was estimated, and no
estimate invents demand above MDMS_MAX_DEMAND_KW (real Redis, the head-end route)."""

from __future__ import annotations

import pytest

from tests.mdms.mdms_fixtures import INTERVAL_S, day_start, mdms_env, publish, query_rows, reading, register, upload

__all__ = ["mdms_env"]
pytestmark = pytest.mark.usefixtures("mdms_env")

MAX_DEMAND_W = 100_000.0  # MDMS_MAX_DEMAND_KW's default, 100 kW


def _estimated(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [r for r in rows if r["quality"] == "estimated"]


def test_back_load_before_live_registers_reports_what_it_estimated(meter_id: str) -> None:
    """A day back-loaded in order before a live read: 'estimated' is the rows left estimated,
    not the sum of every estimate written and replaced on the way (it said 4545 for 90 rows)."""
    register(meter_id)
    t0 = day_start(2)
    live_ts = t0 + 96 * INTERVAL_S
    publish(meter_id, reading(1000, live_ts, 100.0 + 96 * 0.25))
    rows = [reading(i, t0 + i * INTERVAL_S, 100.0 + i * 0.25) for i in range(90)]  # boundaries 90..95 stay estimated
    body = upload(rows, meter_id)
    assert body["accepted"] == 90
    stored = query_rows(meter_id, t0, live_ts)
    assert len(_estimated(stored)) == 6
    assert body["estimated"] == 6


def test_back_load_on_another_register_baseline_is_flagged_not_smoothed(meter_id: str) -> None:
    """Live registers at 17,000 kWh, a back-load that ends at ~19 kWh: the jump is a register
    discontinuity. No estimated row may carry the 9,700 kW it implies; the edge of the jump is suspect."""
    register(meter_id)
    t0 = day_start(2)
    live_ts = t0 + 96 * INTERVAL_S
    publish(meter_id, reading(1000, live_ts, 17_000.0))
    body = upload([reading(i, t0 + i * INTERVAL_S, 10.0 + i * 0.1) for i in range(90)], meter_id)
    assert body["accepted"] == 90
    assert body["estimated"] == 0
    stored = query_rows(meter_id, t0, live_ts)
    assert _estimated(stored) == []
    assert max(abs(float(r["power_w"])) for r in stored) <= MAX_DEMAND_W  # type: ignore[arg-type]
    last_back_loaded = [r for r in stored if r["seq"] == 89]
    assert [r["quality"] for r in last_back_loaded] == ["suspect"]


def test_gap_too_steep_to_be_real_is_not_estimated(meter_id: str) -> None:
    """0 -> 5,000 kWh over 10 hours is 500 kW: the later read is suspect and the gap stays missing."""
    register(meter_id)
    t0 = day_start(1)
    publish(meter_id, reading(1, t0, 0.0))
    status, body = publish(meter_id, reading(2, t0 + 40 * INTERVAL_S, 5000.0))
    assert (status, body["quality"], body.get("estimated")) == (200, "suspect", None)
    assert _estimated(query_rows(meter_id, t0, t0 + 40 * INTERVAL_S)) == []


def test_ninety_seven_in_order_readings_estimate_nothing(meter_id: str) -> None:
    register(meter_id)
    t0 = day_start(2)
    body = upload([reading(i, t0 + i * INTERVAL_S, 100.0 + i * 0.25) for i in range(97)], meter_id)
    assert (body["accepted"], body["estimated"]) == (97, 0)
