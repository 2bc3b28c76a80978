"""The OpenFaaS python3-http contract, and a small router for the handlers built on it.

A handler module exposes ``handle(event, context)``. ``event`` has ``body`` (bytes),
``headers`` (case-insensitive mapping), ``method``, ``query`` (mapping) and ``path``
(the part after ``/function/<name>``); the handler returns a dict with
``statusCode``, ``body`` and ``headers``. On OpenFaaS the template's Flask app
builds the event; locally our gateway does. Bodies must be ``dict`` (sent as JSON)
or ``str``: the template would turn ``bytes`` or a ``list`` into their Python repr.

The handler boundary: an exception that leaves ``handle`` becomes Flask's HTML 500 page
under the real template (the local gateway would answer JSON, hiding it). So
:meth:`Router.dispatch` and :func:`guard` (for a ``handle`` that does more than dispatch)
turn every exception, and every answer the template could not send as JSON or text, into
the JSON error body.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import redis
from pydantic import BaseModel, ValidationError

from metertwin.core import auth, json_limits
from metertwin.core.errors import (
    BackendUnavailable,
    InvalidInput,
    MeterTwinError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    http_status,
)
from metertwin.core.settings import get_settings

log = logging.getLogger("metertwin.http")

Response = dict[str, Any]
ModelT = TypeVar("ModelT", bound=BaseModel)

#: Meter ids become MQTT topic levels and Redis key parts: no ``/ + # { }`` or spaces.
METER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
JSON_HEADERS = {"Content-Type": "application/json"}


class Event(Protocol):
    body: bytes
    headers: Mapping[str, str]
    method: str
    query: Mapping[str, str]
    path: str


class Context(Protocol):
    hostname: str


def json_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response in the template's shape (a dict body is serialised by the server)."""
    return {"statusCode": status, "body": body, "headers": {**JSON_HEADERS, **(headers or {})}}


def text_response(text: str, status: int = 200, content_type: str = "text/plain") -> Response:
    return {"statusCode": status, "body": text, "headers": {"Content-Type": content_type}}


def error_response(exc: MeterTwinError) -> Response:
    response = json_response(exc.to_dict(), http_status(exc))
    if isinstance(exc, MethodNotAllowed) and exc.details.get("allowed"):
        # RFC 9110: a 405 names the methods the resource supports.
        response["headers"]["Allow"] = ", ".join(exc.details["allowed"])
    return response


#: What the caller sees for a bug; the traceback goes to the function's log.
INTERNAL_ERROR = {"error": "internal_error", "message": "internal error; see function logs"}
#: Lost connections that no capability turned into BackendUnavailable: still the backend's fault.
_BACKEND_ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


def _where(event: object) -> str:
    # Never let the error path itself raise: the event may be anything a caller built.
    return f"{getattr(event, 'method', '?')} {getattr(event, 'path', '?')}"


def exception_response(exc: Exception, event: object = None) -> Response:
    """The JSON answer for an exception that reached the handler boundary (never raises)."""
    try:
        if isinstance(exc, MeterTwinError):
            return error_response(exc)
        if isinstance(exc, _BACKEND_ERRORS):
            log.warning("backend unreachable in %s: %r", _where(event), exc)
            return error_response(BackendUnavailable(f"backend unreachable: {type(exc).__name__}"))
    except Exception:  # an error whose to_dict() fails is a bug like any other
        log.exception("could not build the error answer in %s", _where(event))
    log.error("unhandled error in %s", _where(event), exc_info=exc)
    return json_response(dict(INTERNAL_ERROR), 500)


def checked_response(response: Any, event: object = None) -> Response:
    """``response`` if the template sends it as JSON or text; a logged JSON 500 otherwise.

    The template sends only a ``dict`` body as JSON and ``str()`` of anything else, so a
    ``bytes`` or ``list`` body (or a non-dict answer) would reach the caller as Python repr.
    """
    if isinstance(response, dict) and isinstance(response.get("statusCode", 200), int):
        body = response.get("body", "")
        if type(body) is dict or isinstance(body, str):
            return response
    log.error("handler answered %s in %s: not a dict with a dict or str body", type(response).__name__,
              _where(event))
    return json_response(dict(INTERNAL_ERROR), 500)


HandleFn = Callable[[Any, Any], Response]


def guard(handle: HandleFn) -> HandleFn:
    """Wrap a python3-http ``handle`` so that no exception and no unsendable answer leaves it."""

    @functools.wraps(handle)
    def guarded(event: Any, context: Any) -> Response:
        try:
            response = handle(event, context)
        except Exception as exc:
            return exception_response(exc, event)
        return checked_response(response, event)

    return guarded


def validate_meter_id(meter_id: str) -> str:
    if not METER_ID_RE.match(meter_id):
        raise InvalidInput(
            f"meter id {meter_id!r} is not valid: 1-64 characters of letters, digits and _.:- "
            "starting with a letter or digit",
            field="meter_id",
        )
    return meter_id


