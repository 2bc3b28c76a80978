"""Readings of versioned twins: apply if the meter is bound here, else park and nudge the bound release.

This is the upgrade capability's named interface to the twin's ingest (with
:mod:`metertwin.upgrade.binding` for calls): :mod:`metertwin.twin.uplink` and the ingest
functions apply readings through a release's :class:`IngestScript` and add the drain routes
with :func:`register_inbox_route`.

One function is subscribed to the meters' readings (the *front*, ``edge-ingest``). Its Lua
script applies a reading only if the meter is bound to the front's version, atomically with
the binding check; otherwise it parks the reading in the meter's inbox (``keys.upgrade_inbox``)
in the same script and nudges the bound version through the gateway's durable
``/async-function`` queue. The bound version drains the inbox (in seq order, deduplicated by
seq) before anything else it applies, and a switch between versions drains it as part of the
flip. So every reading is applied exactly once, by the version bound at the moment it is
applied, even while the binding changes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from metertwin.core.clients import StrRedis, get_http, get_redis
from metertwin.core.errors import BackendUnavailable, UnknownMeter
from metertwin.core.http import Request, Response, Router, json_response
from metertwin.fleet import status as fleet_status
from metertwin.stream import events
from metertwin.twin import keys as twin_keys
from metertwin.upgrade import keys
from metertwin.upgrade.binding import DEFAULT_RELEASE, binding_settings, function_for

log = logging.getLogger("metertwin.binding")

#: ``seq`` value that means "no new reading: only drain the inbox".
DRAIN_ONLY = -2

#: Status of a concentrator's reading for a meter not assigned to it (nothing written).
NOT_ASSIGNED = -3

#: Readings this far behind the newest one are taken as already applied (see ``fresh`` below).
SEQ_WINDOW = 32

#: Lua helpers shared by every release's ingest script: the parked member ``seq|json``; the
#: twin's reading dedupe (``fresh``), shared by every release so that a reading applied by one
#: is a duplicate for the next; and the base release's measurement update.
#:
#: ``fresh`` keeps, beside the highest seq ``s``, which of the 32 seqs up to ``s`` were applied
#: (twin hash field ``sw`` = ``"<s>:<bitmask>"``): a reading that arrives after a newer one (a
#: meter flushing its buffer through several connector workers) is applied, not taken for a
#: duplicate. A twin without ``sw`` (or whose ``s`` was moved by another writer) counts every
#: seq up to ``s`` as applied, the rule it had before.
LUA_COMMON = f"""
local function parked(member)
  local bar = string.find(member, '|', 1, true)
  return tonumber(string.sub(member, 1, bar - 1)), string.sub(member, bar + 1)
end
local function fresh(twin, seq)
  if seq < 0 then return true end
  local s = tonumber(redis.call('HGET', twin, 's') or '-1')
  local mask = -1
  local sw = redis.call('HGET', twin, 'sw')
  if sw then
    local at = string.find(sw, ':', 1, true)
    if at and tonumber(string.sub(sw, 1, at - 1)) == s then mask = tonumber(string.sub(sw, at + 1)) end
  end
  if seq > s then
    local shift = seq - s
    if shift >= {SEQ_WINDOW} then mask = 1 else mask = bit.bor(bit.lshift(mask, shift), 1) end
    redis.call('HSET', twin, 's', seq, 'sw', seq .. ':' .. mask)
    return true
  end
  local i = s - seq
  if i >= {SEQ_WINDOW} then return false end
  local b = bit.lshift(1, i)
  if bit.band(mask, b) ~= 0 then return false end
  redis.call('HSET', twin, 'sw', s .. ':' .. bit.bor(mask, b))
  return true
end
local function v1_measure(twin, mjson, ts)
  local cur = redis.call('HGET', twin, 'm')
  if (not cur) or cjson.decode(cur)['ts'] <= ts then redis.call('HSET', twin, 'm', mjson) end
  redis.call('HINCRBY', twin, 'v', 1)
