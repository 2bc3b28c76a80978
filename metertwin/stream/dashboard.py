"""The operator dashboard served by the stream service, live from ``/events``.

Pages: fleet, meter, feeder/transformer, demand response, P2P, upgrades and jobs, MDMS data quality;
REST reads go through :mod:`metertwin.stream.proxy` (``/api/function/...``) with the page's token.

Pages and scripts are in the repository's ``dashboard/`` folder; the front-end library (uPlot, pinned in
``dashboard/package.json``) is installed by ``make setup`` into ``dashboard/node_modules`` (git-ignored) and
served from here, never from a CDN. The pages hold no data: they log in with a token (kept in
``sessionStorage``, or passed once as ``#token=`` in the URL) and read ``/events`` with it, so
what they show follows the token's scopes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

#: Outside the shared package on purpose: stack.yml copies ``metertwin/`` into every function image,
#: which must not carry the dashboard or its ``node_modules``.
WEB = Path(__file__).resolve().parents[2] / "dashboard"
UPLOT = WEB / "node_modules" / "uplot" / "dist"

#: Route -> (file, content type). A fixed table: no path from the request reaches the file system.
FILES: dict[str, tuple[Path, str]] = {
    "/": (WEB / "fleet.html", "text/html; charset=utf-8"),
    "/meter": (WEB / "meter.html", "text/html; charset=utf-8"),
    "/feeder": (WEB / "feeder.html", "text/html; charset=utf-8"),
    "/dr": (WEB / "dr.html", "text/html; charset=utf-8"),
    "/p2p": (WEB / "p2p.html", "text/html; charset=utf-8"),
    "/ops": (WEB / "ops.html", "text/html; charset=utf-8"),
    "/quality": (WEB / "quality.html", "text/html; charset=utf-8"),
    "/static/app.js": (WEB / "app.js", "text/javascript; charset=utf-8"),
    "/static/pages.js": (WEB / "pages.js", "text/javascript; charset=utf-8"),
    "/static/app.css": (WEB / "app.css", "text/css; charset=utf-8"),
    "/favicon.svg": (WEB / "favicon.svg", "image/svg+xml"),
    "/vendor/uPlot.iife.min.js": (UPLOT / "uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/vendor/uPlot.min.css": (UPLOT / "uPlot.min.css", "text/css; charset=utf-8"),
}

#: Same-origin only: no CDN, no inline script.
SECURITY_HEADERS = [(b"content-security-policy", b"default-src 'self'; style-src 'self' 'unsafe-inline'"),
                    (b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-cache")]

Handler = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def routes() -> dict[str, Handler]:
    """The dashboard's routes, for :attr:`metertwin.stream.service.StreamApp.extra_routes`."""
    return {path: _serve(path) for path in FILES}


def _serve(path: str) -> Handler:
    file, content_type = FILES[path]

    async def handler(scope: dict[str, Any], receive: Any, send: Any) -> None:
        del scope, receive
        if not file.is_file():
            body = f"{file.name} is not installed: run `make setup` (npm ci in {WEB})".encode()
            status, ctype = 503, b"text/plain; charset=utf-8"
        else:
            body, status, ctype = file.read_bytes(), 200, content_type.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                                *SECURITY_HEADERS]})
        await send({"type": "http.response.body", "body": body})

    return handler
