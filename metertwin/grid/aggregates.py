"""Aggregation up the grid tree as readings arrive: the interface the MDMS ingest calls.

For each accepted reading the MDMS ingest script (meter slot) returns the reading's nearest
actual neighbours in time (``pred``, ``succ``). Then, in this order:

1. ``METER`` (meter slot, :mod:`metertwin.grid.agg_scripts`): updates the meter's latest
   power/voltage and appends an *outbox entry* numbered ``n`` (per meter, +1 each): the node
   operations (``set`` on every node of the meter's place, ``leave`` on nodes it was counted
   under before a move), its latest values, the energy deltas per interval and the reading's
   interval and voltage. It returns every entry not yet acknowledged.
2. ``NODE`` per entry and node (each node's own slot, one pipeline): applies an entry once: a
   node remembers the last ``n`` it applied per meter and skips anything not above it.
3. ``METER ack`` (meter slot): drops the entries up to the highest ``n`` applied.

Crash safety: a crash after 1 leaves entries in the outbox; the meter's next reading, or the
redelivery of this one (which the MDMS answers ``duplicate``: it only flushes the outbox), returns
them and 2 applies them; a node that had applied them already skips them (its ``n``). A crash
between the MDMS script and 1 loses this reading's energy segment and nothing else (the next
reading's latest values still arrive); it never double counts, because only an *accepted*
reading makes an entry and the MDMS accepts a reading once.

Out of order: energy is computed from the reading's neighbours, so a late reading splits the
segment ``(pred, succ]`` into ``(pred, me]`` and ``(me, succ]``: the sum over intervals stays the
register difference. Latest values only move forward in time. Duplicates add nothing.

A moved meter (new place, :func:`set_place`) leaves its old nodes at once (its current power and
voltage, and its row in the reporting counts) and joins the new ones; energy of later readings
goes to the new nodes. History already recorded stays where it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from metertwin.core.errors import BackendUnavailable
from metertwin.grid import agg_scripts, keys
from metertwin.grid.settings import get_grid_settings

#: (ts_ms, import_kwh, export_kwh) of a neighbouring actual reading.
Point = tuple[int, float, float]


@dataclass(frozen=True, slots=True)
class Aggregand:
    """One reading the MDMS has judged; ``fresh``: accepted now (False: a duplicate, flush only)."""

    meter_id: str
    ts_ms: int
    power_w: float
    voltage_v: float
    import_kwh: float
    export_kwh: float
    pred: Point | None = None
    succ: Point | None = None
    fresh: bool = True


def enabled() -> bool:
    """Whether the ingest aggregates (``GRID_AGGREGATION``)."""
    return get_grid_settings().enabled


_scripts: dict[int, tuple[Any, Any, Any]] = {}


def _registered(client: Any) -> tuple[Any, Any]:
    found = _scripts.get(id(client))
    if found is None or found[0] is not client:
        found = _scripts[id(client)] = (client, client.register_script(agg_scripts.METER),
                                        client.register_script(agg_scripts.NODE))
    return found[1], found[2]


def _pt(p: Point | None) -> list[str]:
    return [str(p[0]), repr(p[1]), repr(p[2])] if p else ["", "", ""]


def meter_call(a: Aggregand) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of the ``METER`` step for one reading."""
    ks = [keys.meter_state(a.meter_id), keys.meter_outbox(a.meter_id)]
    if not a.fresh:
        return ks, ["flush"]
    interval_ms = get_grid_settings().interval_s * 1000
    return ks, ["reading", str(a.ts_ms), repr(a.power_w), repr(a.voltage_v), repr(a.import_kwh),
                repr(a.export_kwh), *_pt(a.pred), *_pt(a.succ), str(interval_ms)]


def node_calls(meter_id: str, raw_entries: Sequence[str], now_ms: int) -> tuple[list[tuple[list[str], list[str]]], int]:
    """The ``NODE`` calls of a meter's outbox entries, in order, and the highest entry number."""
    calls: list[tuple[list[str], list[str]]] = []
    top = 0
    for raw in raw_entries:
        entry = json.loads(raw)
        n = int(entry["n"])
        top = max(top, n)
        cur = entry.get("cur") or [0, 0, 0]
        reading = entry.get("r")
        energy = [str(x) if i % 3 == 0 else repr(float(x))
                  for triple in entry.get("e") or [] for i, x in enumerate(triple)]
        for level, node, op in entry.get("ops") or []:
            ks = [keys.node_state(level, node), keys.node_meters(level, node), keys.node_seen(level, node),
                  keys.node_voltage(level, node), keys.node_history(level, node), keys.node_buckets(level, node)]
            argv = [meter_id, str(n), op, str(int(cur[0])), repr(float(cur[1])), repr(float(cur[2]))]
            if op == "set" and reading:
                argv += [str(int(reading[0])), repr(float(reading[1])), str(now_ms), *energy]
            else:
                argv += ["", "", str(now_ms)]
            calls.append((ks, argv))
    return calls, top