end
local function v1_apply(twin, mjson, ts, seq)
  if not fresh(twin, seq) then return 0 end
  v1_measure(twin, mjson, ts)
  return 1
end
"""


def ingest_script(release: str, apply_lua: str, extra_keys: int) -> str:
    """The ingest script of one release.

    KEYS: twin, inbox, switch, then ``extra_keys`` release-specific keys (as ``KEYS[4..]``).
    ARGV: measurement JSON, ts, seq (``DRAIN_ONLY``: none), parked member, and, for a reading from
    a concentrator's batch, the concentrator's id (the meter must be assigned to it).
    ``apply_lua`` defines ``local function apply(mjson, ts, seq)`` returning 1 applied, 0 duplicate.
    Returns ``{status, twin version, bound release, applied count}``: status 1 applied,
    0 duplicate, 2 parked for the bound release, -1 no twin, ``NOT_ASSIGNED`` (-3) the meter is
    not behind the concentrator named in ARGV[5].
    """
    del extra_keys  # documented in KEYS; Lua sees them all
    return LUA_COMMON + apply_lua + f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {{-1, 0, '', 0}} end
-- From a concentrator's batch: only for a meter assigned to it, checked with the reading.
if ARGV[5] and ARGV[5] ~= '' and redis.call('HGET', KEYS[1], '{twin_keys.ROUTE_FIELD}') ~= ARGV[5] then
  return {{{NOT_ASSIGNED}, 0, '', 0}}
end
local bound = redis.call('HGET', KEYS[1], 'b') or '{DEFAULT_RELEASE}'
local seq = tonumber(ARGV[3])
if bound ~= '{release}' then
  if seq >= 0 then redis.call('ZADD', KEYS[2], seq, ARGV[4]) end
  return {{2, 0, bound, 0}}
end
local n = 0
-- Readings parked for this release while their nudge was on its way: first, in seq order.
if redis.call('EXISTS', KEYS[2]) == 1 then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    local pseq, pjson = parked(member)
    n = n + apply(pjson, cjson.decode(pjson)['ts'], pseq)
  end
  redis.call('DEL', KEYS[2])
end
local status = 0
if seq ~= {DRAIN_ONLY} then status = apply(ARGV[1], tonumber(ARGV[2]), seq) end
-- Only readings (seq >= 0) are counted: a live read's measurement is no reading.
if seq >= 0 then n = n + status end
if n > 0 and redis.call('EXISTS', KEYS[3]) == 1 then redis.call('HINCRBY', KEYS[3], 'n:{release}', n) end
return {{status, tonumber(redis.call('HGET', KEYS[1], 'v')), bound, n}}
"""


V1_APPLY = """
local function apply(mjson, ts, seq) return v1_apply(KEYS[1], mjson, ts, seq) end
"""


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """What happened to one reading: ``applied``, ``duplicate`` or ``parked`` (for ``bound``)."""

    result: str
    version: int
    bound: str
    drained: int = 0
    nudged: bool = False

    def to_dict(self, meter_id: str, seq: int | None) -> dict[str, Any]:
        out: dict[str, Any] = {"meter_id": meter_id, "result": self.result, "version": self.version}
        if seq is not None:
            out["seq"] = seq
        if self.result in ("parked", "moved"):
            out["bound"] = self.bound
            out["nudged"] = self.nudged
        if self.drained:
            out["drained"] = self.drained
        return out


