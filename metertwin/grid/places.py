"""The fog's copy of each meter's place in the grid tree, following the edge topology.

The edge owns the topology (:mod:`metertwin.fleet.topology`: versioned, audited). The fog needs
each meter's transformer, feeder, substation and region to aggregate a reading without asking
the edge. Two ways in, both idempotent by the topology version ``v`` (an older or equal version
is ignored, so the order of arrival does not matter):

* ``PUT /places/{meter_id}`` on fog-grid (a push, e.g. from an integration);
* :func:`sync_from_edge` on each cron tick: reads the edge topology's audit stream after the
  last id copied (``GRID_EDGE_REDIS_URL``), at most ``GRID_PLACES_BATCH`` changes per call, and
  stores the new cursor only after applying them (a crash re-applies, which changes nothing).
  If the stream was trimmed past the cursor, it resyncs from every topology document.

A changed place moves the meter's current contribution at once (:func:`aggregates.set_place`).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import redis

from metertwin.core import clients
from metertwin.core.errors import BackendUnavailable
from metertwin.core.settings import get_settings
from metertwin.fleet.topology import TopologyStore, topology_store
from metertwin.grid import aggregates, keys
from metertwin.grid.settings import get_grid_settings


def path_of(doc: dict[str, Any] | None) -> dict[str, str | None]:
    return {level: (str(doc[level]) if doc and doc.get(level) else None) for level in keys.LEVELS}


def version_of(stream_id: str) -> int:
    """A stream id ``<ms>-<seq>`` as one increasing number, ``ms * 1000 + seq``: below 2**53, so exact
    in Lua's doubles (the place script compares versions) until the year 2255."""
    ms, _, seq = stream_id.partition("-")
    return int(ms) * 1000 + min(int(seq or 0), 999)


def version_now() -> int:
    """A version above every change copied so far (a push without its own version)."""
    return int(time.time() * 1000) * 1000 + 999


def apply(fog: Any, meter_id: str, doc: dict[str, Any] | None, version: int) -> bool:
    """Copy one topology document (None: removed) to the fog; returns whether it was newer."""
    return aggregates.set_place(fog, meter_id, path_of(doc), version)


@functools.cache
def _edge_client(url: str, timeout_s: float) -> Any:
    cluster = clients.redis_cluster(url, timeout_s=timeout_s, max_connections=8)
    if cluster is not None:
        return cluster
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s)


def edge_store() -> TopologyStore | None:
    url = get_grid_settings().edge_redis_url
    return topology_store(_edge_client(url, get_settings().redis_timeout_s)) if url else None


def sync_from_edge(fog: Any, store: TopologyStore | None = None) -> dict[str, Any]:
    """Copy the edge topology changes since the last call (bounded); returns what was done."""
    store = store or edge_store()
    if store is None:
        return {"skipped": "GRID_EDGE_REDIS_URL is not set"}
    try:
        cursor = fog.get(keys.PLACES_CURSOR) or "0"
        changes, gap = store.changes_after(cursor, count=get_grid_settings().places_batch)
        if gap:
            mark = store.last_change()
            moved = sum(apply(fog, meter, doc, version_of(mark)) for meter, doc in store.documents())
            fog.set(keys.PLACES_CURSOR, mark)
            return {"resync": True, "changed": moved, "cursor": mark}
        moved = 0
        for entry_id, meter, doc in changes:
            if meter:
                moved += apply(fog, meter, doc, version_of(entry_id))
            cursor = entry_id
        fog.set(keys.PLACES_CURSOR, cursor)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"place sync (Redis) failed: {exc}") from exc
    return {"changes": len(changes), "changed": moved, "cursor": cursor}