def _nodes_of(calls: Sequence[tuple[list[str], list[str]]]) -> set[tuple[str, str]]:
    out = set()
    for ks, argv in calls:
        if argv[2] == "set":
            tag = ks[0].split("{grid:", 1)[1].split("}", 1)[0]
            level, node = tag.split(":", 1)
            out.add((level, node))
    return out


def aggregate(client: Any, items: Sequence[Aggregand]) -> None:
    """Run the three steps for these readings (pipelined: three round trips for the whole batch)."""
    if not items:
        return
    meter_script, node_script = _registered(client)
    try:
        pipe = client.pipeline(transaction=False)
        for a in items:
            ks, argv = meter_call(a)
            meter_script(keys=ks, args=argv, client=pipe)
        outboxes: dict[str, list[str]] = {}
        for a, box in zip(items, pipe.execute(), strict=True):
            outboxes[a.meter_id] = box  # the last reply of a meter holds all its pending entries
        _apply(client, node_script, meter_script, outboxes)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"grid aggregation (Redis) failed: {exc}") from exc


def _apply(client: Any, node_script: Any, meter_script: Any, outboxes: dict[str, list[str]]) -> None:
    now_ms = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    tops: dict[str, int] = {}
    nodes: set[tuple[str, str]] = set()
    for meter_id, box in outboxes.items():
        if not box:
            continue
        calls, tops[meter_id] = node_calls(meter_id, box, now_ms)
        nodes |= _nodes_of(calls)
        for ks, argv in calls:
            node_script(keys=ks, args=argv, client=pipe)
    if not tops:
        return
    for level, node in nodes:
        pipe.zadd(keys.nodes(level), {node: now_ms / 1000}, nx=True)
    pipe.execute()
    ack = client.pipeline(transaction=False)
    for meter_id, top in tops.items():
        meter_script(keys=[keys.meter_state(meter_id), keys.meter_outbox(meter_id)], args=["ack", str(top)],
                     client=ack)
    ack.execute()


async def aggregate_async(client: Any, items: Sequence[Aggregand]) -> None:
    """:func:`aggregate` on an asyncio client."""
    if not items:
        return
    meter_script, node_script = _registered(client)
    now_ms = int(time.time() * 1000)
    try:
        outboxes: dict[str, list[str]] = {}
        for a in items:
            ks, argv = meter_call(a)
            outboxes[a.meter_id] = await meter_script(keys=ks, args=argv)
        pipe = client.pipeline(transaction=False)
        tops: dict[str, int] = {}
        nodes: set[tuple[str, str]] = set()
        for meter_id, box in outboxes.items():
            if box:
                calls, tops[meter_id] = node_calls(meter_id, box, now_ms)
                nodes |= _nodes_of(calls)
                for ks, argv in calls:
                    await node_script(keys=ks, args=argv, client=pipe)
        if not tops:
            return
        for level, node in nodes:
            pipe.zadd(keys.nodes(level), {node: now_ms / 1000}, nx=True)
        await pipe.execute()
        for meter_id, top in tops.items():
            await meter_script(keys=[keys.meter_state(meter_id), keys.meter_outbox(meter_id)], args=["ack", str(top)])
    except redis.RedisError as exc:
        raise BackendUnavailable(f"grid aggregation (Redis) failed: {exc}") from exc


def set_place(client: Any, meter_id: str, place: dict[str, str | None], version: int) -> bool:
    """Record the meter's place (``transformer``/``feeder``/``substation``/``region``) at ``version``.

    An older or equal version is ignored (places may arrive out of order). A newer one moves the
    meter's current contribution from its old nodes to the new ones at once. Returns whether the
    version was newer.
    """
    meter_script, node_script = _registered(client)
    ks = [keys.meter_state(meter_id), keys.meter_outbox(meter_id)]
    try:
        before = client.hget(keys.meter_state(meter_id), "p_v")
        box = meter_script(keys=ks, args=["place", str(int(version)),
                                          *[str(place.get(level) or "") for level in keys.LEVELS]])
        _apply(client, node_script, meter_script, {meter_id: box})
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
