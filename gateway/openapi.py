"""The gateway's OpenAPI document: its own routes plus every route of every function.

``/function/*`` is served by the fast path before FastAPI sees it; the routes added here
are never reached and only document those paths.

Each function's routes come from its :class:`metertwin.core.http.Router` (method, path
template, scopes, the route's docstring), so a route cannot be missing from the document:
path parameters are declared (a ``{meter_id}`` with :data:`metertwin.core.http.METER_ID_RE`
as its pattern), write methods take a JSON object body, and every operation lists the
error answers in the shape every handler gives them (``Error``: ``error``, ``message``,
``details``). A handler's ``OPENAPI_PATHS`` (summaries, query parameters, precise request
and response schemas) is laid over what the router gives.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from gateway.fastpath import FUNCTION_PREFIX
from gateway.functions import HANDLER_METHODS, LoadedFunction
from metertwin.core.http import METER_ID_RE, Router

if TYPE_CHECKING:
    from gateway.app import GatewayApp


def add_function_docs(api: FastAPI, gw: GatewayApp) -> None:
    """Document ``/function/{name}[/{path}]`` and merge the handlers' paths into ``api``'s schema."""

    async def function_doc(name: str) -> None:  # pragma: no cover - served by the fast path
        """Call a function (any method); answers with the function's own status, headers and body."""

    async def function_path_doc(name: str, path: str) -> None:  # pragma: no cover - served by the fast path
        """Call a function with a function-relative path (`event.path`)."""

    # Never reached (the dispatcher serves /function/* first): these document the routes.
    for method in sorted(HANDLER_METHODS):
        api.add_api_route("/function/{name}", function_doc, methods=[method], tags=["functions"],
                          name=f"{method.lower()}_function")
        api.add_api_route("/function/{name}/{path:path}", function_path_doc, methods=[method],
                          tags=["functions"], name=f"{method.lower()}_function_path")

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=api.title, version=api.version, description=api.description,
                                 routes=api.routes)
            merge_function_docs(schema, gw.functions)
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {"error": {"type": "string", "description": "machine-readable code, e.g. invalid_input"},
                   "message": {"type": "string", "description": "names the bad value"},
                   "details": {"type": "object"}},
}
#: What the router and the gateway can answer besides the route's own result.
ERRORS: dict[str, str] = {
    "400": "invalid input (the message names the field and value)",
    "401": "no token, or one that does not verify",
    "403": "the token's scopes or meter do not reach this resource",
    "404": "no such meter, resource or route",
    "405": "method not allowed on this path (see the Allow header)",
    "409": "conflict with the current state",
    "412": "If-Match names a version that is no longer current",
    "413": "body larger than the limit",
    "503": "a backend (Redis, MQTT broker, S3) is unavailable; retry",
    "504": "the meter or the function did not answer in time",
}
_PARAM_RE = re.compile(r"\(\?P<(\w+)>\[\^/\]\+\)")
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH"})


def route_template(pattern: str) -> str:
    """The path template a :class:`Router` route was registered with, from its compiled pattern."""
    body = pattern.removeprefix("^").removesuffix("/?$")
    return _PARAM_RE.sub(lambda m: "{" + m.group(1) + "}", body) or "/"


