"""``/docs``: Swagger UI over the zone's OpenAPI document, with its assets served by the gateway itself.

The assets come from the npm package ``swagger-ui-dist``, pinned in ``gateway/swagger-ui/package-lock.json``
and installed by ``make setup`` (``npm ci --ignore-scripts``) into ``gateway/swagger-ui/node_modules``
(git-ignored). Nothing is loaded from a CDN: the page works with no internet, and its
``Content-Security-Policy`` lets the browser load nothing from another origin. "Authorize" takes a
bearer token (the document's ``bearerAuth`` scheme), kept across reloads, so "Try it out" calls the
functions with it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

DIST = Path(__file__).resolve().parent / "swagger-ui" / "node_modules" / "swagger-ui-dist"
ASSET_PREFIX = "/docs-assets/"
#: Asset name -> content type. A fixed table: no path from the request reaches the file system.
ASSETS: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
#: Same origin only (Swagger UI's page has one inline script; its CSS inlines data: images).
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'")


def add_docs(api: FastAPI, title: str) -> None:
    """``GET /docs`` and ``GET /docs-assets/<file>`` on ``api`` (built with ``docs_url=None``)."""

    @api.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{title} — API",
            swagger_js_url=ASSET_PREFIX + "swagger-ui-bundle.js",
            swagger_css_url=ASSET_PREFIX + "swagger-ui.css",
            swagger_favicon_url=ASSET_PREFIX + "favicon-32x32.png",
            # validatorUrl None: no badge fetched from the public validator.
            swagger_ui_parameters={"persistAuthorization": True, "validatorUrl": None,
                                   "tryItOutEnabled": False, "displayRequestDuration": True})
        page.headers["content-security-policy"] = CSP
        return page

    @api.get(ASSET_PREFIX + "{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        content_type = ASSETS.get(name)
        if content_type is None:
            return PlainTextResponse(f"no docs asset {name[:60]!r}", status_code=404)
        file = DIST / name
        if not file.is_file():
            return PlainTextResponse(f"{name} is not installed: run `make setup` (npm ci in {DIST.parents[1]})",
                                     status_code=503)
        return Response(file.read_bytes(), media_type=content_type,
                        headers={"cache-control": "public, max-age=86400"})
