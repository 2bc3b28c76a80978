"""Query logic of the MDMS for billing and MDMS applications (the ``fog-mdms-query`` function).

Time parameters are epoch seconds or ISO 8601 (naive means UTC). Interval listings are
paginated with an opaque cursor that encodes the meter position and last timestamp, so a
long range is fetched page by page and each page reads only the cold objects it needs.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from metertwin.core.errors import InvalidInput, UnknownMeter
from metertwin.core.http import validate_meter_id
from metertwin.mdms import hot_store, interval_reader
from metertwin.mdms.intervals import Row, Tier, iso_ms
from metertwin.mdms.settings import get_mdms_settings
from metertwin.mdms.tou import IntervalEnergy, Tariff, compute_bill, determinants, energy_by_period, interval_energies

CSV_COLUMNS = ("meter_id", "ts", "ts_ms", "seq", "import_kwh", "export_kwh", "power_w", "voltage_v", "quality", "tier")


def parse_time(query: Mapping[str, str], name: str, *, required: bool = True) -> int | None:
    """A time query parameter (epoch seconds or ISO 8601) as epoch ms."""
    raw = query.get(name)
    if raw is None or raw == "":
        if required:
            raise InvalidInput(f"query parameter {name} is required (epoch seconds or ISO 8601)", field=name)
        return None
    return time_ms(raw, name)


def time_ms(raw: str | float, name: str) -> int:
    try:
        value = float(raw)
    except ValueError:
        try:
            dt = datetime.fromisoformat(str(raw).replace(" ", "+"))
        except ValueError:
            raise InvalidInput(f"{name}={raw!r} is neither epoch seconds nor ISO 8601", field=name) from None
        value = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    if not 0 <= value < 1e11:
        raise InvalidInput(f"{name}={raw!r} is outside the supported time range", field=name)
    return round(value * 1000)


def time_range(query: Mapping[str, str]) -> tuple[int, int]:
    lo, hi = parse_time(query, "from"), parse_time(query, "to")
    assert lo is not None
    assert hi is not None
    if hi <= lo:
        raise InvalidInput(f"to ({iso_ms(hi)}) must be after from ({iso_ms(lo)})", field="to")
    max_s = get_mdms_settings().query_max_range_s
    if (hi - lo) / 1000 > max_s:
        raise InvalidInput(f"range of {(hi - lo) / 86_400_000:.1f} days exceeds {max_s / 86400:.0f} days", field="to")
    return lo, hi


def limit_of(query: Mapping[str, str]) -> int:
    s = get_mdms_settings()
    raw = query.get("limit")
    if raw is None or raw == "":
        return s.query_default_limit
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"limit={raw!r} is not an integer", field="limit") from None
    if not 1 <= value <= s.query_max_limit:
        raise InvalidInput(f"limit={raw!r} is outside [1, {s.query_max_limit}]", field="limit")
    return value


def format_of(query: Mapping[str, str], accept: str | None = None) -> Literal["json", "csv"]:
    """``format=json|csv``; without it, ``accept`` (the Accept header, where a route honours it) may ask for CSV."""
    default = "csv" if accept and "text/csv" in accept.lower() else "json"
    fmt = (query.get("format") or default).lower()
    if fmt not in ("json", "csv"):
        raise InvalidInput(f"format={fmt!r} is not json or csv", field="format")
    return "csv" if fmt == "csv" else "json"


def meters_of(query: Mapping[str, str]) -> list[str]:
    raw = query.get("meters") or ""
    meters = [m.strip() for m in raw.split(",") if m.strip()]
    if not meters:
        raise InvalidInput("query parameter meters is required (comma-separated meter ids)", field="meters")
    limit = get_mdms_settings().query_max_meters
    if len(meters) > limit:
        raise InvalidInput(f"{len(meters)} meters exceed the limit of {limit} per query", field="meters")
    for m in meters:
        validate_meter_id(m)
    return list(dict.fromkeys(meters))


def require_known(meter_ids: Sequence[str]) -> None:
    for m in meter_ids:
        if not hot_store.known_meter(m):
            raise UnknownMeter(f"meter {m!r} is not known to the MDMS (no data, not registered)", meter_id=m)


# --- cursor --------------------------------------------------------------------------------------
def _fingerprint(meters: Sequence[str], lo: int, hi: int) -> str:
    return hashlib.sha256(json.dumps([list(meters), lo, hi]).encode()).hexdigest()[:12]


def encode_cursor(meters: Sequence[str], lo: int, hi: int, index: int, after_ms: int) -> str:
    raw = json.dumps({"q": _fingerprint(meters, lo, hi), "i": index, "t": after_ms}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, meters: Sequence[str], lo: int, hi: int) -> tuple[int, int]:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        index, after = int(data["i"]), int(data["t"])
        fp = str(data["q"])
    except (ValueError, KeyError, TypeError):
        raise InvalidInput(f"cursor {cursor[:40]!r} is not a cursor this API issued", field="cursor") from None
    if fp != _fingerprint(meters, lo, hi) or not 0 <= index < len(meters):
        raise InvalidInput("cursor belongs to another query (meters, from and to must stay the same)", field="cursor")
    return index, after


def interval_page(
    meters: Sequence[str], lo: int, hi: int, *, limit: int, cursor: str | None
) -> tuple[list[tuple[str, Row, Tier]], str | None]:
    """One page of rows of ``meters`` (in the order given, each in time order) in ``[lo, hi]``."""
    index, after = decode_cursor(cursor, meters, lo, hi) if cursor else (0, lo - 1)
    resumed = cursor is not None
    out: list[tuple[str, Row, Tier]] = []
    while index < len(meters):
        meter = meters[index]
        for day_rows in interval_reader.iter_days(meter, after + 1, hi, resumed=resumed):
            for row, tier in day_rows:
                out.append((meter, row, tier))
                if len(out) == limit:
                    more = row.ts_ms < hi or index + 1 < len(meters)
                    return out, encode_cursor(meters, lo, hi, index, row.ts_ms) if more else None
        index += 1
        after = lo - 1
        resumed = False
    return out, None


def rows_json(page: Sequence[tuple[str, Row, Tier]]) -> list[dict[str, Any]]:
    return [{"meter_id": m, **r.to_dict(), "tier": t} for m, r, t in page]


def rows_csv(page: Sequence[tuple[str, Row, Tier]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for m, r, t in page:
        w.writerow([m, iso_ms(r.ts_ms), r.ts_ms, "" if r.seq is None else r.seq, repr(r.import_kwh),
                    repr(r.export_kwh), "" if r.power_w is None else repr(r.power_w),
                    "" if r.voltage_v is None else repr(r.voltage_v), r.quality, t])
    return buf.getvalue()


def dicts_csv(items: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for item in items:
        w.writerow(["" if item.get(c) is None else item.get(c) for c in columns])
    return buf.getvalue()


# --- energy and billing -----------------------------------------------------------------------------
def meter_intervals(meter_id: str, lo: int, hi: int) -> list[IntervalEnergy]:
    """Interval energies of a meter in ``[lo, hi)`` (rows read with a margin so the ends interpolate)."""
    s = get_mdms_settings()
    margin = 2 * s.interval_ms
    rows = [r for r, _t in interval_reader.read_rows(meter_id, lo - margin, hi + margin, asked=(lo, hi - 1))]
    return interval_energies(rows, lo, hi, s.interval_ms, int(s.estimation_max_gap_s * 1000) or s.interval_ms * 2)


def energy(meter_id: str, lo: int, hi: int, period: str, tz: str) -> dict[str, Any]:
    if period not in ("day", "month"):
        raise InvalidInput(f"period={period!r} is not day or month", field="period")
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(tz)
    except Exception:
        raise InvalidInput(f"tz={tz!r} is not an IANA time zone", field="tz") from None
    s = get_mdms_settings()
    ivs = meter_intervals(meter_id, lo, hi)
    return {
        "meter_id": meter_id, "from": iso_ms(lo), "to": iso_ms(hi), "period": period, "tz": tz,
        "interval_s": s.interval_s, "periods": energy_by_period(ivs, s.interval_s, tz, period),  # type: ignore[arg-type]
    }


def billing(meter_id: str, lo: int, hi: int, tariff: Tariff) -> dict[str, Any]:
    s = get_mdms_settings()
    tariff.check_alignment(s.interval_s)
    det = determinants(meter_intervals(meter_id, lo, hi), tariff, s.interval_s)
    return {"meter_id": meter_id, "from": iso_ms(lo), "to": iso_ms(hi), "determinants": det,
            "bill": compute_bill(det, tariff), "tariff": tariff.model_dump()}
