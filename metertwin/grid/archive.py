"""Aggregate history to S3, like meter intervals: write → verify → commit with the trim → read merged.

Per node and UTC day, one JSON object ``<GRID_COLD_PREFIX>/zone=<zone>/level=<level>/node=<node>/
day=<yyyymmdd>/<digest>.json`` holds the day's buckets. A run takes the hot buckets older than
``GRID_HOT_RETENTION_S``, merges them into the day's committed object (if any), writes a new
object, reads it back, and then one Lua script in the node's slot commits it (the day's object
key) and *subtracts* the archived values from the hot buckets (sums go down, extremes equal to the
archived ones go), dropping buckets left empty. A late reading that changed a bucket meanwhile
leaves exactly its delta hot; queries add hot to cold. A crash before the commit leaves an
unreferenced object and the hot data as it was (the next run redoes the day); after it, nothing
is archived twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import boto3
import redis
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from metertwin.core.errors import BackendUnavailable
from metertwin.core.settings import get_settings
from metertwin.grid import keys
from metertwin.grid.load import Bucket, hot_buckets, merge
from metertwin.grid.settings import get_grid_settings

_FIELDS = ("i", "e", "n", "lo", "hi", "pk")

# KEYS: history buckets cold ; ARGV: day, object key, then per bucket 7 values: start i e n lo hi pk ('' absent)
TRIM = r"""
local hist, hb, cold = KEYS[1], KEYS[2], KEYS[3]
local F = {'i', 'e', 'n', 'lo', 'hi', 'pk'}
for j = 3, #ARGV, 7 do
  local b = ARGV[j]
  for k = 1, 3 do
    local v = ARGV[j + k]
    if v ~= '' then redis.call('HINCRBYFLOAT', hist, b .. ':' .. F[k], -tonumber(v)) end
  end
  for k = 4, 6 do
    local v = ARGV[j + k]
    if v ~= '' and redis.call('HGET', hist, b .. ':' .. F[k]) == v then redis.call('HDEL', hist, b .. ':' .. F[k]) end
  end
  local left = redis.call('HMGET', hist, b .. ':i', b .. ':e', b .. ':n', b .. ':lo', b .. ':hi', b .. ':pk')
  local empty = not left[4] and not left[5] and not left[6]
  for k = 1, 3 do
    if left[k] and math.abs(tonumber(left[k])) > 1e-9 then empty = false end
  end
  if empty then
    redis.call('HDEL', hist, b .. ':i', b .. ':e', b .. ':n')
    redis.call('ZREM', hb, b)
  end
end
redis.call('HSET', cold, ARGV[1], ARGV[2])
return 1
"""


@functools.cache
def _s3(endpoint: str | None, region: str, access: str, secret: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=access,
                        aws_secret_access_key=secret,
                        config=Config(connect_timeout=10, read_timeout=30, retries={"max_attempts": 3}))


def s3() -> Any:
    s = get_settings()
    return _s3(s.s3_endpoint_url, s.s3_region, s.s3_access_key_id.get_secret_value(),
               s.s3_secret_access_key.get_secret_value())


def reset_s3() -> None:
    _s3.cache_clear()


def _bucket() -> str:
    bucket = get_settings().s3_bucket
    try:
        s3().head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise BackendUnavailable(f"grid cold store: bucket {bucket!r}: {exc}") from exc
        s3().create_bucket(Bucket=bucket)
    except BotoCoreError as exc:
        raise BackendUnavailable(f"grid cold store: bucket {bucket!r}: {exc}") from exc
    return bucket


def _get(key: str) -> bytes:
    try:
        return bytes(s3().get_object(Bucket=get_settings().s3_bucket, Key=key)["Body"].read())
    except (BotoCoreError, ClientError) as exc:
        raise BackendUnavailable(f"grid cold store failed to read {key!r}: {exc}") from exc


def day_of(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y%m%d")


def _decode(data: bytes) -> dict[int, Bucket]:
    return {int(b): {k: float(v) for k, v in row.items()} for b, row in json.loads(data)["buckets"].items()}


def cold_buckets(client: Any, level: str, node: str, lo: int, hi: int) -> dict[int, Bucket]:
    """Archived buckets of the node whose day overlaps ``[lo, hi)``."""
    try:
        committed: dict[str, str] = client.hgetall(keys.node_cold_days(level, node))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"grid history (Redis) failed: {exc}") from exc
    first, last = day_of(lo - 86_400_000), day_of(hi)
    out: dict[int, Bucket] = {}
    for day, key in committed.items():
        if first <= day <= last:
            out.update({b: row for b, row in _decode(_get(key)).items() if lo - 86_400_000 < b < hi})
    return out


def archive_node(client: Any, level: str, node: str, now_s: float | None = None) -> int:
    """Archive the node's buckets older than the hot retention; returns the buckets archived."""
    s = get_grid_settings()
    interval_ms = s.interval_s * 1000
    cutoff = round(((time.time() if now_s is None else now_s) - s.hot_retention_s) * 1000)
    starts = [int(b) for b in client.zrangebyscore(keys.node_buckets(level, node), "-inf", cutoff - interval_ms)]
    if not starts:
        return 0
    snapshot = hot_buckets(client, level, node, min(starts), max(starts) + 1)
    by_day: dict[str, dict[int, Bucket]] = {}
    for b, row in snapshot.items():
        by_day.setdefault(day_of(b), {})[b] = row
    trim = client.register_script(TRIM)
    bucket, done = _bucket(), 0
    for day, rows in sorted(by_day.items()):
        old_key = client.hget(keys.node_cold_days(level, node), day)
        merged = _decode(_get(old_key)) if old_key else {}
        for b, row in rows.items():
            merged[b] = merge(merged.get(b, {}), row)
        body = json.dumps({"level": level, "node": node, "day": day,
                           "buckets": {str(b): merged[b] for b in sorted(merged)}}, separators=(",", ":")).encode()
        digest = hashlib.sha256(body).hexdigest()[:16]
        key = (f"{s.cold_prefix}/zone={quote(get_settings().zone, safe='')}/level={level}/"
               f"node={quote(node, safe='')}/day={day}/{digest}.json")
        try:
            s3().put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
        except (BotoCoreError, ClientError) as exc:
            raise BackendUnavailable(f"grid cold store failed to write {key!r}: {exc}") from exc
        if _get(key) != body:
            raise BackendUnavailable(f"grid cold store: {key!r} read back differs from what was written")
        argv: list[str] = [day, key]
        for b, row in sorted(rows.items()):
            argv += [str(b), *(repr(row[f]) if f in row else "" for f in _FIELDS)]
        trim(keys=[keys.node_history(level, node), keys.node_buckets(level, node),
                   keys.node_cold_days(level, node)], args=argv)
        done += len(rows)
    return done


def archive_all(client: Any, now_s: float | None = None) -> dict[str, Any]:
    """One archive run over every known node (one run at a time: a lock)."""
    if not client.set(keys.ARCHIVE_LOCK, "1", nx=True, ex=keys.LOCK_TTL_S):
        return {"skipped": "another archive run holds the lock"}
    try:
        out: dict[str, Any] = {"nodes": 0, "buckets": 0}
        for level in keys.LEVELS:
            for node in client.zrange(keys.nodes(level), 0, -1):
                out["nodes"] += 1
                out["buckets"] += archive_node(client, level, node, now_s)
        return out
    finally:
        client.delete(keys.ARCHIVE_LOCK)