class IngestScript:
    """One release's ingest script, registered once per Redis client."""

    def __init__(self, client: StrRedis, release: str, source: str, key_fns: tuple[Any, ...] = ()) -> None:
        self.client = client
        self.release = release
        self._script = client.register_script(source)
        self._key_fns = key_fns
        #: Whether applied readings update the fleet's last-reading index (off: benchmarks only).
        self.index_live = True

    def _keys(self, meter_id: str) -> list[str]:
        return [twin_keys.twin(meter_id), keys.upgrade_inbox(meter_id), keys.upgrade_switch(meter_id),
                *(fn(meter_id) for fn in self._key_fns)]

    def run(self, meter_id: str, measurement_json: str, ts: float, seq: int,
            authorization: str | None = None) -> IngestOutcome:
        """Apply one reading (or, with ``seq=DRAIN_ONLY``, only what is parked) if bound here; else park it."""
        member = f"{seq}|{measurement_json}"
        try:
            status, version, bound, n = self._script(keys=self._keys(meter_id),
                                                     args=[measurement_json, repr(ts), seq, member])
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable applying a reading of {meter_id!r}: {exc}") from exc
        if status == -1:
            raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)
        drained = max(0, int(n) - (1 if status == 1 and seq >= 0 else 0))
        if status == 2:
            if seq == DRAIN_ONLY:
                # Bound elsewhere by now: the flip drained the inbox, unless a reading was parked since.
                nudged = self._has_inbox(meter_id) and park_and_nudge(self.client, meter_id, str(bound), authorization)
                return IngestOutcome("moved", int(version), str(bound), 0, nudged)
            nudged = park_and_nudge(self.client, meter_id, str(bound), authorization)
            return IngestOutcome("parked", int(version), str(bound), 0, nudged)
        if seq == DRAIN_ONLY:
            return IngestOutcome("drained", int(version), str(bound), drained)
        if status == 1 and seq >= 0:
            if self.index_live:
                fleet_status.record_readings(self.client, [(meter_id, ts)])
            events.reading_applied(self.client, meter_id, measurement_json, seq)
        return IngestOutcome("applied" if status == 1 else "duplicate", int(version), str(bound), drained)

    def run_many(self, readings: list[tuple[str, str, float, int, str]],
                 authorization: str | None = None) -> list[dict[str, Any]]:
        """Apply ``(meter_id, measurement JSON, ts, seq, concentrator)`` readings in one pipelined round trip.

        Each reading runs its meter's script (one hash tag each: a Redis Cluster pipeline groups
        them by slot), so each is applied, counted a duplicate, parked or refused on its own and
        atomically; a crash part-way leaves whole readings applied, and the redelivered batch finds
        them duplicates. ``concentrator`` (or ``''``): the reading came in its batch, so it is
        applied only if the meter is assigned to it (``not_assigned`` otherwise). Returns one
        :meth:`IngestOutcome.to_dict` per reading, in order, or a ``"result": "rejected"`` dict with rule and reason.
        """
        pipe = self.client.pipeline(transaction=False)
        for meter_id, mjson, ts, seq, concentrator in readings:
            self._script(keys=self._keys(meter_id), args=[mjson, repr(ts), seq, f"{seq}|{mjson}", concentrator],
                         client=pipe)
        try:
            results = pipe.execute(raise_on_error=False) if readings else []
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable applying a batch of {len(readings)} readings: {exc}") from exc
        out: list[dict[str, Any]] = []
        applied: list[events.Event] = []
        fresh: list[tuple[str, float]] = []
        for (meter_id, mjson, ts, seq, concentrator), result in zip(readings, results, strict=True):
            if isinstance(result, Exception):
                # Nothing of a failed script is written: the whole message is retried (503).
                raise BackendUnavailable(f"Redis failed applying a reading of {meter_id!r}: {result}")
            status, version, bound, n = result
            if status == -1:
                out.append({"meter_id": meter_id, "seq": seq, "result": "rejected", "rule": "unknown_meter",
                            "reason": f"meter {meter_id!r} has no twin in this zone"})
                continue
            if status == NOT_ASSIGNED:
                out.append({"meter_id": meter_id, "seq": seq, "result": "rejected", "rule": "not_assigned",
                            "reason": f"meter {meter_id!r} is not assigned to concentrator {concentrator!r}"})
                continue
            drained = max(0, int(n) - (1 if status == 1 else 0))
            if status == 2:
                nudged = park_and_nudge(self.client, meter_id, str(bound), authorization)
                out.append(IngestOutcome("parked", int(version), str(bound), 0, nudged).to_dict(meter_id, seq))
                continue
            if status == 1:
                applied.append(events.reading_event(meter_id, mjson, seq))
                fresh.append((meter_id, ts))
            outcome = IngestOutcome("applied" if status == 1 else "duplicate", int(version), str(bound), drained)
            out.append(outcome.to_dict(meter_id, seq))
        if self.index_live:  # the fleet's last-reading index: one script call for the batch
            fleet_status.record_readings(self.client, fresh)
        events.emit(self.client, *applied)
        return out

    def drain_many(self, meter_ids: list[str]) -> tuple[int, list[tuple[str, str]]]:
        """Drain the inboxes of ``meter_ids`` in one pipeline; returns (applied, [(meter, bound elsewhere)])."""
        pipe = self.client.pipeline(transaction=False)
        for meter_id in meter_ids:
            self._script(keys=self._keys(meter_id), args=["{}", "0", DRAIN_ONLY, ""], client=pipe)
        try:
            results = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable draining inboxes: {exc}") from exc
        applied = 0
        moved: list[tuple[str, str]] = []
        for meter_id, result in zip(meter_ids, results, strict=True):
            if isinstance(result, Exception):
                log.warning("draining the inbox of %s failed: %s", meter_id, result)
                continue
            status, _version, bound, n = result
            if status == 2:
                moved.append((meter_id, str(bound)))
            elif status != -1:
                applied += int(n)
        return applied, moved

    def _has_inbox(self, meter_id: str) -> bool:
        try:
            return bool(self.client.exists(keys.upgrade_inbox(meter_id)))
        except redis.RedisError:
            return True


