"""How the bridge calls the ``dr-event`` function: over HTTP through the zone gateway, or in-process (tests)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp

#: ``await invoke(method, path, body) -> (status, json body)``; never raises for HTTP errors.
Invoke = Callable[[str, str, dict[str, Any] | None], Awaitable[tuple[int, dict[str, Any]]]]


class HttpInvoker:
    """``POST {gateway}/function/{function}{path}`` with a ``service`` bearer token, pooled, with timeouts."""

    def __init__(self, gateway: str, token: str, function: str = "edge-dr-event", timeout_s: float = 10.0,
                 max_connections: int = 32) -> None:
        self.base = f"{gateway.rstrip('/')}/function/{function}"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._limit = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(limit=self._limit))
        data = json.dumps(body, separators=(",", ":")) if body is not None else None
        async with self._session.request(method, self.base + path, data=data, headers=self._headers) as resp:
            text = await resp.text()
            try:
                parsed = json.loads(text) if text else {}
            except json.JSONDecodeError:
                parsed = {"error": "not_json", "message": text[:500]}
            return resp.status, parsed if isinstance(parsed, dict) else {"body": parsed}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class _Headers(dict[str, str]):
    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


@dataclass
class _Event:
    body: bytes
    headers: Mapping[str, str]
    method: str
    path: str
    query: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _Context:
    hostname: str = "dr-bridge-inprocess"


def load_function(name: str, root: Path | None = None) -> ModuleType:
    """Import ``functions/<name>/handler.py`` of this repository (what the gateway would serve)."""
    base = root or Path(__file__).resolve().parent.parent
    module_name = f"_dr_bridge_fn_{name.replace('-', '_')}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, base / "functions" / name / "handler.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"function {name!r} has no handler.py under {base / 'functions'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def handler_invoker(handler: ModuleType, token: str) -> Invoke:
    """Call ``handler.handle`` directly (in a worker thread, as waitress would) — for tests and the demo."""

    async def invoke(method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        raw = json.dumps(body).encode() if body is not None else b""
        headers = _Headers({"authorization": f"Bearer {token}", "content-type": "application/json"})
        event = _Event(raw, headers, method, path)
        resp = await asyncio.to_thread(handler.handle, event, _Context())
        out = resp.get("body", {})
        if isinstance(out, str):
            try:
                out = json.loads(out)
            except json.JSONDecodeError:
                out = {"body": out}
        return int(resp.get("statusCode", 200)), out

    return invoke
