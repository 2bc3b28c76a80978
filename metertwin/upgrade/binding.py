"""Versioned twins: which release of its capabilities serves a meter, and how calls reach it.

Every twin is bound to a *release* (``v1``, ``v2``, ...): the field ``b`` of its twin hash,
absent for the base release :data:`DEFAULT_RELEASE`. A release names, per capability, the
function that implements it (``keys.upgrade_release``; ``read`` -> ``read-v2``); releases
are deployed side by side as separate functions (``edge-read``, ``edge-read-v2``).

Calls reach the version the meter is bound to, whichever name they used:

* **HTTP** (apps calling ``/function/edge-read/meters/<id>/...``): a route of a versioned
  capability checks the binding in the same Redis round trip it already makes and raises
  :class:`BindingMoved`; :func:`serve` then forwards the call once, through the gateway, to
  the bound version's function (``X-Twin-Forwarded`` stops a second hop) and answers with
  its response. Clients that resolved the binding (``GET /function/edge-upgrade-manager/
  meters/<id>/binding``) call the versioned name directly and skip the hop.
* **MQTT readings**: one function is subscribed (the *front*, ``edge-ingest``). Its Lua
  script applies a reading only if the meter is bound to the front's version, atomically
  with the binding check; otherwise it parks the reading in the meter's inbox
  (``keys.upgrade_inbox``) in the same script and nudges the bound version through the
  gateway's durable ``/async-function`` queue. The bound version drains the inbox (in seq
  order, deduplicated by seq) before anything else it applies, and a switch between
  versions drains it as part of the flip. So every reading is applied exactly once, by the
  version bound at the moment it is applied, even while the binding changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import redis

from metertwin.core.clients import StrRedis, get_http, get_redis
from metertwin.core.errors import BackendUnavailable, Conflict, UnknownMeter
from metertwin.core.http import Context, Event, Request, Response, Router, json_response
from metertwin.core.settings import get_settings
from metertwin.twin import keys as twin_keys
from metertwin.upgrade import keys

log = logging.getLogger("metertwin.binding")
# httpx logs every request at INFO: one line per nudge and per forward would drown the function log.
logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))

#: The release of a twin whose hash has no ``b`` field: every twin provisioned before versioning.
DEFAULT_RELEASE = "v1"
#: Set on a forwarded call; the receiving version answers it itself (one hop at most).
FORWARDED_HEADER = "X-Twin-Forwarded"
#: Set on every response that went through a forward: the release that answered.
BINDING_HEADER = "X-Twin-Binding"
#: ``seq`` value that means "no new reading: only drain the inbox".
DRAIN_ONLY = -2
_HOP_BY_HOP = frozenset({"host", "content-length", "connection", "transfer-encoding", "keep-alive", "upgrade",
                         "te", "trailer", "proxy-authorization", "accept-encoding"})
_PASS_BACK = ("content-type", "etag", "x-twin-source", "cache-control", "location", "retry-after")


class BindingMoved(Conflict):
    """The meter is bound to another release than the function that was called."""

    code = "binding_moved"


# --- settings ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BindingSettings:
    """Read from the environment on use (cheap; only the forward and nudge paths need it)."""

    #: The zone's gateway, for forwards and nudges (on OpenFaaS: http://gateway.openfaas:8080).
    gateway_url: str | None
    #: Forwarded calls in flight per process: below the gateway's handler threads, so that a
    #: forward never waits for a thread that only forwards could free.
    forward_concurrency: int
    forward_slack_s: float
    nudge_timeout_s: float


def binding_settings() -> BindingSettings:
    env = os.environ
    return BindingSettings(
        gateway_url=(env.get("GATEWAY_URL") or "").rstrip("/") or None,
        forward_concurrency=max(1, int(env.get("BINDING_FORWARD_CONCURRENCY", "4"))),
        forward_slack_s=float(env.get("BINDING_FORWARD_SLACK_S", "5")),
        nudge_timeout_s=float(env.get("BINDING_NUDGE_TIMEOUT_S", "2")),
    )


# --- releases -----------------------------------------------------------------------------------
def function_for(capability: str, release: str, client: StrRedis | None = None) -> str:
    """The function (with zone prefix) implementing ``capability`` in ``release``.

    From the release's manifest in Redis (written by the upgrade manager; immutable once a
    twin is bound to it, so it is cached per process); without one, by naming convention:
    ``<zone>-<capability>`` for the base release, ``<zone>-<capability>-<release>`` otherwise.
    """
    zone = get_settings().zone
    name = _manifest_entry(client or get_redis(), release, capability)
    if name is None:
        name = capability if release == DEFAULT_RELEASE else f"{capability}-{release}"
    return f"{zone}-{name}"


#: (release, capability) -> function name; only found entries are kept (manifests are immutable).
_manifests: dict[tuple[str, str], str] = {}


def _manifest_entry(client: StrRedis, release: str, capability: str) -> str | None:
    found = _manifests.get((release, capability))
    if found is not None:
        return found
    try:
        value = client.hget(keys.upgrade_release(release), capability)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable reading release {release!r}: {exc}") from exc
    if value is None:
        return None
    _manifests[(release, capability)] = str(value)
    return str(value)


def moved(meter_id: str, bound: str, capability: str, called: str) -> BindingMoved:
    function = function_for(capability, bound)
    return BindingMoved(
        f"meter {meter_id!r} is bound to release {bound!r}, not {called!r}: call {function}",
        meter_id=meter_id, bound=bound, called=called, capability=capability, function=function,
    )


# --- reads: the binding check rides along the route's own round trip ----------------------------
def bound_reading(client: StrRedis, meter_id: str, release: str, capability: str = "read") -> tuple[int, Any]:
    """(twin version, last measurement JSON or None) if the meter is bound to ``release``."""
    try:
        version, measurement, bound = client.hmget(twin_keys.twin(meter_id), ("v", "m", "b"))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable reading twin {meter_id!r}: {exc}") from exc
    if version is None:
        raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)
    if (bound or DEFAULT_RELEASE) != release:
        raise moved(meter_id, bound or DEFAULT_RELEASE, capability, release)
    return int(version), measurement


def require_bound(client: StrRedis, meter_id: str, release: str, capability: str) -> None:
    """Raise :class:`BindingMoved` unless the meter is bound to ``release``."""
    try:
        exists, bound = client.hmget(twin_keys.twin(meter_id), ("v", "b"))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable reading twin {meter_id!r}: {exc}") from exc
    if exists is None:
        raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)
    if (bound or DEFAULT_RELEASE) != release:
        raise moved(meter_id, bound or DEFAULT_RELEASE, capability, release)


def bound_release(client: StrRedis, meter_id: str) -> str:
    try:
        exists, bound = client.hmget(twin_keys.twin(meter_id), ("v", "b"))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable reading twin {meter_id!r}: {exc}") from exc
    if exists is None:
        raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)
    return str(bound or DEFAULT_RELEASE)


# --- serving HTTP: answer, or forward once to the bound version --------------------------------
_forward_slots: threading.BoundedSemaphore | None = None
_forward_lock = threading.Lock()


def _slots() -> threading.BoundedSemaphore:
    global _forward_slots
    with _forward_lock:
        if _forward_slots is None:
            _forward_slots = threading.BoundedSemaphore(binding_settings().forward_concurrency)
        return _forward_slots


def serve(router: Router, event: Event, context: Context | None, *, capability: str, release: str) -> Response:
    """``router.dispatch``; a :class:`BindingMoved` answer is forwarded to the bound version once."""
    response = router.dispatch(event, context)
    if response.get("statusCode") != 409:
        return response
    body = response.get("body")
    if not isinstance(body, dict) or body.get("error") != BindingMoved.code:
        return response
    if event.headers.get(FORWARDED_HEADER):
        return response  # the binding moved again under a forwarded call: the caller retries
    details = body.get("details") or {}
    return forward(event, str(details.get("function")), str(details.get("bound")), via=f"{capability}@{release}")


def gateway_base(event: Event | None) -> str | None:
    base = binding_settings().gateway_url
    if base:
        return base
    host = event.headers.get("Host") if event is not None else None
    return f"http://{host}" if host else None


def forward(event: Event, function: str, bound: str, *, via: str) -> Response:
    """Call ``function`` through the gateway with the same method, path, query, headers and body."""
    base = gateway_base(event)
    if base is None:
        return json_response(
            {"error": BindingMoved.code, "message": f"the meter is bound to release {bound!r}: call {function} "
             "(set GATEWAY_URL so that calls are forwarded)", "details": {"bound": bound, "function": function}},
            409,
        )
    settings = binding_settings()
    timeout = _request_timeout(event.query) + settings.forward_slack_s
    slots = _slots()
    if not slots.acquire(timeout=timeout):
        raise BackendUnavailable(f"no forwarding slot free within {timeout} s (calls to {function} are queued)")
    try:
        headers = {k: v for k, v in event.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers[FORWARDED_HEADER] = via
        query = urlencode(list(event.query.items()))
        url = f"{base}/function/{function}{event.path or '/'}" + (f"?{query}" if query else "")
        try:
            resp = get_http().request(event.method, url, headers=headers, content=event.body or None,
                                      timeout=timeout)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"forwarding to {function} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        slots.release()
    out_headers = {name.title(): resp.headers[name] for name in _PASS_BACK if name in resp.headers}
    out_headers[BINDING_HEADER] = bound
    out_headers.setdefault("Content-Type", "application/json")
    return {"statusCode": resp.status_code, "body": resp.text, "headers": out_headers}


def _request_timeout(query: Mapping[str, str]) -> float:
    try:
        return min(30.0, max(0.05, float(query.get("timeout") or get_settings().meter_read_timeout_s)))
    except ValueError:
        return get_settings().meter_read_timeout_s


# --- ingest: apply if bound here, else park and nudge ---------------------------------------
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
    ARGV: measurement JSON, ts, seq (``DRAIN_ONLY``: none), parked member.
    ``apply_lua`` defines ``local function apply(mjson, ts, seq)`` returning 1 applied, 0 duplicate.
    Returns ``{status, twin version, bound release, applied count}``: status 1 applied,
    0 duplicate, 2 parked for the bound release, -1 no twin.
    """
    del extra_keys  # documented in KEYS; Lua sees them all
    return LUA_COMMON + apply_lua + f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {{-1, 0, '', 0}} end
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
        return IngestOutcome("applied" if status == 1 else "duplicate", int(version), str(bound), drained)

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
