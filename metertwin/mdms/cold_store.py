"""The MDMS cold tier: Parquet objects on S3 (boto3 + pyarrow), partitioned by zone, date and meter bucket.

Layout under ``s3://<S3_BUCKET>/<MDMS_COLD_PREFIX>/``::

    data/zone=<zone>/date=<yyyy-mm-dd>/bucket=<nnnn>/part-<sha256[:20]>.parquet
    index/zone=<zone>/date=<yyyy-mm-dd>/bucket=<nnnn>.json

One partition = one UTC day of the meters hashing (crc32) to one bucket. Its manifest
(``index/...json``) names the one current object, its row count and checksum and, per
meter, rows and first/last timestamp; writing the manifest is the commit point of an
archive. Object names are content addressed, so a re-run after a crash rewrites the same
object instead of leaving another. Redis caches the manifest's object key per partition
(``keys.mdms_cold_partition``) and the cold days per meter (``keys.mdms_cold_days``), so a
query fetches only the objects of the meter-days it needs.
"""

from __future__ import annotations

import functools
import io
import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from metertwin.core.errors import BackendUnavailable, MeterTwinError
from metertwin.core.settings import get_settings
from metertwin.mdms import keys
from metertwin.mdms.hot_store import get_hot_redis
from metertwin.mdms.intervals import Row, checksum, iso_day
from metertwin.mdms.settings import get_mdms_settings

#: Float columns are stored as fixed-point integers (delta-encoded: cumulative registers and
#: slowly changing values pack into a few bits) with a per-object decimal scale, chosen as the
#: smallest power of ten at which almost every value round-trips exactly. A value that does not
#: (an interpolated estimate, say) is kept bit-exact in the ``<name>_raw`` float column instead.
FLOAT_COLUMNS = ("import_kwh", "export_kwh", "power_w", "voltage_v")
SCALES: tuple[int, ...] = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
SCHEMA = pa.schema([
    pa.field("meter_id", pa.string(), nullable=False),
    pa.field("ts_ms", pa.int64(), nullable=False),
    pa.field("seq", pa.int64()),
    *[f for c in FLOAT_COLUMNS for f in (pa.field(f"{c}_fx", pa.int64()), pa.field(f"{c}_raw", pa.float64()))],
    pa.field("quality", pa.string(), nullable=False),
])
SCALES_KEY = b"metertwin.mdms.scales"


class ColdVerifyError(MeterTwinError):
    """An object read back differs from what was written (row count or checksum)."""

    code = "cold_verify_failed"


@dataclass(frozen=True, slots=True)
class Partition:
    zone: str
    day: str  # yyyymmdd
    bucket: int

    def label(self) -> str:
        return f"zone={self.zone}/date={iso_day(self.day)}/bucket={self.bucket:04d}"


def bucket_of(meter_id: str) -> int:
    return zlib.crc32(meter_id.encode()) % get_mdms_settings().meter_buckets


def partition_of(meter_id: str, day: str) -> Partition:
    return Partition(get_mdms_settings().zone(), day, bucket_of(meter_id))


def data_key(p: Partition, digest: str) -> str:
    return f"{get_mdms_settings().cold_prefix}/data/{p.label()}/part-{digest[:20]}.parquet"


def manifest_key(p: Partition) -> str:
    return f"{get_mdms_settings().cold_prefix}/index/{p.label()}.json"


# --- encoding -----------------------------------------------------------------------------------
def _exact(v: float, scale: int) -> bool:
    return abs(v * scale) < 9e15 and round(v * scale) / scale == v


def _scale_for(values: list[float]) -> int:
    if not values:
        return 1
    need = len(values) * 0.95
    for scale in SCALES:
        if sum(1 for v in values if _exact(v, scale)) >= need:
            return scale
    return SCALES[-1]


