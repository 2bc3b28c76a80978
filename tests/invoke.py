"""Call a function handler directly, as the python3-http template would, for unit tests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from starlette.datastructures import Headers, QueryParams

from tests.python3_http import import_handler

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Event:
    body: bytes = b""
    headers: Headers = field(default_factory=Headers)
    method: str = "GET"
    query: QueryParams = field(default_factory=QueryParams)
    path: str = "/"


@dataclass
class Context:
    hostname: str = "test"


def load_handler(function_dir: str) -> ModuleType:
    """Import ``functions/<function_dir>/handler.py`` under a unique module name."""
    return import_handler(ROOT / "functions" / function_dir / "handler.py",
                          f"_test_handler_{function_dir.replace('-', '_')}")


def call(
    handler: ModuleType,
    method: str,
    path: str,
    *,
    body: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """Invoke ``handler.handle`` and return (status, decoded body)."""
    raw = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    event = Event(raw, Headers(hdrs), method, QueryParams(query or {}), path)
    resp = handler.handle(event, Context())
    status = resp.get("statusCode", 200)
    out = resp.get("body", "")
    # The template sends only an exact dict as JSON and str() of anything else (tests/python3_http.py):
    # a bytes or list body would reach a real caller as Python repr, so a direct call must not accept it.
    assert type(out) is dict or isinstance(out, str), f"{method} {path}: body of type {type(out).__name__}"
    if isinstance(out, str) and resp.get("headers", {}).get("Content-Type", "").startswith("application/json"):
        out = json.loads(out)
    return status, out
