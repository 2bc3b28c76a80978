"""Aggregation up the grid tree as readings arrive: the interface the MDMS ingest calls.

Two steps, each in one Redis Cluster slot, in a crash-safe order:

1. **In the MDMS ingest script** (meter slot; :data:`agg_scripts.INGEST_TAIL`): an accepted
   reading updates the meter's latest power/voltage and appends an *outbox entry* numbered
   ``n`` (per meter, +1 each): the node operations (``set`` on each node of the meter's place,
   ``leave`` on nodes it was counted under before a move), its latest values, the energy deltas
   per interval (from the reading's neighbours in time) and the reading's interval and voltage.
   It is the same atomic step as the interval row: an accepted reading always has its entry, a
   duplicate (which the MDMS answers ``duplicate``) never gets a second one. The meter is then
   added to the ``DIRTY`` set (zone-wide slot) with the MDMS's own sets, after the script; a
   crash in between leaves an entry that the meter's next reading (or the redelivery) marks.
2. **The drain** (:func:`drain`; fog-grid's cron tick, or ``POST /drain``): reads the dirty
   meters' outboxes, groups the entries per node and runs one ``NODE`` script per node for the
   whole batch. A node keeps the last entry number applied per meter and skips anything not
   above it, so a drain that dies half way is simply run again. Then it acknowledges the
   entries (``METER ack``) and takes the meters off ``DIRTY`` (putting back any that got a new
   entry meanwhile).

Out of order: energy is computed from the reading's neighbours, so a late reading splits the
segment ``(pred, succ]`` into ``(pred, me]`` and ``(me, succ]``; the sum over intervals stays the
register difference. Latest values only move forward in time.

A moved meter (new place, :func:`set_place`) leaves its old nodes at once (its current power and
voltage, and its row in the reporting counts) and joins the new ones; energy of later readings
goes to the new nodes. History already recorded stays where it was.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis

from metertwin.core.errors import BackendUnavailable
from metertwin.grid import agg_scripts, keys
from metertwin.grid.settings import get_grid_settings

#: The Lua appended to the MDMS ingest script (needs its locals; see agg_scripts.INGEST_TAIL).
LUA_HELPERS = agg_scripts.LUA_GRID
INGEST_TAIL = agg_scripts.INGEST_TAIL
#: Meters drained per batch.
DRAIN_BATCH = 2000


def enabled() -> bool:
    """Whether the ingest aggregates (``GRID_AGGREGATION``)."""
    return get_grid_settings().enabled


def ingest_keys(meter_id: str) -> list[str]:
    """The grid keys the MDMS ingest script takes after its own (KEYS[6], KEYS[7])."""
    return [keys.meter_state(meter_id), keys.meter_outbox(meter_id)]


def ingest_args() -> list[str]:
    """ARGV[14], ARGV[15] of the MDMS ingest script: aggregate or not, the interval (ms)."""
    s = get_grid_settings()
    return ["1" if s.enabled else "0", str(s.interval_s * 1000)]


def mark_dirty(pipe: Any, meter_ids: Sequence[str]) -> Any:
    """Queue on ``pipe`` the add of these meters to the set the drain visits."""
    if meter_ids and enabled():
        pipe.sadd(keys.DIRTY, *meter_ids)
    return pipe


_scripts: dict[int, tuple[Any, Any, Any]] = {}


def _registered(client: Any) -> tuple[Any, Any]:
    found = _scripts.get(id(client))
    if found is None or found[0] is not client:
        found = _scripts[id(client)] = (client, client.register_script(agg_scripts.METER),
                                        client.register_script(agg_scripts.NODE))
    return found[1], found[2]


def _evalsha(pipe: Any, script: Any, ks: list[str], argv: list[str]) -> None:
    """EVALSHA queued on a pipeline without redis-py's SCRIPT EXISTS per execute (the caller loads once)."""
    pipe.evalsha(script.sha, len(ks), *ks, *argv)


def _node_keys(level: str, node: str) -> list[str]:
    return [keys.node_state(level, node), keys.node_meters(level, node), keys.node_seen(level, node),
            keys.node_voltage(level, node), keys.node_history(level, node), keys.node_buckets(level, node)]


def node_batches(outboxes: dict[str, list[str]]) -> tuple[dict[tuple[str, str], list[str]], dict[str, int]]:
    """Per node, the NODE script's ARGV (meter, op, entry string, for each entry touching it, in order);
    per meter, its top ``n``. Entries pass through as stored (see :mod:`metertwin.grid.agg_scripts`)."""
    out: dict[tuple[str, str], list[str]] = {}
    tops: dict[str, int] = {}
    for meter_id, box in outboxes.items():
        for raw in box:
            n, _ts, _pw, _v, ops, _parts = raw.split("|", 5)
            tops[meter_id] = max(tops.get(meter_id, 0), int(n))
            for op_text in ops.split(";"):
                level, node, op = op_text.split(",")
                out.setdefault((level, node), []).extend((meter_id, op, raw))
    return out, tops


