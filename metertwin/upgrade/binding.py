"""Versioned twins: which release of its capabilities serves a meter, and how calls reach it.

This is the upgrade capability's named interface to the twin (with :mod:`metertwin.upgrade.inbox`
for readings): the read functions check a meter's binding with :func:`bound_reading` or
:func:`require_bound` and answer through :func:`serve`.

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
* **MQTT readings**: parked for the bound release and drained by it, see :mod:`metertwin.upgrade.inbox`.
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

from metertwin.core.clients import StrRedis, get_http, get_redis
from metertwin.core.errors import BackendUnavailable, Conflict, UnknownMeter
from metertwin.core.http import Context, Event, Response, Router, exception_response, json_response
from metertwin.core.settings import get_settings
from metertwin.twin import keys as twin_keys
from metertwin.upgrade import keys

# httpx logs every request at INFO: one line per nudge and per forward would drown the function log.
logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))

#: The release of a twin whose hash has no ``b`` field: every twin provisioned before versioning.
DEFAULT_RELEASE = "v1"
#: Set on a forwarded call; the receiving version answers it itself (one hop at most).
FORWARDED_HEADER = "X-Twin-Forwarded"
#: Set on every response that went through a forward: the release that answered.
BINDING_HEADER = "X-Twin-Binding"
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
    """``router.dispatch``; a :class:`BindingMoved` answer is forwarded to the bound version once.

    Never raises, like ``dispatch``: an exception leaving ``handle`` is Flask's HTML 500 under
    the real python3-http template, so every error is answered as its JSON error body.
    """
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
    """Call ``function`` through the gateway with the same method, path, query, headers and body.

    Never raises (it runs outside ``Router.dispatch``): a :class:`MeterTwinError` is answered
    as its JSON error body (503 when the bound version cannot be reached), anything else as
    the JSON 500 that ``dispatch`` gives a bug.
    """
    try:
        return _forward(event, function, bound, via=via)
    except Exception as exc:  # outside dispatch: answer as the handler boundary does
        return exception_response(exc, event)


def _forward(event: Event, function: str, bound: str, *, via: str) -> Response:
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