def path_parameter(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": 1}
    if name == "meter_id":
        schema = {"type": "string", "pattern": METER_ID_RE.pattern}
    return {"name": name, "in": "path", "required": True, "schema": schema}


def router_operations(router: Router) -> dict[str, dict[str, Any]]:
    """``{template: {method: operation}}`` for every route of ``router``."""
    paths: dict[str, dict[str, Any]] = {}
    for route in getattr(router, "_routes", []):
        template = route_template(route.regex.pattern)
        doc = (route.fn.__doc__ or "").strip()
        op: dict[str, Any] = {"summary": doc.splitlines()[0] if doc else route.fn.__name__.replace("_", " "),
                              "operationId": f"{route.method.lower()}-{route.fn.__name__}"}
        if doc and len(doc.splitlines()) > 1:
            op["description"] = doc
        params = [path_parameter(n) for n in re.findall(r"\{(\w+)\}", template)]
        if params:
            op["parameters"] = params
        if route.scopes is not None:
            op["security"] = [{"bearerAuth": []}]
            op["description"] = (op.get("description", "") + "\n\nScopes: "
                                 + ", ".join(sorted(route.scopes | {"admin", "service"}))).strip()
        if route.method in _WRITE_METHODS:
            op["requestBody"] = {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}
        op["responses"] = {"2XX": {"description": "the route's result",
                                   "content": {"application/json": {"schema": {"type": "object"}}}},
                           **{code: {"$ref": f"#/components/responses/E{code}"} for code in ERRORS}}
        paths.setdefault(template, {})[route.method.lower()] = op
    return paths


def _overlay(op: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` (the handler's own documentation) over the generated ``op``."""
    out = {**op, **{k: v for k, v in given.items() if k not in ("parameters", "responses")}}
    params = {(p["name"], p["in"]): p for p in op.get("parameters", [])}
    for p in given.get("parameters", []):
        key = (p.get("name"), p.get("in"))
        params[key] = {**p, "schema": params[key]["schema"]} if key in params and p.get("in") == "path" else p
    if params:
        out["parameters"] = list(params.values())
    out["responses"] = {**op.get("responses", {}), **given.get("responses", {})}
    return out


def _declare_path_parameters(full: str, item: dict[str, Any]) -> None:
    """Every ``{name}`` of ``full`` declared in every operation (handlers' own entries may miss some)."""
    names = re.findall(r"\{(\w+)\}", full)
    for method, op in item.items():
        if method not in {m.lower() for m in HANDLER_METHODS} or not isinstance(op, dict):
            continue
        declared = {p.get("name") for p in op.get("parameters", []) if p.get("in") == "path"}
        missing = [path_parameter(n) for n in names if n not in declared]
        if missing:
            op["parameters"] = [*op.get("parameters", []), *missing]
        op.setdefault("responses", {"2XX": {"description": "the route's result"}})


def merge_function_docs(schema: dict[str, Any], functions: Mapping[str, LoadedFunction]) -> None:
    """Add every route of every function under ``/function/<name><path>``, the handler's docs laid over it."""
    paths = schema.setdefault("paths", {})
    comps = schema.setdefault("components", {})
    comps.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    comps.setdefault("responses", {}).update({
        f"E{code}": {"description": text, "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/Error"}}}} for code, text in ERRORS.items()})
    comps.setdefault("securitySchemes", {})["bearerAuth"] = {"type": "http", "scheme": "bearer",
                                                            "bearerFormat": "JWT"}
    for name, fn in functions.items():
        router = getattr(fn.module, "router", None)
        generated = router_operations(router) if isinstance(router, Router) else {}
        given = {(rel if rel.startswith("/") else "/" + rel): item for rel, item in fn.openapi_paths.items()}
        for rel_path in [*generated, *(p for p in given if p not in generated)]:
            full = f"{FUNCTION_PREFIX}{name}{rel_path.rstrip('/') if rel_path != '/' else ''}"
            item: dict[str, Any] = json.loads(json.dumps(generated.get(rel_path, {})))
            for method, op in json.loads(json.dumps(given.get(rel_path, {}))).items():
                item[method] = _overlay(item.get(method, {}), op) if isinstance(op, dict) else op
            for op in item.values():
                if isinstance(op, dict):
                    op.setdefault("tags", [name])
                    if "operationId" in op:
                        op["operationId"] = f"{name}-{op['operationId']}"
            _declare_path_parameters(full, item)
            paths[full] = item
        if fn.openapi_components:
            for section, entries in fn.openapi_components.items():
                comps.setdefault(section, {}).update(entries)