def apply_outboxes(client: Any, outboxes: dict[str, list[str]], *, unmark: bool = False) -> int:
    """Apply these meters' outbox entries to their nodes, then acknowledge them; returns entries applied.

    ``unmark``: take the meters off ``DIRTY`` between the node updates and the acknowledgements,
    and put back those whose outbox still holds an entry after them (one that arrived meanwhile).
    """
    meter_script, node_script = _registered(client)
    batches, tops = node_batches(outboxes)
    if not tops:
        if unmark and outboxes:
            client.srem(keys.DIRTY, *outboxes)
        return 0
    now_ms = int(time.time() * 1000)

    def nodes(pipe: Any) -> None:
        for (level, node), argv in batches.items():
            _evalsha(pipe, node_script, _node_keys(level, node), [str(now_ms), *argv])
            pipe.zadd(keys.nodes(level), {node: now_ms / 1000}, nx=True)

    _run(client, nodes)  # every node first; only then the acknowledgements
    if unmark:
        client.srem(keys.DIRTY, *outboxes)

    def acks(pipe: Any) -> None:
        for m, top in tops.items():
            _evalsha(pipe, meter_script, ingest_keys(m), ["ack", str(top)])

    left = _run(client, acks)
    again = [m for m, n in zip(tops, left, strict=True) if int(n)]
    if unmark and again:
        client.sadd(keys.DIRTY, *again)
    return sum(len(box) for box in outboxes.values())


_loaded: set[int] = set()


def _run(client: Any, queue: Any) -> list[Any]:
    """Execute a pipeline of EVALSHAs, loading the scripts once per client (again after a SCRIPT FLUSH
    or a restart: the whole pipeline is then run again, which the scripts make harmless)."""
    for attempt in range(2):
        if id(client) not in _loaded or attempt:
            client.script_load(agg_scripts.NODE)
            client.script_load(agg_scripts.METER)
            _loaded.add(id(client))
        pipe = client.pipeline(transaction=False)
        queue(pipe)
        try:
            return list(pipe.execute())
        except redis.exceptions.NoScriptError:
            if attempt:
                raise
    return []


def drain(client: Any, *, max_meters: int = 100_000) -> dict[str, int]:
    """Apply every dirty meter's pending entries (in batches of :data:`DRAIN_BATCH`); bounded."""
    done = {"meters": 0, "entries": 0}
    try:
        while done["meters"] < max_meters:
            ids = client.srandmember(keys.DIRTY, min(DRAIN_BATCH, max_meters - done["meters"]))
            if not ids:
                break
            pipe = client.pipeline(transaction=False)
            for m in ids:
                pipe.zrange(keys.meter_outbox(m), 0, -1)
            outboxes = dict(zip(ids, pipe.execute(), strict=True))
            done["entries"] += apply_outboxes(client, outboxes, unmark=True)
            done["meters"] += len(ids)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"grid aggregation (Redis) failed: {exc}") from exc
    return done


def set_place(client: Any, meter_id: str, place: dict[str, str | None], version: int) -> bool:
    """Record the meter's place (``transformer``/``feeder``/``substation``/``region``) at ``version``.

    An older or equal version is ignored (places may arrive out of order). A newer one moves the
    meter's current contribution from its old nodes to the new ones at once (this meter's
    outbox is applied here). Returns whether the version was newer.
    """
    meter_script, _node = _registered(client)
    try:
        before = client.hget(keys.meter_state(meter_id), "p_v")
        left = meter_script(keys=ingest_keys(meter_id), args=["place", str(int(version)),
                                                              *[str(place.get(level) or "") for level in keys.LEVELS]])
        if int(left):
            apply_outboxes(client, {meter_id: client.zrange(keys.meter_outbox(meter_id), 0, -1)})
    except redis.RedisError as exc:
        raise BackendUnavailable(f"grid place of {meter_id!r} (Redis) failed: {exc}") from exc
    return before is None or int(before) < int(version)


def place_of(client: Any, meter_id: str) -> dict[str, Any]:
    """The fog's copy of the meter's place and its version (empty when none)."""
    raw = client.hgetall(keys.meter_state(meter_id))
    if "p_v" not in raw:
        return {}
    out: dict[str, Any] = {level: raw.get(f"p_{level}") or None for level in keys.LEVELS}
    out["v"] = int(raw["p_v"])
    return out
