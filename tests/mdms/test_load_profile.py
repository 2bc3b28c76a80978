"""``GET /meters/{id}/load-profile``: energy and demand per 15m/30m/1h interval with quality, hot and cold merged."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest

from metertwin.mdms import tiering
from tests.invoke import call
from tests.mdms.mdms_fixtures import (
    INTERVAL_S,
    day_start,
    mdms_env,
    query_handler,
    query_rows,
    reading,
    register,
    token,
    upload,
)

__all__ = ["mdms_env"]
pytestmark = pytest.mark.usefixtures("mdms_env")

PEAK_K = 72  # the 18:00 interval of the first day: 2 kWh in 15 min = 8 kW average, 9.5 kW instantaneous


def _history(meter_id: str) -> float:
    """Day 3 (archived to cold) and the first half of day 2 (stays hot), one read every 15 min, with a
    suspect read (k=20), a two-read gap that VEE estimates (k=50, 51) and a peak interval. Returns day 3's start."""
    register(meter_id)
    d0 = day_start(3)
    imp, rows = 100.0, []
    for k in range(145):
        if k not in (50, 51):
            rows.append(reading(k, d0 + k * INTERVAL_S, round(imp, 6), power=9500.0 if k == PEAK_K else 1000.0,
                                volt=300.0 if k == 20 else 231.0))
        imp += 2.0 if k == PEAK_K else 0.25
    body = upload(rows, meter_id)
    assert body["accepted"] == 143, body
    tiering.archive()
    tiers = {(r["ts_ms"] < (d0 + 86_400) * 1000, r["tier"]) for r in query_rows(meter_id, d0, d0 + 145 * INTERVAL_S)}
    assert tiers == {(True, "cold"), (False, "hot")}, "the range must span both tiers"
    return d0


def _profile(meter_id: str, q: dict[str, str], tok: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return call(query_handler(), "GET", f"/meters/{meter_id}/load-profile", token=tok or token("billing"),
                query=q, headers=headers)


def test_fifteen_minutes_across_cold_and_hot_with_quality_and_missing(meter_id: str) -> None:
    d0 = _history(meter_id)
    # One hour before the first read and two after the last one: 4 + 8 missing intervals.
    status, body = _profile(meter_id, {"from": str(d0 - 3600), "to": str(d0 + 152 * INTERVAL_S)})
    assert status == 200, body
    ivs = body["intervals"]
    assert (body["interval"], body["interval_s"], body["count"], len(ivs)) == ("15m", 900, 156, 156)
    assert [iv["quality"] for iv in ivs[:4]] == ["missing"] * 4
    assert [iv["quality"] for iv in ivs[-8:]] == ["missing"] * 8
    assert all(iv["import_kwh"] is None and iv["max_kw"] is None for iv in ivs[:4] + ivs[-8:])
    by_start = {iv["start"]: iv for iv in ivs}
    peak = ivs[4 + PEAK_K]
    assert peak["start"].endswith("T18:00:00.000Z")
    assert (peak["import_kwh"], peak["avg_kw"], peak["max_kw"], peak["quality"]) == (2.0, 8.0, 9.5, "valid")
    assert [ivs[4 + k]["quality"] for k in (19, 20)] == ["suspect", "suspect"]
    assert [ivs[4 + k]["quality"] for k in (49, 50, 51)] == ["estimated"] * 3
    assert ivs[4 + 100]["quality"] == "valid"  # a hot interval of day 2
    assert ivs[4 + 100]["import_kwh"] == 0.25
    assert ivs[4 + 100]["avg_kw"] == 1.0
    assert ivs[4 + 100]["max_kw"] == 1.0
    assert body["totals"]["quality"] == {"valid": 139, "estimated": 3, "edited": 0, "suspect": 2, "missing": 12}
    assert body["totals"]["import_kwh"] == pytest.approx(143 * 0.25 + 2.0)
    assert body["totals"]["max_kw"] == 9.5
    assert len(by_start) == 156


def test_longer_intervals_add_up_and_take_the_worst_quality(meter_id: str) -> None:
    d0 = _history(meter_id)
    span = {"from": str(d0), "to": str(d0 + 144 * INTERVAL_S)}
    fifteen = _profile(meter_id, span)[1]
    for name, n in (("30m", 2), ("1h", 4)):
        status, body = _profile(meter_id, {**span, "interval": name})
        assert status == 200, body
        assert body["count"] == 144 // n
        assert body["totals"]["import_kwh"] == pytest.approx(fifteen["totals"]["import_kwh"])
        first = body["intervals"][0]
        assert first["import_kwh"] == pytest.approx(0.25 * n)
    hourly = _profile(meter_id, {**span, "interval": "1h"})[1]["intervals"]
    assert hourly[18]["quality"] == "valid"
    assert hourly[18]["import_kwh"] == pytest.approx(2.75)
    assert hourly[18]["avg_kw"] == pytest.approx(2.75)
    assert hourly[18]["max_kw"] == 9.5
    assert hourly[5]["quality"] == "suspect"  # 05:00 holds the suspect read's intervals
    assert hourly[12]["quality"] == "estimated"


def test_csv_by_format_and_by_accept_header(meter_id: str) -> None:
    d0 = _history(meter_id)
    span = {"from": str(d0), "to": str(d0 + 8 * INTERVAL_S)}
    by_format = _profile(meter_id, {**span, "format": "csv"})
    by_accept = _profile(meter_id, span, headers={"Accept": "text/csv"})
    assert by_format == by_accept
    status, text = by_format
    assert status == 200
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["meter_id", "start", "end", "import_kwh", "export_kwh", "avg_kw", "max_kw", "quality"]
    assert len(rows) == 8
    assert (rows[0]["meter_id"], float(rows[0]["import_kwh"]), rows[0]["quality"]) == (meter_id, 0.25, "valid")


@pytest.mark.parametrize(("query", "needle"), [
    ({"from": "2000", "to": "1000"}, "must be after from"),
    ({"interval": "5m"}, "interval='5m' is not one of 15m, 30m, 1h"),
    ({"from": "0", "to": str(300 * 86_400)}, "more than the limit of 20000"),
    ({"from": "1000", "to": "1100"}, "holds no whole 15-minute interval"),
    ({"format": "xml"}, "format='xml'"),
    ({"from": "yesterday"}, "from='yesterday'"),
])
def test_bad_input_names_the_value(meter_id: str, query: dict[str, str], needle: str) -> None:
    register(meter_id)
    q = {"from": "1000", "to": str(1000 + 86_400), **query}
    status, body = _profile(meter_id, q)
    assert status == 400, body
    assert needle in body["message"]


def test_access_and_unknown_meters(meter_id: str) -> None:
    d0 = _history(meter_id)
    span = {"from": str(d0), "to": str(d0 + 4 * INTERVAL_S)}
    assert _profile(meter_id, span, token("consumer", meter=meter_id))[0] == 200
    assert _profile(meter_id, span, token("consumer", meter="someone-else"))[0] == 403
    status, body = _profile("never-seen", span)
    assert status == 404
    assert "never-seen" in body["message"]
