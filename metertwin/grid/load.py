"""Queries of the aggregates: a node's current state and its load history (hot and cold), JSON or CSV."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import redis

from metertwin.core.errors import BackendUnavailable, InvalidInput, NotFound
from metertwin.grid import keys
from metertwin.grid.settings import get_grid_settings

LEVEL_OF_PATH = {"transformers": "transformer", "feeders": "feeder", "substations": "substation",
                 "regions": "region"}
INTERVALS = {"15m": 900, "30m": 1800, "1h": 3600, "1d": 86_400}
#: One history bucket: kWh in, kWh out, readings, voltage min, voltage max, peak net import W.
Bucket = dict[str, float]
CSV_COLUMNS = ("start", "end", "import_kwh", "export_kwh", "net_kwh", "readings", "voltage_min_v", "voltage_max_v",
               "peak_w")


def iso(ms: int | float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def _r(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits) + 0.0


def summary(client: Any, level: str, node: str, now_s: float | None = None) -> dict[str, Any]:
    """A node's current aggregates: import/export power, meters reporting/online/stale, voltage band."""
    s = get_grid_settings()
    now_ms = (time.time() if now_s is None else now_s) * 1000
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.node_state(level, node))
    seen = keys.node_seen(level, node)
    pipe.zcard(seen)
    pipe.zcount(seen, now_ms - s.interval_s * 1000, "+inf")
    pipe.zcount(seen, now_ms - s.online_s * 1000, "+inf")
    pipe.zcount(seen, "-inf", f"({now_ms - s.stale_s * 1000}")
    pipe.zrange(keys.node_voltage(level, node), 0, 0, withscores=True)
    pipe.zrange(keys.node_voltage(level, node), -1, -1, withscores=True)
    pipe.zscore(keys.nodes(level), node)
    try:
        cur, meters, reporting, online, stale, vmin, vmax, known = pipe.execute()
    except redis.RedisError as exc:
        raise BackendUnavailable(f"grid aggregates (Redis) failed: {exc}") from exc
    if known is None and not cur:
        raise NotFound(f"{level} {node!r} has no aggregates (no meter placed below it has reported)", field=level)
    imp, exp = float(cur.get("import_w", 0) or 0), float(cur.get("export_w", 0) or 0)
    return {
        "level": level, "id": node, "import_w": _r(max(imp, 0.0), 3), "export_w": _r(max(exp, 0.0), 3),
        "net_w": _r(imp - exp, 3), "meters": int(meters), "reporting": int(reporting), "online": int(online),
        "stale": int(stale), "voltage_min_v": _r(vmin[0][1]) if vmin else None,
        "voltage_min_meter": vmin[0][0] if vmin else None, "voltage_max_v": _r(vmax[0][1]) if vmax else None,
        "voltage_max_meter": vmax[0][0] if vmax else None,
        "updated_at": iso(int(cur["at_ms"])) if cur.get("at_ms") else None,
    }


def parse_time(raw: str, name: str) -> int:
    """Epoch seconds or ISO 8601 -> epoch ms."""
    try:
        return round(float(raw) * 1000)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"{name}={raw!r} is neither epoch seconds nor an ISO 8601 timestamp", field=name) from None
    return round((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1000)


def range_of(query: Mapping[str, str], now_s: float | None = None) -> tuple[int, int, int]:
    """``from``, ``to`` (default: the last day) and ``interval`` (15m, 30m, 1h, 1d) in ms."""
    s = get_grid_settings()
    now = round((time.time() if now_s is None else now_s) * 1000)
    hi = parse_time(query["to"], "to") if query.get("to") else now
    lo = parse_time(query["from"], "from") if query.get("from") else hi - 86_400_000
    if lo >= hi:
        raise InvalidInput(f"from ({iso(lo)}) is not before to ({iso(hi)})", field="from")
    if hi - lo > s.query_max_range_s * 1000:
        raise InvalidInput(f"range of {(hi - lo) / 86_400_000:.1f} days exceeds {s.query_max_range_s / 86400:.0f} days",
                           field="to")
    raw = query.get("interval") or ""
    step_s = INTERVALS.get(raw) if raw else s.interval_s
    if step_s is None or step_s % s.interval_s:
        allowed = [k for k, v in INTERVALS.items() if v % s.interval_s == 0]
        raise InvalidInput(f"interval={raw!r} is not one of {', '.join(allowed)}", field="interval")
    return lo, hi, step_s * 1000


def merge(a: Bucket, b: Bucket) -> Bucket:
    """Two parts of one bucket (cold and hot, or buckets rolled up): sums add, extremes combine."""
    out = dict(a)
    for k in ("i", "e", "n"):
        if k in b:
            out[k] = out.get(k, 0.0) + b[k]
    for k, fn in (("lo", min), ("hi", max), ("pk", max)):
        if k in b:
            out[k] = fn(out[k], b[k]) if k in out else b[k]
    return out


def hot_buckets(client: Any, level: str, node: str, lo: int, hi: int) -> dict[int, Bucket]:
    """Hot history buckets whose interval ``(start, start + I]`` overlaps ``[lo, hi)``."""
    step = get_grid_settings().interval_s * 1000
    try:
        starts = [int(b) for b in client.zrangebyscore(keys.node_buckets(level, node), lo - step, f"({hi}")]
        if not starts:
            return {}
        fields = [f"{b}:{k}" for b in starts for k in ("i", "e", "n", "lo", "hi", "pk")]
        values = client.hmget(keys.node_history(level, node), fields)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"grid history (Redis) failed: {exc}") from exc
    out: dict[int, Bucket] = {}
    for i, b in enumerate(starts):
        row = {k: float(v) for k, v in zip(("i", "e", "n", "lo", "hi", "pk"), values[i * 6:i * 6 + 6], strict=True)
               if v is not None}
        if row:
            out[b] = row
    return out


def history(client: Any, level: str, node: str, lo: int, hi: int, step_ms: int) -> list[dict[str, Any]]:
    """The node's load per ``step_ms`` interval over ``[lo, hi)``: cold days merged with hot buckets."""
    from metertwin.grid import archive  # S3 only when a query reaches archived days

    buckets = archive.cold_buckets(client, level, node, lo, hi)
    for b, row in hot_buckets(client, level, node, lo, hi).items():
        buckets[b] = merge(buckets.get(b, {}), row)
    rolled: dict[int, Bucket] = {}
    for b, row in buckets.items():
        start = b // step_ms * step_ms
        if lo - step_ms < start < hi:
            rolled[start] = merge(rolled.get(start, {}), row)
    out = []
    for start in sorted(rolled):
        row = rolled[start]
        imp, exp = row.get("i", 0.0), row.get("e", 0.0)
        out.append({
            "start": iso(start), "end": iso(start + step_ms), "import_kwh": _r(imp), "export_kwh": _r(exp),
            "net_kwh": _r(imp - exp), "readings": int(row.get("n", 0)), "voltage_min_v": _r(row.get("lo")),
            "voltage_max_v": _r(row.get("hi")), "peak_w": _r(row.get("pk"), 3),
        })
    return out


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    return buf.getvalue()


def list_nodes(client: Any, level: str, *, limit: int = 100, after: str = "") -> list[str]:
    """Nodes of a level that have aggregates, by name."""
    try:
        names = sorted(client.zrange(keys.nodes(level), 0, -1))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"grid nodes (Redis) failed: {exc}") from exc
    return [n for n in names if n > after][:limit]