def encode(rows: Iterable[tuple[str, Row]]) -> bytes:
    """Parquet bytes of ``(meter_id, row)`` sorted by (meter, ts): zstd, dictionary-encoded meter and
    quality, delta-encoded timestamps, sequence numbers and fixed-point values (see ``FLOAT_COLUMNS``)."""
    ordered = sorted(rows, key=lambda mr: (mr[0], mr[1].ts_ms))
    cols: dict[str, list[Any]] = {
        "meter_id": [m for m, _ in ordered], "ts_ms": [r.ts_ms for _, r in ordered],
        "seq": [r.seq for _, r in ordered], "quality": [r.quality for _, r in ordered],
    }
    scales: dict[str, int] = {}
    for c in FLOAT_COLUMNS:
        values: list[float | None] = [getattr(r, c) for _, r in ordered]
        scale = scales[c] = _scale_for([v for v in values if v is not None])
        cols[f"{c}_fx"] = [round(v * scale) if v is not None and _exact(v, scale) else None for v in values]
        cols[f"{c}_raw"] = [v if v is not None and not _exact(v, scale) else None for v in values]
    table = pa.table(cols, schema=SCHEMA).replace_schema_metadata({SCALES_KEY: json.dumps(scales).encode()})
    sink = io.BytesIO()
    pq.write_table(
        table, sink, compression="zstd", compression_level=9,
        use_dictionary=["meter_id", "quality"],
        column_encoding={
            "ts_ms": "DELTA_BINARY_PACKED", "seq": "DELTA_BINARY_PACKED",
            **{f"{c}_fx": "DELTA_BINARY_PACKED" for c in FLOAT_COLUMNS},
            **{f"{c}_raw": "BYTE_STREAM_SPLIT" for c in FLOAT_COLUMNS},
        },
        row_group_size=ROW_GROUP_ROWS, write_statistics=["meter_id", "ts_ms"],
    )
    return sink.getvalue()


#: Rows per Parquet row group; statistics on meter_id let a reader skip the groups of other meters.
ROW_GROUP_ROWS = 50_000


def decode(data: bytes, meter_ids: set[str] | None = None) -> list[tuple[str, Row]]:
    filters = [("meter_id", "in", sorted(meter_ids))] if meter_ids else None
    table = pq.read_table(io.BytesIO(data), filters=filters)
    scales: dict[str, int] = json.loads((table.schema.metadata or {}).get(SCALES_KEY, b"{}"))
    cols = table.to_pydict()
    n = table.num_rows

    def floats(c: str) -> list[float | None]:
        fx, raw, scale = cols[f"{c}_fx"], cols[f"{c}_raw"], scales.get(c, 1)
        return [fx[i] / scale if fx[i] is not None else raw[i] for i in range(n)]

    imp, exp, pw, volt = (floats(c) for c in FLOAT_COLUMNS)
    out = []
    for i in range(n):
        out.append((cols["meter_id"][i], Row(
            ts_ms=int(cols["ts_ms"][i]), seq=cols["seq"][i], import_kwh=float(imp[i] or 0.0),
            export_kwh=float(exp[i] or 0.0), power_w=pw[i], voltage_v=volt[i], quality=cols["quality"][i],
        )))
    return out


# --- S3 -------------------------------------------------------------------------------------------
@functools.cache
def _s3(endpoint: str | None, region: str, access: str, secret: str, timeout_s: float, attempts: int) -> Any:
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=access, aws_secret_access_key=secret,
        config=Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                      retries={"max_attempts": attempts, "mode": "standard"}),
    )


def s3() -> Any:
    s, m = get_settings(), get_mdms_settings()
    return _s3(s.s3_endpoint_url, s.s3_region, s.s3_access_key_id.get_secret_value(),
               s.s3_secret_access_key.get_secret_value(), m.s3_timeout_s, m.s3_max_attempts)


def reset_s3() -> None:
    _s3.cache_clear()
    _bucket_ready.cache_clear()


def _unavailable(what: str, exc: Exception) -> BackendUnavailable:
    return BackendUnavailable(f"cold store (S3 {get_settings().s3_endpoint_url or 'AWS'}) failed to {what}: {exc}")


@functools.cache
def _bucket_ready(bucket: str) -> bool:
    client = s3()
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
        client.create_bucket(Bucket=bucket)
    return True


def _bucket() -> str:
    bucket = get_settings().s3_bucket
    try:
        _bucket_ready(bucket)
    except (BotoCoreError, ClientError) as exc:
        raise _unavailable(f"reach bucket {bucket!r}", exc) from exc
    return bucket


