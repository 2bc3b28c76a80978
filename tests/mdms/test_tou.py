"""TOU determinants and bills against hand-computed cases (pure functions, no services)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from metertwin.core.errors import InvalidInput, NotFound
from metertwin.mdms.intervals import Row
from metertwin.mdms.tou import (
    Tariff,
    TouPeriod,
    Window,
    builtin_tariff,
    compute_bill,
    determinants,
    energy_by_period,
    interval_energies,
)

I_MS = 900_000
I_S = 900


def _ts(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, tzinfo=UTC).timestamp() * 1000)


def _rows_from_increments(start_ms: int, increments: list[float], export: list[float] | None = None) -> list[Row]:
    """Register rows at each boundary: row k is the register after k intervals."""
    rows, imp, exp = [], 100.0, 0.0
    rows.append(Row(start_ms, 0, imp, exp, 0.0, 230.0, "valid"))
    for k, inc in enumerate(increments, start=1):
        imp += inc
        exp += export[k - 1] if export else 0.0
        rows.append(Row(start_ms + k * I_MS, k, imp, exp, 0.0, 230.0, "valid"))
    return rows


def _monday_profile() -> list[float]:
    """2026-01-05 (a Monday): 0.25 kWh per interval, 0.5 in 17:00-21:00, 1.5 at 18:00."""
    incs = []
    for k in range(96):
        minute = k * 15
        inc = 0.5 if 17 * 60 <= minute < 21 * 60 else 0.25
        if minute == 18 * 60:
            inc = 1.5
        incs.append(inc)
    return incs


def test_tou3_determinants_and_bill_on_a_weekday() -> None:
    start = _ts(2026, 1, 5)
    rows = _rows_from_increments(start, _monday_profile())
    ivs = interval_energies(rows, start, start + 96 * I_MS, I_MS, 2 * 86_400_000)
    assert len(ivs) == 96
    tariff = builtin_tariff("tou-3")
    det = determinants(ivs, tariff, I_S)
    # Hand computed: offpeak 00-07 + 21-24 = 40 intervals x 0.25; shoulder 07-17 = 40 x 0.25;
    # peak 17-21 = 15 x 0.5 + 1.5.
    assert det["periods"]["offpeak"]["import_kwh"] == 10.0
    assert det["periods"]["shoulder"]["import_kwh"] == 10.0
    assert det["periods"]["peak"]["import_kwh"] == 9.0
    assert det["periods"]["peak"]["intervals"] == 16
    assert det["import_kwh"] == 29.0
    assert det["peak_demand_kw"] == 6.0  # 1.5 kWh in a quarter hour
    assert det["peak_demand_at"] == "2026-01-05T18:00:00.000Z"
    assert det["billed_demand_kw"] == 6.0
    assert det["missing_intervals"] == 0
    bill = compute_bill(det, tariff)
    amounts = {line["item"]: line["amount"] for line in bill["lines"]}
    assert amounts == {"energy peak": 3.60, "energy shoulder": 2.50, "energy offpeak": 1.50, "demand": 24.00,
                       "fixed": 12.00}
    assert bill["total"] == 43.60
    assert bill["currency"] == "EUR"


def test_weekend_is_all_offpeak_and_demand_is_billed_only_in_peak() -> None:
    start = _ts(2026, 1, 10)  # Saturday
    rows = _rows_from_increments(start, _monday_profile())
    det = determinants(interval_energies(rows, start, start + 96 * I_MS, I_MS, 86_400_000), builtin_tariff("tou-3"),
                       I_S)
    assert det["periods"]["offpeak"]["import_kwh"] == 29.0
    assert det["periods"]["peak"]["import_kwh"] == 0.0
    assert det["peak_demand_kw"] == 6.0
    assert det["billed_demand_kw"] == 0.0  # no peak-period intervals on a Saturday
    assert compute_bill(det, builtin_tariff("tou-3"))["total"] == pytest.approx(29.0 * 0.15 + 12.0)


def test_export_credit_and_flat_tariff() -> None:
    start = _ts(2026, 3, 2)
    rows = _rows_from_increments(start, [1.0] * 4, export=[0.5] * 4)
    det = determinants(interval_energies(rows, start, start + 4 * I_MS, I_MS, 86_400_000), builtin_tariff("flat"),
                       I_S)
    assert (det["import_kwh"], det["export_kwh"]) == (4.0, 2.0)
    bill = compute_bill(det, builtin_tariff("flat"))
    assert {line["item"]: line["amount"] for line in bill["lines"]} == {
        "energy all": 1.20, "fixed": 8.00, "export credit": -0.16}
    assert bill["total"] == 9.04


def test_interpolation_between_reads_off_the_boundaries_and_missing_ends() -> None:
    t0 = _ts(2026, 2, 1)
    rows = [
        Row(t0 + 5 * 60_000, 1, 10.0, 0.0, None, None, "valid"),
        Row(t0 + 20 * 60_000, 2, 11.5, 0.0, None, None, "valid"),
        Row(t0 + 35 * 60_000, 3, 13.0, 0.0, None, None, "estimated"),
    ]
    ivs = interval_energies(rows, t0, t0 + 45 * 60_000, I_MS, 86_400_000)
    # [00:00, 00:15): no read before 00:05 -> missing; [00:15, 00:30): 10.5 -> 12.0 using the estimate.
    assert [(iv.quality, round(iv.import_kwh, 9)) for iv in ivs] == [("missing", 0.0), ("estimated", 1.5),
                                                                     ("missing", 0.0)]
    # Rows further apart than the gap limit are not interpolated.
    far = [Row(t0, 1, 1.0, 0.0, None, None, "valid"), Row(t0 + 4 * I_MS, 2, 2.0, 0.0, None, None, "valid")]
    assert all(iv.missing for iv in interval_energies(far, t0, t0 + 4 * I_MS, I_MS, 2 * I_MS))


def test_quality_of_an_interval_is_the_worst_of_its_rows() -> None:
    t0 = _ts(2026, 2, 1)
    rows = [Row(t0, 1, 1.0, 0.0, None, None, "valid"), Row(t0 + 300_000, 2, 1.1, 0.0, None, None, "suspect"),
            Row(t0 + I_MS, 3, 1.2, 0.0, None, None, "edited"), Row(t0 + 2 * I_MS, 4, 1.3, 0.0, None, None, "valid")]
    assert [iv.quality for iv in interval_energies(rows, t0, t0 + 2 * I_MS, I_MS, 86_400_000)] == [
        "suspect", "edited"]


def test_daily_and_monthly_energy_with_time_zone() -> None:
    start = _ts(2026, 1, 31)
    rows = _rows_from_increments(start, [0.25] * (2 * 96))
    ivs = interval_energies(rows, start, start + 2 * 96 * I_MS, I_MS, 86_400_000)
    days = energy_by_period(ivs, I_S, "UTC", "day")
    assert [(d["period"], d["import_kwh"], d["max_demand_kw"]) for d in days] == [
        ("2026-01-31", 24.0, 1.0), ("2026-02-01", 24.0, 1.0)]
    months = energy_by_period(ivs, I_S, "UTC", "month")
    assert [(m["period"], m["import_kwh"]) for m in months] == [("2026-01", 24.0), ("2026-02", 24.0)]
    berlin = energy_by_period(ivs, I_S, "Europe/Berlin", "day")
    assert [(d["period"], d["import_kwh"]) for d in berlin] == [("2026-01-31", 23.0), ("2026-02-01", 24.0),
                                                                ("2026-02-02", 1.0)]


def test_wrapping_window_and_local_time() -> None:
    w = Window(days=[0], start="22:00", end="06:00")
    assert w.contains(datetime(2026, 1, 5, 23, 0))  # Monday night
    assert w.contains(datetime(2026, 1, 6, 5, 45))  # Tuesday early: Monday's window
    assert not w.contains(datetime(2026, 1, 6, 23, 0))
    assert not w.contains(datetime(2026, 1, 5, 5, 0))  # Monday early belongs to Sunday's window
    tariff = Tariff(name="berlin", timezone="Europe/Berlin", default_period="low", periods=[
        TouPeriod(name="high", price_per_kwh=0.5, windows=[Window(start="17:00", end="18:00")]),
        TouPeriod(name="low", price_per_kwh=0.1)])
    start = _ts(2026, 1, 5, 16)  # 17:00 in Berlin (CET)
    rows = _rows_from_increments(start, [1.0] * 8)
    det = determinants(interval_energies(rows, start, start + 8 * I_MS, I_MS, 86_400_000), tariff, I_S)
    assert (det["periods"]["high"]["import_kwh"], det["periods"]["low"]["import_kwh"]) == (4.0, 4.0)


def test_tariff_validation() -> None:
    with pytest.raises(ValidationError, match="default_period"):
        Tariff(name="x", periods=[TouPeriod(name="a", price_per_kwh=1)], default_period="b")
    with pytest.raises(ValidationError, match="IANA"):
        Tariff(name="x", timezone="Mars/Olympus", periods=[TouPeriod(name="a", price_per_kwh=1)], default_period="a")
    with pytest.raises(ValidationError, match="not unique"):
        Tariff(name="x", periods=[TouPeriod(name="a", price_per_kwh=1), TouPeriod(name="a", price_per_kwh=2)],
               default_period="a")
    with pytest.raises(ValidationError):
        Window(start="25:00", end="26:00")
    odd = Tariff(name="odd", default_period="a", periods=[
        TouPeriod(name="a", price_per_kwh=1), TouPeriod(name="b", price_per_kwh=2,
                                                        windows=[Window(start="17:10", end="18:00")])])
    with pytest.raises(InvalidInput, match="17:10"):
        determinants([], odd, I_S)
    with pytest.raises(NotFound, match="known"):
        builtin_tariff("nope")
