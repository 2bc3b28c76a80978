"""Interval energy, daily/monthly energy and demand, time-of-use billing determinants and bills.

Interval energy is the difference of the cumulative registers at the two ends of each
fixed interval (``MDMS_INTERVAL_S``, aligned to the epoch), the registers interpolated
linearly between the nearest rows (reads and estimates). An interval whose ends cannot be
interpolated (no row on one side, or rows further apart than the estimation gap limit) is
``missing``. Demand is average kW over an interval. An interval belongs to the TOU period
its start falls in (local time of the tariff); window edges must lie on interval boundaries.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from metertwin.core.errors import InvalidInput, NotFound
from metertwin.mdms.intervals import QUALITY_RANK, Row, iso_ms

Finite = Annotated[float, Field(allow_inf_nan=False)]
HHMM = Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$|^24:00$")]


class Window(BaseModel):
    """A weekly time window: ``days`` 0=Monday..6=Sunday, ``start``-``end`` local ``HH:MM`` (end may wrap)."""

    model_config = ConfigDict(extra="forbid")

    days: list[Annotated[int, Field(ge=0, le=6)]] = Field(default_factory=lambda: list(range(7)), min_length=1)
    months: list[Annotated[int, Field(ge=1, le=12)]] | None = None
    start: HHMM
    end: HHMM

    def minutes(self) -> tuple[int, int]:
        def m(x: str) -> int:
            h, mm = x.split(":")
            return int(h) * 60 + int(mm)

        return m(self.start), m(self.end)

    def contains(self, local: datetime) -> bool:
        if self.months is not None and local.month not in self.months:
            return False
        lo, hi = self.minutes()
        minute = local.hour * 60 + local.minute
        if lo < hi:
            return local.weekday() in self.days and lo <= minute < hi
        # Wrapping window (e.g. 22:00-06:00): the early part belongs to the previous day's window.
        if minute >= lo:
            return local.weekday() in self.days
        return minute < hi and (local.weekday() - 1) % 7 in self.days


class TouPeriod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")
    price_per_kwh: Finite = Field(ge=0, le=100)
    windows: list[Window] = Field(default_factory=list)


class Tariff(BaseModel):
    """A TOU tariff. Periods are tried in order; time in no window is ``default_period``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    timezone: str = "UTC"
    currency: str = Field(default="EUR", min_length=3, max_length=3)
    periods: list[TouPeriod] = Field(min_length=1, max_length=24)
    default_period: str
    demand_charge_per_kw: Finite = Field(default=0.0, ge=0, le=1000)
    #: Periods in which peak demand is billed (``None``: all time).
    demand_periods: list[str] | None = None
    fixed_charge: Finite = Field(default=0.0, ge=0, le=100_000)
    export_credit_per_kwh: Finite = Field(default=0.0, ge=0, le=100)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {v!r} is not an IANA time zone") from None
        return v

    @model_validator(mode="after")
    def _names(self) -> Tariff:
        names = [p.name for p in self.periods]
        if len(set(names)) != len(names):
            raise ValueError(f"period names {names} are not unique")
        if self.default_period not in names:
            raise ValueError(f"default_period {self.default_period!r} is not one of {names}")
        for d in self.demand_periods or []:
            if d not in names:
                raise ValueError(f"demand period {d!r} is not one of {names}")
        return self

    def period_at(self, local: datetime) -> TouPeriod:
        for p in self.periods:
            if any(w.contains(local) for w in p.windows):
                return p
        return next(p for p in self.periods if p.name == self.default_period)

    def check_alignment(self, interval_s: int) -> None:
        step = interval_s // 60
        for p in self.periods:
            for w in p.windows:
                for edge, value in zip(("start", "end"), w.minutes(), strict=True):
                    if value % step:
                        raise InvalidInput(
                            f"tariff {self.name!r} period {p.name!r} window {edge} {getattr(w, edge)!r} is not on "
                            f"a {step}-minute interval boundary",
                            field="tariff",
                        )


