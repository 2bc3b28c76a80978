"""Load function handlers and call them exactly as the python3-http template does.

The template (Flask behind of-watchdog) builds an ``Event`` from the request, calls
``handle(event, context)`` and turns the return value into a response: no value →
empty 200; ``statusCode`` defaults to 200; a ``dict`` body is sent as JSON, any other
body as ``str(body)`` (so bytes and lists arrive as their Python repr, whatever
``Content-Type`` the handler set: unlike python3-http-debian, the python3-http template has no
``application/octet-stream`` pass-through); ``headers`` go out as given.
:func:`call_handler` reproduces that, and returns a ready-to-send ASGI response.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import importlib.util
import inspect
import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import format_datetime
from types import ModuleType
from typing import Any

from starlette.datastructures import Headers, QueryParams

from gateway.stack import FunctionSpec, StackError
from metertwin.core.auth import CALLER, CallerSlot, Principal

log = logging.getLogger("gateway.functions")

RawHeaders = list[tuple[bytes, bytes]]
#: Methods the template's Flask routes accept; HEAD/OPTIONS are answered as Flask does.
HANDLER_METHODS = frozenset({"GET", "PUT", "POST", "PATCH", "DELETE"})
ALLOW_HEADER = b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
TEXT_HTML = b"text/html; charset=utf-8"
APPLICATION_JSON = b"application/json"


class Event:
    """What ``handle`` receives: ``body`` bytes, ``headers``, ``method``, ``query``, ``path``."""

    __slots__ = ("_query", "_query_string", "body", "headers", "method", "path")

    def __init__(self, body: bytes, headers: Headers, method: str, query_string: bytes | str, path: str) -> None:
        self.body = body
        self.headers = headers
        self.method = method
        self.path = path
        self._query_string = query_string
        self._query: QueryParams | None = None

    @property
    def query(self) -> QueryParams:
        # Parsed on first use: most calls never look at the query string.
        if self._query is None:
            self._query = QueryParams(self._query_string)
        return self._query


@dataclass(frozen=True, slots=True)
class Context:
    """The template's context: only ``hostname`` (``$HOSTNAME``, else ``localhost``)."""

    hostname: str = field(default_factory=lambda: os.getenv("HOSTNAME") or socket.gethostname() or "localhost")


@dataclass(slots=True)
class Result:
    """A handler's answer, converted: status, ASGI header list (without the gateway's X-ones), body."""

    status: int
    headers: RawHeaders
    body: bytes
    error: str | None = None
    #: Who called, as the function's authentication verified it (the access log's subject and scope).
    caller: Principal | None = None


@dataclass(slots=True)
class LoadedFunction:
    spec: FunctionSpec
    module: ModuleType
    handle: Callable[[Any, Any], Any]
    openapi_paths: dict[str, Any]
    openapi_components: dict[str, Any]
    #: Optional ``async def handle_async(event, context)`` (a local-gateway extension, see docs/gateway.md).
    handle_async: Callable[[Any, Any], Awaitable[Any]] | None = None

    @property
    def name(self) -> str:
        return self.spec.name


def merged_environment(specs: Iterable[FunctionSpec]) -> dict[str, str]:
    """The union of the functions' environments; a key set differently by two functions is an error.

    The environment is process-wide, so functions served by one local gateway share it
    (on OpenFaaS each has its own container).
    """
    merged: dict[str, str] = {}
    owner: dict[str, str] = {}
    for spec in specs:
        for key, value in spec.environment.items():
            if key in merged and merged[key] != value:
                raise StackError(
                    f"environment variable {key} is {merged[key]!r} for function {owner[key]} but {value!r} "
                    f"for function {spec.name}; functions of one local zone share one process environment"
                )
            merged[key] = value
            owner.setdefault(key, spec.name)
    return merged


