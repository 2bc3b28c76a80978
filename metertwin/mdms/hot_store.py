"""The MDMS hot tier: interval rows, latest registers and counters in the fog zone's Redis.

Every write that reads state first (dedupe, neighbours, estimation, edits, trims)
is one Lua script, so concurrent invocations of one meter cannot interleave and a
QoS1 redelivery is counted once. Key layout: ``metertwin/mdms/keys.py``; the scripts:
``metertwin/mdms/hot_scripts.py``.
"""

from __future__ import annotations

import asyncio
import functools
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from metertwin.core import clients
from metertwin.core.errors import BackendUnavailable
from metertwin.core.settings import get_settings
from metertwin.grid import aggregates
from metertwin.mdms import hot_scripts, keys
from metertwin.mdms.intervals import Row
from metertwin.mdms.settings import MdmsSettings, get_mdms_settings
from metertwin.twin import keys as twin_keys


@functools.cache
def _client(url: str, timeout_s: float) -> redis.Redis:
    cluster = clients.redis_cluster(url, timeout_s=timeout_s, max_connections=get_settings().redis_max_connections)
    if cluster is not None:
        return cast(redis.Redis, cluster)  # same commands; its own class, not a redis.Redis subclass
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        retry_on_timeout=False,
    )


def get_hot_redis() -> redis.Redis:
    """The Redis that holds the hot tier (``HOT_REDIS_URL``, else the zone's ``REDIS_URL``)."""
    return _client(get_mdms_settings().redis_url(), get_settings().redis_timeout_s)


def reset_hot_redis() -> None:
    """Close and forget the hot-tier clients (tests, process shutdown)."""
    _client.cache_clear()
    _scripts.cache_clear()
    _async.clear()


#: Per event loop: an asyncio client and its ingest script (the gateway's async lane).
_async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[aioredis.Redis, Any]] = (
    weakref.WeakKeyDictionary()
)


def _async_ingest() -> tuple[aioredis.Redis, Any]:
    loop = asyncio.get_running_loop()
    found = _async.get(loop)
    if found is None:
        timeout, url = get_settings().redis_timeout_s, get_mdms_settings().redis_url()
        client = clients.async_redis_cluster(url, timeout_s=timeout,
                                             max_connections=get_settings().redis_max_connections)
        if client is None:
            client = aioredis.Redis.from_url(
                url, decode_responses=True, socket_timeout=timeout,
                socket_connect_timeout=timeout, health_check_interval=30, retry_on_timeout=False,
            )
        found = _async[loop] = (client, client.register_script(hot_scripts.INGEST))
    return found


def get_hot_redis_async() -> aioredis.Redis:
    """The hot tier's asyncio client of the running event loop."""
    return _async_ingest()[0]


async def ingest_one_async(meter_id: str, row: Row, now_s: float | None = None) -> IngestOutcome:
    """:func:`ingest_one` without blocking the event loop (same script, same keys)."""
    s = get_mdms_settings()
    ks, argv = ingest_args(meter_id, row, time.time() if now_s is None else now_s, s)
    client, script = _async_ingest()
    try:
        outcome = outcome_of(await script(keys=ks, args=argv))
        if outcome.status in _INDEXED:
            await _index_meters(client.pipeline(transaction=False), [meter_id]).execute()
    except redis.RedisError as exc:
        raise BackendUnavailable(f"hot store (Redis) failed during ingest: {exc}") from exc
    return outcome


_CHUNK = 2000

#: Outcomes after which the meter is (re)added to the zone-wide sets, see :func:`_index_meters`.
_INDEXED = ("accepted", "duplicate")