def park_and_nudge(client: StrRedis, meter_id: str, bound: str, authorization: str | None) -> bool:
    """Index the parked reading for ``bound``'s drainer; nudge the drainer unless one is on its way.

    One drainer per release at a time (``keys.upgrade_drainer``, set with NX) empties every
    indexed inbox in pipelined batches, so a reading costs its park and a share of a batch,
    not a call of its own. The index is written before the flag is tried: a drainer that is
    finishing re-checks the index after clearing the flag, so no parked reading waits for
    the next one. Returns True if this call nudged.
    """
    pipe = client.pipeline(transaction=False)
    pipe.sadd(keys.upgrade_inboxes(bound), meter_id)
    pipe.set(keys.upgrade_drainer(bound), "nudged", nx=True, px=keys.UPGRADE_DRAINER_TTL_MS)
    try:
        _, first = pipe.execute()
    except redis.RedisError as exc:
        # The reading is parked (same script): the manager's sweep or the next reading drains it.
        log.warning("could not index the inbox of %s: %s", meter_id, exc)
        return False
    if not first:
        return False
    if nudge(bound, authorization):
        return True
    # Not queued: let the next park try again rather than wait for the flag to expire.
    with contextlib.suppress(redis.RedisError):
        client.delete(keys.upgrade_drainer(bound))
    return False


def nudge(release: str, authorization: str | None, capability: str = "ingest") -> bool:
    """``POST /async-function/<release's ingest>/inboxes`` (durable); False if it could not be queued."""
    settings = binding_settings()
    if settings.gateway_url is None:
        return False
    function = function_for(capability, release)
    headers = {"Authorization": authorization} if authorization else {}
    try:
        resp = get_http().post(f"{settings.gateway_url}/async-function/{function}/inboxes",
                               headers=headers, timeout=settings.nudge_timeout_s)
    except httpx.HTTPError as exc:
        log.warning("nudging %s failed: %s; the manager's sweep drains its inboxes", function, exc)
        return False
    if resp.status_code != 202:
        log.warning("nudging %s answered %d: %s", function, resp.status_code, resp.text[:200])
        return False
    return True