def parse_json(body: bytes, model: type[ModelT], *, max_bytes: int | None = None) -> ModelT:
    """Parse and validate a JSON body; errors name the offending field and value."""
    limit = max_bytes if max_bytes is not None else get_settings().max_body_bytes
    if len(body) > limit:
        raise PayloadTooLarge(f"body of {len(body)} bytes exceeds the limit of {limit} bytes")
    if not body.strip():
        raise InvalidInput("request body is empty; expected a JSON object")
    try:
        data = json_limits.loads(body)  # nesting bounded: a 400 naming the depth, never RecursionError
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}") from None
    return validate(data, model)


def validate(data: Any, model: type[ModelT]) -> ModelT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc), errors=_errors(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        got = err.get("input")
        shown = json.dumps(got, default=str)[:80] if not isinstance(got, dict) else "{...}"
        parts.append(f"{where}: {err['msg']} (got {shown})")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()[:20]]


def query_float(query: Mapping[str, str], name: str, default: float, *, lo: float, hi: float) -> float:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {name}={raw!r} is not a number", field=name) from None
    if not lo <= value <= hi or value != value:
        raise InvalidInput(f"query parameter {name}={raw!r} is outside [{lo}, {hi}]", field=name)
    return value


def query_bool(query: Mapping[str, str], name: str) -> bool:
    raw = (query.get(name) or "").lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise InvalidInput(f"query parameter {name}={raw!r} is not a boolean (true/false)", field=name)


@dataclass(slots=True)
class Request:
    """What a route sees: the event, its path parameters and the verified caller."""

    event: Event
    params: dict[str, str]
    principal: auth.Principal | None
    started: float = field(default_factory=time.perf_counter)

    @property
    def query(self) -> Mapping[str, str]:
        return self.event.query

    def header(self, name: str) -> str | None:
        return self.event.headers.get(name)

    def json(self, model: type[ModelT]) -> ModelT:
        return parse_json(self.event.body, model)

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 3)


RouteFn = Callable[[Request], Response]


@dataclass(slots=True)
class _Route:
    method: str
    regex: re.Pattern[str]
    fn: RouteFn
    scopes: frozenset[str] | None


class Router:
    """Method + path routing inside one function, with auth per route.

    Path templates use ``{name}`` segments; a ``{meter_id}`` segment is validated
    and, for meter-bound tokens, checked against the token's meter.
    ``scopes=None`` makes a route public (meters and connectors call those).
    """

    def __init__(self) -> None:
        self._routes: list[_Route] = []

    def route(self, method: str, template: str, *, scopes: set[str] | None) -> Callable[[RouteFn], RouteFn]:
        pattern = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template.rstrip("/") or "") + "/?$"

        def register(fn: RouteFn) -> RouteFn:
            self._routes.append(
                _Route(method.upper(), re.compile(pattern), fn, frozenset(scopes) if scopes is not None else None)
            )
            return fn

        return register

    def get(self, template: str, *, scopes: set[str] | None) -> Callable[[RouteFn], RouteFn]:
        return self.route("GET", template, scopes=scopes)

    def post(self, template: str, *, scopes: set[str] | None) -> Callable[[RouteFn], RouteFn]:
        return self.route("POST", template, scopes=scopes)

    def put(self, template: str, *, scopes: set[str] | None) -> Callable[[RouteFn], RouteFn]:
        return self.route("PUT", template, scopes=scopes)

    def patch(self, template: str, *, scopes: set[str] | None) -> Callable[[RouteFn], RouteFn]:
        return self.route("PATCH", template, scopes=scopes)

    def delete(self, template: str, *, scopes: set[str] | None) -> Callable[[RouteFn], RouteFn]:
        return self.route("DELETE", template, scopes=scopes)

    def dispatch(self, event: Event, context: Context | None = None) -> Response:
        """Route ``event``; every exception becomes a JSON error answer (see :func:`guard`)."""
        try:
            response = self._dispatch(event)
        except Exception as exc:  # a bug must answer 500 with a JSON body, not Flask's HTML page
            return exception_response(exc, event)
        return checked_response(response, event)

    def _dispatch(self, event: Event) -> Response:
        fn, request = self.resolve(event)
        return fn(request)

    def resolve(self, event: Event) -> tuple[RouteFn, Request]:
        """Match ``event`` to a route and authorise the caller; raises the matching error.

        Shared by :meth:`dispatch` and by a handler's ``handle_async`` lane, so both
        apply exactly the same authentication and validation.
        """
        path = event.path or "/"
        method = event.method.upper()
        allowed: list[str] = []
        for route in self._routes:
            m = route.regex.match(path)
            if m is None:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            params = m.groupdict()
            meter_id = params.get("meter_id")
            principal = None
            if route.scopes is not None:
                principal = auth.authenticate(event.headers.get("Authorization"))
            if meter_id is not None:
                validate_meter_id(meter_id)
            if principal is not None and route.scopes is not None:
                auth.authorize(principal, route.scopes, meter_id)
            return route.fn, Request(event, params, principal)
        if allowed:
            methods = sorted(set(allowed))
            raise MethodNotAllowed(f"method {method} is not allowed on {path}; allowed: {methods}", allowed=methods)
        raise NotFound(f"no route for {method} {path}")