BUILTIN_TARIFFS: dict[str, Tariff] = {
    t.name: t for t in (
        Tariff(name="flat", periods=[TouPeriod(name="all", price_per_kwh=0.30)], default_period="all",
               fixed_charge=8.0, export_credit_per_kwh=0.08),
        Tariff(
            name="tou-3", periods=[
                TouPeriod(name="peak", price_per_kwh=0.40, windows=[Window(days=[0, 1, 2, 3, 4], start="17:00",
                                                                           end="21:00")]),
                TouPeriod(name="shoulder", price_per_kwh=0.25, windows=[Window(days=[0, 1, 2, 3, 4], start="07:00",
                                                                               end="17:00")]),
                TouPeriod(name="offpeak", price_per_kwh=0.15),
            ],
            default_period="offpeak", demand_charge_per_kw=4.0, demand_periods=["peak"], fixed_charge=12.0,
            export_credit_per_kwh=0.08,
        ),
    )
}


def builtin_tariff(name: str) -> Tariff:
    try:
        return BUILTIN_TARIFFS[name]
    except KeyError:
        raise NotFound(f"tariff {name!r} is not known; known: {sorted(BUILTIN_TARIFFS)}") from None


# --- intervals ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class IntervalEnergy:
    start_ms: int
    import_kwh: float
    export_kwh: float
    quality: str  # valid | estimated | edited | suspect | missing

    @property
    def missing(self) -> bool:
        return self.quality == "missing"