def drain_inboxes(script: IngestScript, *, budget_s: float, authorization: str | None = None,
                  batch: int = 500, holds_flag: bool = True, poll_s: float = 0.02,
                  linger_s: float = 1.0) -> dict[str, int]:
    """Drain every inbox indexed for ``script``'s release until none is left or ``budget_s`` is spent.

    Under steady parking the drainer stays: it polls the index every ``poll_s`` and leaves
    once it has been empty for ``linger_s`` (a drainer per reading would cost more than the
    readings). ``holds_flag``: called as the nudged drainer (it clears the flag when done, then
    looks once more, see :func:`park_and_nudge`); the manager's sweep passes False.
    """
    client, release = script.client, script.release
    index, flag = keys.upgrade_inboxes(release), keys.upgrade_drainer(release)
    deadline = time.monotonic() + budget_s
    totals = {"meters": 0, "applied": 0, "moved": 0}
    idle_since: float | None = None
    while True:
        try:
            ids = client.spop(index, batch) or []
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable reading the inbox index: {exc}") from exc
        now = time.monotonic()
        if ids:
            idle_since = None
            applied, moved = script.drain_many(list(ids))
            totals["meters"] += len(ids)
            totals["applied"] += applied
            totals["moved"] += len(moved)
            for meter_id, bound in moved:  # rebound while parked: the new release's drainer takes it
                if script._has_inbox(meter_id):
                    park_and_nudge(client, meter_id, bound, authorization)
        else:
            idle_since = idle_since if idle_since is not None else now
        out_of_time = now >= deadline
        idle = 0.0 if idle_since is None else now - idle_since
        if holds_flag and not out_of_time and (ids or idle < linger_s):
            if len(ids) < batch:
                time.sleep(poll_s)  # pacing of the poll, not a wait for a condition
            continue
        if not holds_flag:
            if ids and not out_of_time:
                continue
            return totals
        try:
            client.delete(flag)
            if not client.scard(index):
                return totals
            if not client.set(flag, "draining", nx=True, px=keys.UPGRADE_DRAINER_TTL_MS):
                return totals  # another drainer was nudged meanwhile
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        if out_of_time:
            # Out of time with work left: hand over to a fresh call rather than hold a thread.
            if not nudge(release, authorization):
                client.delete(flag)
            return totals
        idle_since = None


_v1_scripts: dict[int, IngestScript] = {}


def v1_ingest(client: StrRedis) -> IngestScript:
    """The base release's ingest script for ``client``."""
    script = _v1_scripts.get(id(client))
    if script is None or script.client is not client:
        script = _v1_scripts[id(client)] = IngestScript(
            client, DEFAULT_RELEASE, ingest_script(DEFAULT_RELEASE, V1_APPLY, 0)
        )
    return script


#: How long one nudged drainer call runs at most before handing over to a fresh call.
DRAIN_BUDGET_S = 10.0


def register_inbox_route(router: Router, scripts: Any) -> None:
    """Add the drain routes (service scope) of a release's ingest function.

    * ``POST /inboxes`` — the nudged drainer: every inbox indexed for this release.
    * ``POST /meters/{meter_id}/inbox`` — one meter's inbox.

    ``scripts(client)`` returns the release's :class:`IngestScript`.
    """

    def drain_all(req: Request) -> Response:
        script: IngestScript = scripts(get_redis())
        totals = drain_inboxes(script, budget_s=DRAIN_BUDGET_S, authorization=req.header("Authorization"))
        return json_response({"release": script.release, **totals, "elapsed_ms": req.elapsed_ms()})

    def drain_one(req: Request) -> Response:
        meter_id = req.params["meter_id"]
        script: IngestScript = scripts(get_redis())
        outcome = script.run(meter_id, "{}", 0.0, DRAIN_ONLY, req.header("Authorization"))
        return json_response(outcome.to_dict(meter_id, None))

    router.post("/inboxes", scopes={"service"})(drain_all)
    router.post("/meters/{meter_id}/inbox", scopes={"service"})(drain_one)