def _index_meters(pipe: Any, meter_ids: Sequence[str]) -> Any:
    """Queue on ``pipe`` the adds of ``meter_ids`` to the hot set and the set of every MDMS meter.

    These sets are zone-wide keys, so on Redis Cluster they live in other slots than the meter's
    keys, and the ingest script cannot write them. They are written after it, for an accepted
    reading and for a duplicate: if the function died between the script and this, the reading
    was never answered, so it comes again (QoS 1 redelivery, or the meter's retry) as a
    duplicate, and that adds the meter. SADD is idempotent; a meter is never in a set without
    a reading behind it (rejected readings add nothing).
    """
    if meter_ids:
        pipe.sadd(keys.MDMS_HOT_METERS, *meter_ids)
        pipe.sadd(keys.MDMS_METERS, *meter_ids)
        aggregates.mark_dirty(pipe, meter_ids)  # the same reasoning: metertwin.grid.aggregates
    return pipe


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    status: str  # accepted | duplicate | rejected
    quality: str | None = None
    estimated: int = 0
    rule: str | None = None
    reason: str | None = None


def _script(name: str, source: str) -> Any:
    return _scripts(get_mdms_settings().redis_url(), name, source)


@functools.cache
def _scripts(url: str, name: str, source: str) -> Any:
    return get_hot_redis().register_script(source)


