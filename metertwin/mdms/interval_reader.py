"""Reading interval rows of a meter over a time range, hot and cold merged, with the tier of each row.

Cold rows come from the committed Parquet object of each cold meter-day in the range
(``keys.mdms_cold_days``); hot rows from the meter's sorted set. At equal timestamps the
hot row wins: it is the newer (an edit, or a late read not yet archived). Every read is
noted in the meter-day's heat (``keys.mdms_heat``); a cold day read often enough is
copied back to hot (rehydrated) for ``MDMS_REHYDRATE_TTL_S``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import cast

from metertwin.mdms import cold_store, hot_store, keys
from metertwin.mdms.intervals import DAY_MS, Row, Tier, day_of, day_start_ms, days_between
from metertwin.mdms.settings import get_mdms_settings

#: Cold meter-days are fetched this many ahead, in parallel (S3 latency, not bandwidth, dominates).
PREFETCH_DAYS = 8
_pool = ThreadPoolExecutor(max_workers=PREFETCH_DAYS, thread_name_prefix="mdms-cold")


def cold_days(meter_id: str, from_ms: int, to_ms: int) -> set[str]:
    """Cold days of the meter touching ``[from_ms, to_ms]``."""
    lo = day_start_ms(day_of(from_ms)) // 1000
    found = hot_store.get_hot_redis().zrangebyscore(keys.mdms_cold_days(meter_id), lo, to_ms // 1000)
    return set(cast(list[str], found))


def iter_days(
    meter_id: str, from_ms: int, to_ms: int, *, note: bool = True, resumed: bool = False,
    asked: tuple[int, int] | None = None,
) -> Iterator[list[tuple[Row, Tier]]]:
    """Yield the merged rows of each UTC day in ``[from_ms, to_ms]``, day by day (lazy: a paginated
    reader stops fetching cold objects once it has a page). ``resumed``: the first day continues a
    page already counted as a read of it, so it is not counted again. ``asked``: the range the
    caller was asked for, when it reads a margin around it (only days in it count as read)."""
    hot = hot_store.rows(meter_id, from_ms, to_ms)
    cold = cold_days(meter_id, from_ms, to_ms)
    now = time.time()
    heat = cast(dict[str, str], hot_store.get_hot_redis().hgetall(keys.mdms_heat(meter_id))) if note else {}
    by_day: dict[str, list[tuple[str, Row]]] = {}
    for member, row in hot:
        by_day.setdefault(day_of(row.ts_ms), []).append((member, row))
    quiet = day_of(from_ms) if resumed else None
    days = days_between(from_ms, to_ms)
    counted = set(days_between(*asked)) if asked else set(days)
    cold_order = [d for d in days if d in cold]
    fetching: dict[str, Future[list[Row]]] = {}
    for day in days:
        hot_rows = by_day.get(day, [])
        count = note and day != quiet and day in counted
        merged: dict[int, tuple[Row, Tier]] = {}
        if day in cold:
            lo, hi = max(from_ms, day_start_ms(day)), min(to_ms, day_start_ms(day) + DAY_MS - 1)
            at = cold_order.index(day)
            for ahead in cold_order[at:at + PREFETCH_DAYS]:
                if ahead not in fetching:
                    fetching[ahead] = _pool.submit(cold_store.read_meter_day, meter_id, ahead)
            day_rows = fetching.pop(day).result()
            for r in day_rows:
                if lo <= r.ts_ms <= hi:
                    merged[r.ts_ms] = (r, "cold")
            if count:
                _note_cold_read(meter_id, day, day_rows, now, heat)
        elif count and hot_rows:
            _note_read(meter_id, day, now, heat)
        for _member, r in hot_rows:
            merged[r.ts_ms] = (r, "hot")
        if merged:
            yield [merged[t] for t in sorted(merged)]


def read_rows(
    meter_id: str, from_ms: int, to_ms: int, *, note: bool = True, asked: tuple[int, int] | None = None
) -> list[tuple[Row, Tier]]:
    """All merged rows in ``[from_ms, to_ms]``, in time order (see :func:`iter_days`)."""
    out: list[tuple[Row, Tier]] = []
    for day_rows in iter_days(meter_id, from_ms, to_ms, note=note, asked=asked):
        out.extend(day_rows)
    return out


def _note_read(meter_id: str, day: str, now: float, heat: dict[str, str]) -> int:
    """Count a read of a meter-day within the read window (one round trip; heat is advisory, so
    concurrent readers may undercount by one); returns the count."""
    s = get_mdms_settings()
    key = keys.mdms_heat(meter_id)
    last = heat.get(f"l:{day}")
    fresh = last is None or float(last) < now - s.tier_read_window_s
    reads = 1 if fresh else int(heat.get(f"r:{day}", 0)) + 1
    pipe = hot_store.get_hot_redis().pipeline(transaction=False)
    if fresh:
        pipe.hset(key, f"r:{day}", 1)
    else:
        pipe.hincrby(key, f"r:{day}", 1)
    pipe.hset(key, f"l:{day}", repr(now))
    pipe.hincrby(keys.mdms_counters(meter_id), "queried", 1)
    pipe.execute()
    return reads


def _note_cold_read(meter_id: str, day: str, day_rows: list[Row], now: float, heat: dict[str, str]) -> None:
    s = get_mdms_settings()
    reads = _note_read(meter_id, day, now, heat)
    if reads < s.rehydrate_reads or s.rehydrate_ttl_s <= 0:
        return
    # Read again while cold: bring the whole day back hot for a while.
    # The rehydrate script skips timestamps that have a hot row (those are newer).
    hot_store.rehydrate(meter_id, [r.encode() for r in day_rows])
    hot_store.get_hot_redis().hset(keys.mdms_heat(meter_id), f"h:{day}", repr(now + s.rehydrate_ttl_s))
