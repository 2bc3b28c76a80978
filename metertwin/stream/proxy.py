"""``GET /api/function/<zone>-<name>/<path>``: the dashboard's read-only way to the zones' REST APIs.

The dashboard's pages are same-origin only (CSP ``default-src 'self'``), so the stream service
passes their REST reads on to the gateway of the function's zone (``STREAM_GATEWAY_URLS``, e.g.
``edge=http://gateway-edge:8080,fog=http://gateway-fog:8080``) with the caller's own bearer token:
the gateway and the function check its scopes as for any app. Only ``GET``; only function names;
the query string passes unchanged; a zone with no URL answers 404 ``not_configured`` (the page
shows that the data is not available here).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

PREFIX = "/api/function/"
_NAME = re.compile(r"^(edge|fog|cloud)-[a-z0-9][a-z0-9-]{0,62}$")
_PATH = re.compile(r"^[A-Za-z0-9._~:@%+,;=/-]*$")
TIMEOUT_S = 10.0

Send = Callable[[dict[str, Any]], Awaitable[None]]


def parse_gateway_urls(text: str) -> dict[str, str]:
    """``"edge=http://a:8080,fog=http://b:8080"`` -> ``{"edge": ..., "fog": ...}`` (bad entries named)."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        zone, sep, url = item.partition("=")
        if not sep or zone not in ("edge", "fog", "cloud") or not url.startswith(("http://", "https://")):
            raise ValueError(f"STREAM_GATEWAY_URLS entry {item!r} is not <edge|fog|cloud>=http(s)://host:port")
        out[zone] = url.rstrip("/")
    return out


class Proxy:
    """One shared HTTP client; :meth:`handle` serves ``/api/function/...``."""

    def __init__(self, gateways: dict[str, str]) -> None:
        self.gateways = gateways
        self._client: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def handle(self, scope: dict[str, Any], send: Send) -> None:
        rest = scope["path"][len(PREFIX):]
        name, _, path = rest.partition("/")
        if scope["method"] != "GET":
            await _reply(send, 405, {"error": "method_not_allowed", "message": f"{scope['method']} is not GET"})
            return
        if not _NAME.match(name) or not _PATH.match(path) or ".." in path:
            await _reply(send, 400, {"error": "invalid_input", "message": f"function path {rest[:80]!r} is not valid"})
            return
        base = self.gateways.get(name.split("-", 1)[0])
        if base is None:
            await _reply(send, 404, {"error": "not_configured",
                                     "message": f"no gateway URL for {name!r} (STREAM_GATEWAY_URLS)"})
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k.lower() == b"authorization"}
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False)
        url = f"{base}/function/{name}/{path}"
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            resp = await self._client.get(url + (f"?{query}" if query else ""), headers=headers)
        except httpx.HTTPError as exc:
            await _reply(send, 502, {"error": "backend_unavailable", "message": f"gateway {base} failed: {exc}"})
            return
        ctype = resp.headers.get("content-type", "application/json").encode("latin-1")
        await send({"type": "http.response.start", "status": resp.status_code,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(resp.content)).encode()),
                                (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": resp.content})


async def _reply(send: Send, status: int, body: dict[str, Any]) -> None:
    import json

    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})