def put(key: str, body: bytes, content_type: str) -> None:
    try:
        s3().put_object(Bucket=_bucket(), Key=key, Body=body, ContentType=content_type)
    except (BotoCoreError, ClientError) as exc:
        raise _unavailable(f"write {key}", exc) from exc


def get(key: str) -> bytes | None:
    """Object bytes, or ``None`` if there is no such key."""
    try:
        resp = s3().get_object(Bucket=_bucket(), Key=key)
        return bytes(resp["Body"].read())
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise _unavailable(f"read {key}", exc) from exc
    except BotoCoreError as exc:
        raise _unavailable(f"read {key}", exc) from exc


def delete(key: str) -> None:
    try:
        s3().delete_object(Bucket=_bucket(), Key=key)
    except (BotoCoreError, ClientError) as exc:
        raise _unavailable(f"delete {key}", exc) from exc


def list_keys(prefix: str) -> list[tuple[str, int]]:
    """(key, size) of every object under ``prefix`` (operators, benchmarks)."""
    out: list[tuple[str, int]] = []
    try:
        for page in s3().get_paginator("list_objects_v2").paginate(Bucket=_bucket(), Prefix=prefix):
            out.extend((o["Key"], int(o["Size"])) for o in page.get("Contents", []))
    except (BotoCoreError, ClientError) as exc:
        raise _unavailable(f"list {prefix}", exc) from exc
    return out


# --- manifests and reads --------------------------------------------------------------------------------
def read_manifest(p: Partition) -> dict[str, Any] | None:
    raw = get(manifest_key(p))
    return None if raw is None else dict(json.loads(raw))


def write_manifest(p: Partition, manifest: dict[str, Any]) -> None:
    put(manifest_key(p), json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode(), "application/json")


def build_manifest(
    p: Partition, key: str, rows: list[tuple[str, Row]], digest: str, size: int, superseded: list[str], run_id: str
) -> dict[str, Any]:
    meters: dict[str, dict[str, int]] = {}
    for m, r in rows:
        e = meters.setdefault(m, {"rows": 0, "first_ts_ms": r.ts_ms, "last_ts_ms": r.ts_ms})
        e["rows"] += 1
        e["first_ts_ms"] = min(e["first_ts_ms"], r.ts_ms)
        e["last_ts_ms"] = max(e["last_ts_ms"], r.ts_ms)
    return {
        "version": 1, "partition": p.label(), "object": key, "rows": len(rows), "checksum": digest, "bytes": size,
        "meters": meters, "superseded": superseded[-20:], "run_id": run_id,
    }


def verify(key: str, expected_rows: int, expected_checksum: str) -> None:
    """Read ``key`` back and compare row count and checksum with what was written."""
    data = get(key)
    if data is None:
        raise ColdVerifyError(f"object {key} is missing right after it was written")
    rows = decode(data)
    if len(rows) != expected_rows:
        raise ColdVerifyError(f"object {key} holds {len(rows)} rows, expected {expected_rows}")
    got = checksum(rows)
    if got != expected_checksum:
        raise ColdVerifyError(f"object {key} checksum {got[:16]} differs from the written {expected_checksum[:16]}")


def object_for(p: Partition) -> str | None:
    """The committed object of a partition: Redis cache first, the S3 manifest otherwise."""
    r = get_hot_redis()
    cache = keys.mdms_cold_partition(p.zone, p.day, p.bucket)
    key = r.get(cache)
    if key:
        return str(key)
    manifest = read_manifest(p)
    if manifest is None:
        return None
    r.set(cache, manifest["object"])
    return str(manifest["object"])


def read_meter_day(meter_id: str, day: str) -> list[Row]:
    """The cold rows of one meter-day (reads one object; follows a concurrent rewrite once)."""
    p = partition_of(meter_id, day)
    for _attempt in range(2):
        key = object_for(p)
        if key is None:
            return []
        data = get(key)
        if data is not None:
            return [r for _m, r in decode(data, {meter_id})]
        get_hot_redis().delete(keys.mdms_cold_partition(p.zone, p.day, p.bucket))  # stale: re-read the manifest
    raise BackendUnavailable(f"cold object of {p.label()} vanished twice while reading; retry")