def load_function(spec: FunctionSpec) -> LoadedFunction:
    """Import ``<handler_dir>/handler.py`` under a module name unique to this function."""
    module_name = "_gateway_fn_" + spec.name.replace("-", "_")
    path = spec.handler_dir / "handler.py"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise StackError(f"function {spec.name}: cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise StackError(f"function {spec.name}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    handle = getattr(module, "handle", None)
    if not callable(handle):
        raise StackError(f"function {spec.name}: {path} defines no handle(event, context)")
    paths = getattr(module, "OPENAPI_PATHS", None) or {}
    components = getattr(module, "OPENAPI_COMPONENTS", None) or {}
    if not isinstance(paths, dict) or not isinstance(components, dict):
        raise StackError(f"function {spec.name}: OPENAPI_PATHS / OPENAPI_COMPONENTS must be dicts")
    handle_async = getattr(module, "handle_async", None)
    if handle_async is not None and not inspect.iscoroutinefunction(handle_async):
        raise StackError(f"function {spec.name}: handle_async in {path} must be an async def")
    return LoadedFunction(spec, module, handle, paths, components, handle_async)


def load_functions(specs: Iterable[FunctionSpec]) -> dict[str, LoadedFunction]:
    return {spec.name: load_function(spec) for spec in specs}


def _json_default(value: Any) -> Any:
    # The types Flask's JSON provider understands beyond plain JSON.
    if isinstance(value, dt.datetime):
        return format_datetime(value, usegmt=value.tzinfo is not None)
    if isinstance(value, dt.date):
        return format_datetime(dt.datetime.combine(value, dt.time()))
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "__html__"):
        return str(value.__html__())
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def convert(result: Any) -> Result:
    """Turn a ``handle`` return value into (status, headers, body) like the template."""
    if result is None:
        return Result(200, [(b"content-type", TEXT_HTML)], b"")
    if not isinstance(result, Mapping):
        raise TypeError(f"handler returned {type(result).__name__}; expected a dict with statusCode/body/headers")
    status = int(result.get("statusCode", 200))
    given = result.get("headers")
    header_pairs: list[tuple[str, str]]
    if given is None:
        header_pairs = []
    elif isinstance(given, Mapping):
        header_pairs = [(str(k), str(v)) for k, v in given.items()]
    else:
        header_pairs = [(str(k), str(v)) for k, v in given]
    content_type = TEXT_HTML
    if "body" not in result:
        payload = b""
    else:
        body = result["body"]
        if isinstance(body, dict):
            payload = json.dumps(body, default=_json_default).encode()
            content_type = APPLICATION_JSON
        else:
            payload = str(body).encode()
    headers: RawHeaders = []
    has_type = False
    for key, value in header_pairs:
        lower = key.lower()
        if lower == "content-length":
            continue  # the gateway sets it from the body it sends
        if lower == "content-type":
            has_type = True
        headers.append((lower.encode("latin-1"), value.encode("latin-1")))
    if not has_type:
        headers.append((b"content-type", content_type))
    return Result(status, headers, payload)


def error_result(status: int, code: str, message: str) -> Result:
    body = json.dumps({"error": code, "message": message}).encode()
    return Result(status, [(b"content-type", APPLICATION_JSON)], body, error=message)


def convert_answer(fn: LoadedFunction, event: Event, answer: Any) -> Result:
    """:func:`convert`, with a malformed answer reported as a JSON 500 like a raising handler."""
    try:
        return convert(answer)
    except Exception as exc:
        log.exception("function %s answered %s %s with a malformed value", fn.name, event.method, event.path)
        return error_result(500, "function_error", f"function {fn.name} answered badly: {type(exc).__name__}: {exc}")


def call_handler(fn: LoadedFunction, event: Event, context: Context) -> Result:
    """Run ``fn.handle`` and convert its answer; a raising handler becomes a JSON 500."""
    slot = CallerSlot()
    CALLER.set(slot)  # a fresh slot per call: pool threads are reused
    try:
        answer = fn.handle(event, context)
    except Exception as exc:
        log.exception("function %s raised on %s %s", fn.name, event.method, event.path)
        result = error_result(500, "function_error", f"function {fn.name} raised {type(exc).__name__}: {exc}")
    else:
        result = convert_answer(fn, event, answer)
    result.caller = slot.principal
    return result
