"""Tiering between the hot tier (fog Redis) and the cold tier (S3 Parquet), run by the archive function.

Policy, per meter and UTC day (first rule that applies wins; thresholds in
:class:`metertwin.mdms.settings.MdmsSettings`):

1. ``young``: the day ended less than ``MDMS_TIER_MIN_AGE_S`` ago -> stays hot;
2. ``retention``: the day ended more than ``MDMS_HOT_RETENTION_S`` ago -> goes cold;
3. ``rehydrated``: cold data read again were copied back hot until a time not yet reached -> stays hot;
4. ``read_often``: read at least ``MDMS_TIER_HOT_READS`` times within ``MDMS_TIER_READ_WINDOW_S`` -> stays hot;
5. ``rarely_read``: otherwise -> goes cold;
6. ``memory_budget``: while the hot days kept would exceed ``MDMS_HOT_MEMORY_BUDGET_BYTES``,
   the oldest kept days (never today's) go cold too.

Archive protocol, per partition (zone, day, meter bucket), each step idempotent:

``write``  the merged rows (existing cold object + hot snapshot, hot wins) to a content-addressed object;
``verify`` read it back: same row count and checksum, or stop (hot untouched);
``index``  write the partition manifest (the commit point), then the Redis caches of it;
``cleanup`` delete the objects the manifest superseded (a reader holding an old key retries);
``trim``   remove from hot exactly the snapshot members (rows changed meanwhile stay hot).

A crash (or S3 being unreachable) before ``index`` leaves the data hot and the old
manifest in force (a content-addressed object written before the crash is simply
rewritten); after it the data are both hot and cold (queries prefer the hot copy) and
the next run finds the same checksum, skips the write, cleans up and trims.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, cast

import redis
from botocore.exceptions import BotoCoreError, ClientError

from metertwin.core.errors import BackendUnavailable, MeterTwinError
from metertwin.mdms import cold_store, hot_store, keys
from metertwin.mdms.cold_store import ColdVerifyError, Partition
from metertwin.mdms.intervals import DAY_MS, Row, checksum, day_of, day_start_ms, days_between, iso_day
from metertwin.mdms.settings import MdmsSettings, get_mdms_settings

log = logging.getLogger("metertwin.tiering")

STEPS = ("write", "verify", "index", "cleanup", "trim")
#: Called after each protocol step with its name; tests raise in it to simulate a crash there.
FaultHook = Callable[[str], None]
_BUDGET_LOW_WATERMARK = 0.9

_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"


class ArchiveLockLost(MeterTwinError):
    """Another archive run took over (this one stalled past the lock TTL): stop before committing."""

    code = "archive_lock_lost"


def _hold_lock(run_id: str) -> None:
    """Renew the run lock; raise if it is no longer ours. Called before every commit, so two runs
    never commit the same partition from different snapshots."""
    r = hot_store.get_hot_redis()
    if not r.eval(_RENEW, 1, keys.MDMS_ARCHIVE_LOCK, run_id, keys.MDMS_ARCHIVE_LOCK_TTL_S):
        raise ArchiveLockLost(f"archive run {run_id} no longer holds {keys.MDMS_ARCHIVE_LOCK}; stopping")


@dataclass(frozen=True, slots=True)
class Decision:
    meter_id: str
    day: str
    rows: int
    bytes: int
    action: str  # archive | keep
    reason: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["date"] = iso_day(self.day)
        del d["day"]
        return d


def _decide(day: str, heat: dict[str, str], now: float, s: MdmsSettings) -> tuple[str, str]:
    age = now - (day_start_ms(day) + DAY_MS) / 1000
    if age < s.tier_min_age_s:
        return "keep", "young"
    if age >= s.hot_retention_s:
        return "archive", "retention"
    if float(heat.get(f"h:{day}", 0)) > now:
        return "keep", "rehydrated"
    reads, last = int(heat.get(f"r:{day}", 0)), float(heat.get(f"l:{day}", 0))
    if reads >= s.tier_hot_reads and last >= now - s.tier_read_window_s:
        return "keep", "read_often"
    return "archive", "rarely_read"


_PLAN_CHUNK = 500


def decisions_for(meter_ids: list[str], now: float, s: MdmsSettings) -> list[Decision]:
    """Policy decisions for every hot day of these meters (without the memory budget); two
    pipelined round trips per chunk of meters, so a fleet is planned quickly."""
    r = hot_store.get_hot_redis()
    out: list[Decision] = []
    for start in range(0, len(meter_ids), _PLAN_CHUNK):
        chunk = meter_ids[start:start + _PLAN_CHUNK]
        pipe = r.pipeline(transaction=False)
        for m in chunk:
            iv = keys.mdms_intervals(m)
            pipe.zrange(iv, 0, 0, withscores=True)
            pipe.zrange(iv, -1, -1, withscores=True)
            pipe.hgetall(keys.mdms_heat(m))
            pipe.memory_usage(iv, samples=0)
        answers = pipe.execute()
        spans: list[tuple[str, list[str], dict[str, str], int]] = []
        pipe = r.pipeline(transaction=False)
        for i, m in enumerate(chunk):
            first, last, heat, usage = answers[4 * i: 4 * i + 4]
            if not first or not last:
                continue
            days = days_between(int(first[0][1]), int(last[0][1]))
            spans.append((m, days, cast(dict[str, str], heat), int(usage or 0)))
            for day in days:
                lo = day_start_ms(day)
                pipe.zcount(keys.mdms_intervals(m), lo, f"({lo + DAY_MS}")
        counts = iter(pipe.execute())
        for m, days, heat, usage in spans:
            per_day = {day: int(next(counts)) for day in days}
            total = sum(per_day.values())
            for day, n in per_day.items():
                if n:
                    action, reason = _decide(day, heat, now, s)
                    out.append(Decision(m, day, n, usage * n // max(total, 1), action, reason))
    return out


def meter_decisions(meter_id: str, now: float, s: MdmsSettings) -> list[Decision]:
    """Policy decisions for every hot day of one meter (without the memory budget)."""
    return decisions_for([meter_id], now, s)


def plan(now: float | None = None) -> list[Decision]:
    """Decisions for every hot meter-day, memory budget applied."""
    s = get_mdms_settings()
    at = time.time() if now is None else now
    meters = sorted(cast(set[str], hot_store.get_hot_redis().smembers(keys.MDMS_HOT_METERS)))
    decisions = decisions_for(meters, at, s)
    kept = sum(d.bytes for d in decisions if d.action == "keep")
    if kept > s.hot_memory_budget_bytes:
        today = day_of(int(at * 1000))
        target = s.hot_memory_budget_bytes * _BUDGET_LOW_WATERMARK
        order = sorted(
            (i for i, d in enumerate(decisions) if d.action == "keep" and d.day != today),
            key=lambda i: (decisions[i].day, -decisions[i].bytes),
        )
        for i in order:
            if kept <= target:
                break
            d = decisions[i]
            decisions[i] = Decision(d.meter_id, d.day, d.rows, d.bytes, "archive", "memory_budget")
            kept -= d.bytes
    return decisions


def archive_partition(
    p: Partition, meters: list[str], *, run_id: str, fault: FaultHook | None = None
) -> dict[str, Any]:
    """Move the hot rows of ``meters`` on ``p.day`` into the partition's cold object (see module doc)."""
    hook: FaultHook = fault or (lambda _step: None)
    lo = day_start_ms(p.day)
    hi = lo + DAY_MS - 1
    snapshot = {m: hot_store.rows(m, lo, hi) for m in meters}
    snapshot = {m: rows for m, rows in snapshot.items() if rows}
    if not snapshot:
        return {"partition": p.label(), "rows": 0, "skipped": "nothing hot"}
    manifest = cold_store.read_manifest(p)
    merged: dict[tuple[str, int], Row] = {}
    if manifest is not None:
        data = cold_store.get(manifest["object"])
        if data is None:
            raise ColdVerifyError(f"manifest of {p.label()} names {manifest['object']}, which is missing")
        for m, row in cold_store.decode(data):
            merged[(m, row.ts_ms)] = row
    for m, rows in snapshot.items():
        for _member, row in rows:
            merged[(m, row.ts_ms)] = row
    all_rows = [(m, row) for (m, _ts), row in merged.items()]
    digest = checksum(all_rows)
    written = 0
    if manifest is not None and manifest.get("checksum") == digest and manifest.get("rows") == len(all_rows):
        key = str(manifest["object"])  # committed by an earlier run (crash after index) or unchanged
        superseded = [k for k in manifest.get("superseded", []) if k != key]
    else:
        body = cold_store.encode(all_rows)
        key = cold_store.data_key(p, digest)
        cold_store.put(key, body, "application/vnd.apache.parquet")
        written = len(body)
        hook("write")
        cold_store.verify(key, len(all_rows), digest)
        hook("verify")
        previous = [*manifest.get("superseded", []), manifest["object"]] if manifest else []
        superseded = [k for k in dict.fromkeys(previous) if k != key]
        _hold_lock(run_id)
        cold_store.write_manifest(p, cold_store.build_manifest(p, key, all_rows, digest, written, superseded, run_id))
    r = hot_store.get_hot_redis()
    pipe = r.pipeline(transaction=False)
    pipe.set(keys.mdms_cold_partition(p.zone, p.day, p.bucket), key)
    for m in snapshot:
        pipe.zadd(keys.mdms_cold_days(m), {p.day: lo // 1000})
    pipe.execute()
    hook("index")
    for old in superseded:
        cold_store.delete(old)  # deleting a missing key succeeds: a re-run is harmless
    hook("cleanup")
    trimmed = 0
    for m, rows in snapshot.items():
        trimmed += hot_store.trim(m, [member for member, _row in rows])
        r.hdel(keys.mdms_heat(m), f"r:{p.day}", f"l:{p.day}", f"h:{p.day}")
    hook("trim")
    return {"partition": p.label(), "object": key, "rows": len(all_rows), "archived_rows": trimmed,
            "meters": len(snapshot), "bytes": written}


def archive(now: float | None = None, *, fault: FaultHook | None = None) -> dict[str, Any]:
    """One archive run: plan, then move each partition. Failures leave data hot for the next run."""
    s = get_mdms_settings()
    at = time.time() if now is None else now
    r = hot_store.get_hot_redis()
    run_id = f"{int(at)}-{secrets.token_hex(4)}"
    if not r.set(keys.MDMS_ARCHIVE_LOCK, run_id, nx=True, ex=keys.MDMS_ARCHIVE_LOCK_TTL_S):
        return {"status": "skipped", "reason": "another archive run holds the lock", "run_id": run_id}
    started = time.perf_counter()
    try:
        decisions = plan(at)
        todo = [d for d in decisions if d.action == "archive"][: s.archive_max_meter_days]
        partitions: dict[Partition, list[str]] = {}
        for d in todo:
            partitions.setdefault(cold_store.partition_of(d.meter_id, d.day), []).append(d.meter_id)
        done: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        pending = sorted(partitions.items(), key=lambda kv: (kv[0].day, kv[0].bucket))
        for index, (p, meters) in enumerate(pending):
            try:
                done.append(archive_partition(p, sorted(meters), run_id=run_id, fault=fault))
            except (MeterTwinError, BotoCoreError, ClientError, redis.RedisError) as exc:
                log.warning("archive of %s failed, data stay hot: %s", p.label(), exc)
                failed.append({"partition": p.label(), "error": str(exc)})
                if isinstance(exc, BackendUnavailable | ArchiveLockLost):
                    failed.extend({"partition": q.label(), "error": f"not attempted: {exc.code}"}
                                  for q, _m in pending[index + 1:])
                    break
        reasons: dict[str, int] = {}
        for d in decisions:
            reasons[f"{d.action}:{d.reason}"] = reasons.get(f"{d.action}:{d.reason}", 0) + 1
        report = {
            "status": "failed" if failed else "ok", "run_id": run_id, "meter_days": len(todo),
            "decisions": reasons, "partitions": len(done),
            "rows_archived": sum(x.get("archived_rows", 0) for x in done),
            "bytes_written": sum(x.get("bytes", 0) for x in done), "failed": failed, "done": done,
            "seconds": round(time.perf_counter() - started, 3),
        }
        summary = {k: str(v) for k, v in report.items() if k not in ("done", "failed", "decisions")}
        summary["failed"] = str(len(failed))
        summary["finished_at"] = repr(time.time())
        r.hset(keys.MDMS_ARCHIVE_LAST_RUN, mapping=summary)  # type: ignore[arg-type]
        return report
    finally:
        r.eval(_RELEASE, 1, keys.MDMS_ARCHIVE_LOCK, run_id)


def meter_tiers(meter_id: str, now: float | None = None) -> dict[str, Any]:
    """What is hot and cold of one meter and why (operators)."""
    s = get_mdms_settings()
    at = time.time() if now is None else now
    r = hot_store.get_hot_redis()
    decisions = {d.day: d for d in meter_decisions(meter_id, at, s)}
    cold = cast(list[str], r.zrange(keys.mdms_cold_days(meter_id), 0, -1))
    heat = cast(dict[str, str], r.hgetall(keys.mdms_heat(meter_id)))
    days = []
    for day in sorted(set(decisions) | set(cold)):
        d = decisions.get(day)
        days.append({
            "date": iso_day(day), "hot_rows": d.rows if d else 0, "hot_bytes": d.bytes if d else 0,
            "cold": day in cold, "reads": int(heat.get(f"r:{day}", 0)),
            "last_read": float(heat[f"l:{day}"]) if f"l:{day}" in heat else None,
            "hot_until": float(heat[f"h:{day}"]) if f"h:{day}" in heat else None,
            "tier": ("hot+cold" if day in cold else "hot") if d else "cold",
            "next_archive": {"action": d.action, "reason": d.reason} if d else None,
        })
    return {"meter_id": meter_id, "days": days, "policy": policy(s)}


def policy(s: MdmsSettings | None = None) -> dict[str, Any]:
    m = s or get_mdms_settings()
    return {
        "tier_min_age_s": m.tier_min_age_s, "hot_retention_s": m.hot_retention_s, "tier_hot_reads": m.tier_hot_reads,
        "tier_read_window_s": m.tier_read_window_s, "rehydrate_reads": m.rehydrate_reads,
        "rehydrate_ttl_s": m.rehydrate_ttl_s, "hot_memory_budget_bytes": m.hot_memory_budget_bytes,
    }