def interval_energies(
    rows: Sequence[Row], from_ms: int, to_ms: int, interval_ms: int, max_gap_ms: int
) -> list[IntervalEnergy]:
    """Energy of every whole interval inside ``[from_ms, to_ms)``, from register rows sorted by time."""
    ts = [r.ts_ms for r in rows]
    out: list[IntervalEnergy] = []
    b = -(-from_ms // interval_ms) * interval_ms

    def at(t: int) -> tuple[float, float, int, int] | None:
        i = bisect.bisect_left(ts, t)
        if i < len(ts) and ts[i] == t:
            return rows[i].import_kwh, rows[i].export_kwh, i, i
        if 0 < i < len(ts) and ts[i] - ts[i - 1] <= max_gap_ms:
            a, c = rows[i - 1], rows[i]
            f = (t - a.ts_ms) / (c.ts_ms - a.ts_ms)
            return (a.import_kwh + (c.import_kwh - a.import_kwh) * f,
                    a.export_kwh + (c.export_kwh - a.export_kwh) * f, i - 1, i)
        return None

    while b + interval_ms <= to_ms:
        s, e = at(b), at(b + interval_ms)
        if s is None or e is None:
            out.append(IntervalEnergy(b, 0.0, 0.0, "missing"))
        else:
            used = rows[s[2]: e[3] + 1]
            worst = min((r.quality for r in used), key=lambda q: QUALITY_RANK[q], default="valid")
            out.append(IntervalEnergy(b, max(e[0] - s[0], 0.0), max(e[1] - s[1], 0.0), worst))
        b += interval_ms
    return out


def _r(x: float, nd: int = 6) -> float:
    return round(x, nd) if math.isfinite(x) else x


def _quality_counts(ivs: Sequence[IntervalEnergy]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for iv in ivs:
        counts[iv.quality] = counts.get(iv.quality, 0) + 1
    return counts


def energy_by_period(
    ivs: Sequence[IntervalEnergy], interval_s: int, tz: str, period: Literal["day", "month"]
) -> list[dict[str, Any]]:
    """Energy and maximum demand per local day or month."""
    zone = ZoneInfo(tz)
    groups: dict[str, list[IntervalEnergy]] = {}
    for iv in ivs:
        local = datetime.fromtimestamp(iv.start_ms / 1000, zone)
        label = local.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")
        groups.setdefault(label, []).append(iv)
    out = []
    for label, group in groups.items():
        present = [iv for iv in group if not iv.missing]
        peak = max(present, key=lambda iv: iv.import_kwh, default=None)
        imp = sum(iv.import_kwh for iv in present)
        exp = sum(iv.export_kwh for iv in present)
        out.append({
            "period": label, "import_kwh": _r(imp), "export_kwh": _r(exp), "net_kwh": _r(imp - exp),
            "max_demand_kw": _r(peak.import_kwh * 3600 / interval_s) if peak else None,
            "max_demand_at": iso_ms(peak.start_ms) if peak else None,
            "intervals": len(group), "missing_intervals": len(group) - len(present),
            "quality": _quality_counts(group),
        })
    return out


def determinants(ivs: Sequence[IntervalEnergy], tariff: Tariff, interval_s: int) -> dict[str, Any]:
    """Energy per TOU period, peak demand (overall, per period, and the billed one)."""
    tariff.check_alignment(interval_s)
    zone = ZoneInfo(tariff.timezone)
    per: dict[str, dict[str, Any]] = {
        p.name: {"import_kwh": 0.0, "export_kwh": 0.0, "intervals": 0, "max_demand_kw": 0.0, "max_demand_at": None}
        for p in tariff.periods
    }
    billed_peak, billed_at = 0.0, None
    for iv in ivs:
        if iv.missing:
            continue
        p = tariff.period_at(datetime.fromtimestamp(iv.start_ms / 1000, zone)).name
        e = per[p]
        e["import_kwh"] += iv.import_kwh
        e["export_kwh"] += iv.export_kwh
        e["intervals"] += 1
        kw = iv.import_kwh * 3600 / interval_s
        if kw > e["max_demand_kw"]:
            e["max_demand_kw"], e["max_demand_at"] = kw, iso_ms(iv.start_ms)
        if (tariff.demand_periods is None or p in tariff.demand_periods) and kw > billed_peak:
            billed_peak, billed_at = kw, iso_ms(iv.start_ms)
    for e in per.values():
        e["import_kwh"], e["export_kwh"], e["max_demand_kw"] = (
            _r(e["import_kwh"]), _r(e["export_kwh"]), _r(e["max_demand_kw"]))
    peak = max(per.values(), key=lambda e: e["max_demand_kw"])
    return {
        "tariff": tariff.name, "timezone": tariff.timezone, "interval_s": interval_s, "periods": per,
        "import_kwh": _r(sum(e["import_kwh"] for e in per.values())),
        "export_kwh": _r(sum(e["export_kwh"] for e in per.values())),
        "peak_demand_kw": peak["max_demand_kw"], "peak_demand_at": peak["max_demand_at"],
        "billed_demand_kw": _r(billed_peak), "billed_demand_at": billed_at,
        "intervals": len(ivs), "missing_intervals": sum(1 for iv in ivs if iv.missing),
        "quality": _quality_counts(ivs),
    }


def _money(x: float) -> Decimal:
    return Decimal(repr(x)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def compute_bill(det: dict[str, Any], tariff: Tariff) -> dict[str, Any]:
    """A bill from determinants: energy per period, billed demand, fixed charge, export credit."""
    lines: list[dict[str, Any]] = []
    for p in tariff.periods:
        kwh = det["periods"][p.name]["import_kwh"]
        lines.append({"item": f"energy {p.name}", "quantity": kwh, "unit": "kWh", "rate": p.price_per_kwh,
                      "amount": _money(kwh * p.price_per_kwh)})
    if tariff.demand_charge_per_kw:
        kw = det["billed_demand_kw"]
        lines.append({"item": "demand", "quantity": kw, "unit": "kW", "rate": tariff.demand_charge_per_kw,
                      "amount": _money(kw * tariff.demand_charge_per_kw)})
    if tariff.fixed_charge:
        lines.append({"item": "fixed", "quantity": 1, "unit": "bill", "rate": tariff.fixed_charge,
                      "amount": _money(tariff.fixed_charge)})
    if tariff.export_credit_per_kwh and det["export_kwh"]:
        kwh = det["export_kwh"]
        lines.append({"item": "export credit", "quantity": kwh, "unit": "kWh", "rate": tariff.export_credit_per_kwh,
                      "amount": -_money(kwh * tariff.export_credit_per_kwh)})
    total = sum((line["amount"] for line in lines), Decimal("0.00"))
    for line in lines:
        line["amount"] = float(line["amount"])
    return {"currency": tariff.currency, "lines": lines, "total": float(total)}
