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

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import redis

from metertwin import keys
from metertwin.clients import StrRedis, get_http, get_redis
from metertwin.errors import BackendUnavailable, Conflict, UnknownMeter
from metertwin.http import Context, Event, Request, Response, Router, json_response
from metertwin.settings import get_settings

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
        version, measurement, bound = client.hmget(keys.twin(meter_id), ("v", "m", "b"))
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
        exists, bound = client.hmget(keys.twin(meter_id), ("v", "b"))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable reading twin {meter_id!r}: {exc}") from exc
    if exists is None:
        raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)
    if (bound or DEFAULT_RELEASE) != release:
        raise moved(meter_id, bound or DEFAULT_RELEASE, capability, release)


def bound_release(client: StrRedis, meter_id: str) -> str:
    try:
        exists, bound = client.hmget(keys.twin(meter_id), ("v", "b"))
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
#: Lua helpers shared by every release's ingest script: parked member ``seq|json`` and the
#: base release's measurement update (what twin.MEASURE_LUA does, as a function).
LUA_COMMON = """
local function parked(member)
  local bar = string.find(member, '|', 1, true)
  return tonumber(string.sub(member, 1, bar - 1)), string.sub(member, bar + 1)
end
local function v1_apply(twin, mjson, ts, seq)
  if seq >= 0 then
    local last = tonumber(redis.call('HGET', twin, 's') or '-1')
    if seq <= last then return 0 end
    redis.call('HSET', twin, 's', seq)
  end
  local cur = redis.call('HGET', twin, 'm')
  if (not cur) or cjson.decode(cur)['ts'] <= ts then redis.call('HSET', twin, 'm', mjson) end
  redis.call('HINCRBY', twin, 'v', 1)
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

    def run(self, meter_id: str, measurement_json: str, ts: float, seq: int,
            authorization: str | None = None) -> IngestOutcome:
        keys_ = [keys.twin(meter_id), keys.upgrade_inbox(meter_id), keys.upgrade_switch(meter_id),
                 *(fn(meter_id) for fn in self._key_fns)]
        member = f"{seq}|{measurement_json}"
        try:
            status, version, bound, n = self._script(keys=keys_, args=[measurement_json, repr(ts), seq, member])
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable applying a reading of {meter_id!r}: {exc}") from exc
        if status == -1:
            raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)
        drained = max(0, int(n) - (1 if status == 1 and seq >= 0 else 0))
        if status == 2:
            if seq == DRAIN_ONLY:
                # Bound elsewhere by now: the flip drained the inbox, unless a reading was parked since.
                nudged = self._has_inbox(meter_id) and nudge(meter_id, str(bound), authorization)
                return IngestOutcome("moved", int(version), str(bound), 0, nudged)
            nudged = park_and_nudge(self.client, meter_id, str(bound), authorization)
            return IngestOutcome("parked", int(version), str(bound), 0, nudged)
        if seq == DRAIN_ONLY:
            self._forget_if_empty(meter_id)
            return IngestOutcome("drained", int(version), str(bound), drained)
        if drained:
            self._forget_if_empty(meter_id)
        return IngestOutcome("applied" if status == 1 else "duplicate", int(version), str(bound), drained)

    def _has_inbox(self, meter_id: str) -> bool:
        try:
            return bool(self.client.exists(keys.upgrade_inbox(meter_id)))
        except redis.RedisError:
            return True

    def _forget_if_empty(self, meter_id: str) -> None:
        try:
            if not self.client.exists(keys.upgrade_inbox(meter_id)):
                self.client.srem(keys.UPGRADE_INBOXES, meter_id)
        except redis.RedisError:
            log.warning("could not update the inbox index for %s", meter_id)


def park_and_nudge(client: StrRedis, meter_id: str, bound: str, authorization: str | None) -> bool:
    """Index the parked reading for the sweep, then ask the bound version to drain (durable async call)."""
    try:
        client.sadd(keys.UPGRADE_INBOXES, meter_id)
    except redis.RedisError as exc:
        # The reading is parked already (same script); the sweep finds it through the twin set too.
        log.warning("could not index the inbox of %s: %s", meter_id, exc)
    return nudge(meter_id, bound, authorization)


def nudge(meter_id: str, release: str, authorization: str | None, capability: str = "ingest") -> bool:
    """``POST /async-function/<bound ingest>/meters/<id>/inbox``; False if it could not be queued."""
    settings = binding_settings()
    if settings.gateway_url is None:
        return False
    function = function_for(capability, release)
    headers = {"Authorization": authorization} if authorization else {}
    try:
        resp = get_http().post(f"{settings.gateway_url}/async-function/{function}/meters/{meter_id}/inbox",
                               headers=headers, timeout=settings.nudge_timeout_s)
    except httpx.HTTPError as exc:
        log.warning("nudging %s for meter %s failed: %s; the sweep drains its inbox", function, meter_id, exc)
        return False
    if resp.status_code != 202:
        log.warning("nudging %s for meter %s answered %d: %s", function, meter_id, resp.status_code, resp.text[:200])
        return False
    return True


_v1_scripts: dict[int, IngestScript] = {}


def v1_ingest(client: StrRedis) -> IngestScript:
    """The base release's ingest script for ``client``."""
    script = _v1_scripts.get(id(client))
    if script is None or script.client is not client:
        script = _v1_scripts[id(client)] = IngestScript(
            client, DEFAULT_RELEASE, ingest_script(DEFAULT_RELEASE, V1_APPLY, 0)
        )
    return script


def register_inbox_route(router: Router, scripts: Any) -> None:
    """Add ``POST /meters/{meter_id}/inbox`` (service scope): drain the readings parked for this release.

    ``scripts(client)`` returns the release's :class:`IngestScript`. If the meter is bound
    elsewhere by now, the drain nudges the bound release instead (the flip drained the inbox).
    """

    def drain(req: Request) -> Response:
        meter_id = req.params["meter_id"]
        script: IngestScript = scripts(get_redis())
        outcome = script.run(meter_id, "{}", 0.0, DRAIN_ONLY, req.header("Authorization"))
        return json_response(outcome.to_dict(meter_id, None))

    router.post("/meters/{meter_id}/inbox", scopes={"service"})(drain)
