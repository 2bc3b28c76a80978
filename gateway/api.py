"""The FastAPI part of the gateway: ``/healthz``, ``/metrics`` here, then ``/system``, ``/async-function`` and docs.

Everything but ``/function/*`` (the app's raw-ASGI fast path) is served by this app.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.async_api import add_async_routes
from gateway.docs_ui import add_docs
from gateway.openapi import add_function_docs
from gateway.readiness import readiness
from gateway.system import VERSION, add_system_routes

if TYPE_CHECKING:
    from gateway.app import GatewayApp


def build_api(gw: GatewayApp) -> FastAPI:
    """The FastAPI part: /system, /async-function, /healthz, /readyz, /metrics and the OpenAPI document."""
    # /docs is added by add_docs (assets served locally); no ReDoc (it would load from a CDN).
    api = FastAPI(
        docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None,
        title=f"metertwin gateway ({gw.zone})",
        version=VERSION,
        description=(
            "OpenFaaS-compatible gateway of one metertwin zone. `/system/*` needs basic auth "
            "(user `admin`, secret `gateway-basic-auth-password`). Function routes are documented "
            "under `/function/<name>/...` from each handler's `OPENAPI_PATHS`. Function routes take "
            "`Authorization: Bearer <token>` (`python -m metertwin.tokens issue ...`): use *Authorize*."
        ),
    )
    pid_header = {"X-Gateway-Pid": str(os.getpid())}

    @api.get("/healthz", response_class=PlainTextResponse, tags=["gateway"])
    async def healthz() -> PlainTextResponse:
        """Liveness: the gateway process is up (no auth). ``X-Gateway-Pid`` names the serving process."""
        return PlainTextResponse("OK", headers=pid_header)

    @api.get("/readyz", tags=["gateway"], responses={503: {"description": "a service is unreachable"}})
    async def readyz() -> JSONResponse:
        """Readiness (no auth): the zone's Redis, MQTT broker and (cold-tier zones) S3, each reachable or not."""
        status, body = await readiness(gw)
        return JSONResponse(body, status_code=status, headers=pid_header)

    @api.get("/metrics", tags=["gateway"])
    async def metrics() -> Response:
        """Prometheus metrics: gateway_function_invocation_total, gateway_functions_seconds, ..."""
        depth = -1
        if gw.queue is not None:
            with contextlib.suppress(Exception):  # Redis down: the depth says so, the scrape still answers
                async with asyncio.timeout(gw.settings.redis_timeout_s):
                    depth = int(await gw.queue.redis.xlen(gw.queue.stream))
        gw.metrics.scrape_state(mqtt=gw.mqtt, processed=gw.queue.processed if gw.queue else 0, queue_depth=depth)
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    add_system_routes(api, gw)
    add_async_routes(api, gw)
    add_function_docs(api, gw)
    add_docs(api, api.title)
    return api
