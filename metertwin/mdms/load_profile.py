"""The load profile of a meter: energy and demand per fixed interval (15 min, 30 min or 1 h), with quality.

Built on what the billing engine uses (:func:`metertwin.mdms.tou.interval_energies` over the
rows :mod:`metertwin.mdms.interval_reader` merges from the hot and cold tiers), so a load
profile and a bill over the same range always add up to the same kWh.

Per interval ``[start, end)``, aligned to the epoch (UTC; 1 h intervals start on the hour):

* ``import_kwh`` / ``export_kwh``: register differences at the interval's ends (registers
  interpolated between the nearest rows), ``null`` when ``missing``;
* ``avg_kw``: average import demand, ``import_kwh`` over the interval's hours;
* ``max_kw``: the highest import demand seen in it: the largest instantaneous ``power_w`` the
  meter reported inside the interval, and never below ``avg_kw``;
* ``quality``: the worst flag of the rows the interval was computed from (``suspect`` <
  ``estimated`` < ``edited`` < ``valid``), or ``missing`` when its ends cannot be
  interpolated (no row on one side, or rows further apart than ``MDMS_ESTIMATION_MAX_GAP_S``).

Only whole intervals inside ``[from, to)`` are returned; a range of more than
``MDMS_QUERY_MAX_LIMIT`` intervals is refused (page through it with shorter ranges).
"""

from __future__ import annotations

import bisect
import csv
import io
from collections.abc import Sequence
from typing import Any, Final

from metertwin.core.errors import InvalidInput
from metertwin.mdms import interval_reader
from metertwin.mdms.intervals import Row, iso_ms
from metertwin.mdms.settings import get_mdms_settings
from metertwin.mdms.tou import IntervalEnergy, interval_energies

#: The interval names the API accepts, in seconds.
INTERVALS: Final[dict[str, int]] = {"15m": 900, "30m": 1800, "1h": 3600}
QUALITIES: Final = ("valid", "estimated", "edited", "suspect", "missing")
CSV_COLUMNS: Final = ("meter_id", "start", "end", "import_kwh", "export_kwh", "avg_kw", "max_kw", "quality")


def interval_s_of(name: str | None) -> int:
    """Seconds of an interval name (``15m`` when none is given); 400 naming the value otherwise."""
    name = name or "15m"
    seconds = INTERVALS.get(name)
    if seconds is None:
        raise InvalidInput(f"interval={name!r} is not one of {', '.join(INTERVALS)}", field="interval")
    base = get_mdms_settings().interval_s
    if seconds % base:
        raise InvalidInput(
            f"interval={name!r} is not a multiple of this MDMS's {base // 60}-minute data interval", field="interval"
        )
    return seconds


def check_range(lo: int, hi: int, step_s: int) -> None:
    """Refuse a range holding no whole interval, or more than ``MDMS_QUERY_MAX_LIMIT`` of them."""
    step = step_s * 1000
    first, last = -(-lo // step) * step, hi // step * step
    count = max(0, (last - first) // step)
    if count == 0:
        raise InvalidInput(
            f"range {iso_ms(lo)} .. {iso_ms(hi)} holds no whole {step_s // 60}-minute interval", field="from"
        )
    limit = get_mdms_settings().query_max_limit
    if count > limit:
        raise InvalidInput(
            f"range {iso_ms(lo)} .. {iso_ms(hi)} holds {count} intervals of {step_s // 60} min, more than the "
            f"limit of {limit}: use a longer interval or a shorter range", field="to",
        )


def _max_kw(rows: Sequence[Row], ts: Sequence[int], start: int, end: int, avg_kw: float) -> float:
    peak = avg_kw
    for r in rows[bisect.bisect_left(ts, start): bisect.bisect_left(ts, end)]:
        if r.power_w is not None and r.power_w / 1000 > peak:
            peak = r.power_w / 1000
    return peak


def profile_of(rows: Sequence[Row], lo: int, hi: int, step_s: int) -> list[dict[str, Any]]:
    """Intervals of ``step_s`` inside ``[lo, hi)`` from register rows sorted by time."""
    s = get_mdms_settings()
    step = step_s * 1000
    max_gap = int(s.estimation_max_gap_s * 1000) or s.interval_ms * 2
    ivs: list[IntervalEnergy] = interval_energies(rows, lo, hi, step, max(max_gap, step))
    ts = [r.ts_ms for r in rows]
    out: list[dict[str, Any]] = []
    for iv in ivs:
        end = iv.start_ms + step
        if iv.missing:
            out.append({"start": iso_ms(iv.start_ms), "end": iso_ms(end), "import_kwh": None, "export_kwh": None,
                        "avg_kw": None, "max_kw": None, "quality": "missing"})
            continue
        avg = iv.import_kwh * 3600 / step_s
        out.append({
            "start": iso_ms(iv.start_ms), "end": iso_ms(end), "import_kwh": round(iv.import_kwh, 6),
            "export_kwh": round(iv.export_kwh, 6), "avg_kw": round(avg, 4),
            "max_kw": round(_max_kw(rows, ts, iv.start_ms, end, avg), 4), "quality": iv.quality,
        })
    return out


def load_profile(meter_id: str, lo: int, hi: int, interval: str | None) -> dict[str, Any]:
    """The load profile of ``meter_id`` over ``[lo, hi)`` (epoch ms), hot and cold merged."""
    step_s = interval_s_of(interval)
    check_range(lo, hi, step_s)
    s = get_mdms_settings()
    # A margin on both sides so the first and last boundaries can be interpolated.
    margin = max(2 * step_s * 1000, 2 * s.interval_ms)
    rows = [r for r, _tier in interval_reader.read_rows(meter_id, lo - margin, hi + margin, asked=(lo, hi - 1))]
    intervals = profile_of(rows, lo, hi, step_s)
    present = [iv for iv in intervals if iv["quality"] != "missing"]
    counts = {q: sum(1 for iv in intervals if iv["quality"] == q) for q in QUALITIES}
    return {
        "meter_id": meter_id, "from": iso_ms(lo), "to": iso_ms(hi), "interval": interval or "15m",
        "interval_s": step_s, "count": len(intervals),
        "totals": {
            "import_kwh": round(sum(iv["import_kwh"] for iv in present), 6),
            "export_kwh": round(sum(iv["export_kwh"] for iv in present), 6),
            "max_kw": max((iv["max_kw"] for iv in present), default=None),
            "quality": counts,
        },
        "intervals": intervals,
    }


def profile_csv(result: dict[str, Any]) -> str:
    """The intervals of :func:`load_profile` as CSV (empty cells for the values of missing intervals)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for iv in result["intervals"]:
        w.writerow([result["meter_id"], *("" if iv[c] is None else iv[c] for c in CSV_COLUMNS[1:])])
    return buf.getvalue()
