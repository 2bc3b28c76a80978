"""The gateway's OpenAPI document: its own routes plus every handler's ``OPENAPI_PATHS``.

``/function/*`` is served by the fast path before FastAPI sees it; the routes added here
are never reached and only document those paths.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from gateway.fastpath import FUNCTION_PREFIX
from gateway.functions import HANDLER_METHODS, LoadedFunction

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


def merge_function_docs(schema: dict[str, Any], functions: Mapping[str, LoadedFunction]) -> None:
    """Add each handler's ``OPENAPI_PATHS`` under ``/function/<name><path>``."""
    paths = schema.setdefault("paths", {})
    for name, fn in functions.items():
        for rel, item in fn.openapi_paths.items():
            rel_path = rel if rel.startswith("/") else "/" + rel
            full = f"{FUNCTION_PREFIX}{name}{rel_path.rstrip('/') if rel_path != '/' else ''}"
            item = json.loads(json.dumps(item))  # a copy: several functions may share one module
            for op in item.values():
                if isinstance(op, dict):
                    op.setdefault("tags", [name])
                    if "operationId" in op:
                        op["operationId"] = f"{name}-{op['operationId']}"
            paths[full] = item
        if fn.openapi_components:
            comps = schema.setdefault("components", {})
            for section, entries in fn.openapi_components.items():
                comps.setdefault(section, {}).update(entries)