def ingest_args(meter_id: str, row: Row, now_s: float, s: MdmsSettings) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of the ingest script for one validated reading."""
    member = row.encode().split("|")
    ks = [
        keys.mdms_intervals(meter_id), keys.mdms_sequences(meter_id), keys.mdms_latest(meter_id),
        keys.mdms_counters(meter_id), twin_keys.registry_entry(meter_id), *aggregates.ingest_keys(meter_id),
    ]
    argv = [
        member[0], member[1], member[2], member[3], member[4], member[5], member[6],
        str(s.interval_ms), str(int((now_s - s.horizon_s) * 1000)), str(int(s.estimation_max_gap_s * 1000)),
        repr(s.max_demand_kw * 1000), "1" if s.require_registered_meter else "0", meter_id,
        *aggregates.ingest_args(),
    ]
    return ks, argv


def outcome_of(raw: Sequence[Any]) -> IngestOutcome:
    status = str(raw[0])
    if status == "accepted":
        return IngestOutcome("accepted", quality=str(raw[1]), estimated=int(raw[2]))
    if status == "duplicate":
        return IngestOutcome("duplicate")
    return IngestOutcome("rejected", rule=str(raw[1]), reason=str(raw[2]))


def ingest_many(items: Sequence[tuple[str, Row]], now_s: float | None = None) -> list[IngestOutcome]:
    """Run the ingest script for each ``(meter_id, row)`` in order, pipelined (one round trip per chunk)."""
    s = get_mdms_settings()
    now = time.time() if now_s is None else now_s
    script = _script("ingest", hot_scripts.INGEST)
    out: list[IngestOutcome] = []
    try:
        for start in range(0, len(items), _CHUNK):
            pipe = get_hot_redis().pipeline(transaction=False)
            chunk = items[start:start + _CHUNK]
            for meter_id, row in chunk:
                ks, argv = ingest_args(meter_id, row, now, s)
                script(keys=ks, args=argv, client=pipe)
            done = [outcome_of(r) for r in pipe.execute()]
            seen = {m: None for (m, _row), o in zip(chunk, done, strict=True) if o.status in _INDEXED}
            _index_meters(get_hot_redis().pipeline(transaction=False), list(seen)).execute()
            out.extend(done)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"hot store (Redis) failed during ingest: {exc}") from exc
    return out


def ingest_one(meter_id: str, row: Row, now_s: float | None = None) -> IngestOutcome:
    s = get_mdms_settings()
    ks, argv = ingest_args(meter_id, row, time.time() if now_s is None else now_s, s)
    try:
        outcome = outcome_of(_script("ingest", hot_scripts.INGEST)(keys=ks, args=argv))
        if outcome.status in _INDEXED:
            _index_meters(get_hot_redis().pipeline(transaction=False), [meter_id]).execute()
    except redis.RedisError as exc:
        raise BackendUnavailable(f"hot store (Redis) failed during ingest: {exc}") from exc
    return outcome


def rows(meter_id: str, from_ms: int, to_ms: int) -> list[tuple[str, Row]]:
    """Hot rows with ``from_ms <= ts_ms <= to_ms``, as (member, row), in time order."""
    try:
        members = cast(list[str], get_hot_redis().zrangebyscore(keys.mdms_intervals(meter_id), from_ms, to_ms))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"hot store (Redis) failed: {exc}") from exc
    return [(m, Row.decode(m)) for m in members]


def edit(
    meter_id: str, row: Row, *, expected_old: str, old_text: str, who: str, reason: str, now_s: float
) -> list[Any]:
    s = get_mdms_settings()
    ks = [keys.mdms_intervals(meter_id), keys.mdms_latest(meter_id), keys.mdms_counters(meter_id),
          keys.mdms_audit(meter_id)]
    argv = [str(row.ts_ms), expected_old, row.encode(), repr(row.import_kwh), repr(row.export_kwh), who, reason,
            repr(now_s), str(s.interval_ms), str(int(s.estimation_max_gap_s * 1000)), meter_id, old_text]
    try:
        res = cast(list[Any], _script("edit", hot_scripts.EDIT)(keys=ks, args=argv))
        if res and res[0] == "ok":
            # After the edit, as for ingest: a crash in between leaves an edited row the archive
            # visits with the meter's next reading (or its retried edit, which conflicts harmlessly).
            get_hot_redis().sadd(keys.MDMS_HOT_METERS, meter_id)
        return res
    except redis.RedisError as exc:
        raise BackendUnavailable(f"hot store (Redis) failed during edit: {exc}") from exc


def trim(meter_id: str, members: Sequence[str]) -> int:
    """Remove exactly these members (rows changed since the snapshot stay), chunked; returns rows removed.

    A meter left with no hot row leaves the hot set (:func:`_forget_if_empty`).
    """
    script = _script("trim", hot_scripts.TRIM)
    removed, left = 0, 1
    ks = [keys.mdms_intervals(meter_id)]
    for start in range(0, max(1, len(members)), _CHUNK):
        n, left = script(keys=ks, args=[meter_id, *members[start:start + _CHUNK]])
        removed += int(n)
    if not int(left):
        _forget_if_empty(meter_id)
    return removed


def _forget_if_empty(meter_id: str) -> None:
    """Take a meter out of the hot set once its rows are gone, without losing a racing ingest.

    The set and the rows are two slots on Redis Cluster, so not one script: remove, then look
    again and put the meter back if a row arrived meanwhile. An ingest adds the meter after its
    script (:func:`_index_meters`), so in every interleaving a meter with hot rows ends in the set.
    """
    r = get_hot_redis()
    r.srem(keys.MDMS_HOT_METERS, meter_id)
    if r.zcard(keys.mdms_intervals(meter_id)):
        r.sadd(keys.MDMS_HOT_METERS, meter_id)


def rehydrate(meter_id: str, members: Sequence[str]) -> int:
    """Copy cold rows back into the hot tier where no hot row has their timestamp."""
    script = _script("rehydrate", hot_scripts.REHYDRATE)
    added = 0
    ks = [keys.mdms_intervals(meter_id)]
    for start in range(0, len(members), _CHUNK):
        added += int(script(keys=ks, args=[meter_id, *members[start:start + _CHUNK]]))
    if added:
        get_hot_redis().sadd(keys.MDMS_HOT_METERS, meter_id)
    return added


def known_meter(meter_id: str) -> bool:
    """A meter is known if the MDMS has data of it or the registry lists it."""
    r = get_hot_redis()
    pipe = r.pipeline(transaction=False)
    pipe.sismember(keys.MDMS_METERS, meter_id)
    pipe.exists(twin_keys.registry_entry(meter_id))
    try:
        in_mdms, registered = pipe.execute()
    except redis.RedisError as exc:
        raise BackendUnavailable(f"hot store (Redis) failed: {exc}") from exc
    return bool(in_mdms) or bool(registered)
