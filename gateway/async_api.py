"""``/async-function/<name>[/path]``: accept a call into the zone's durable queue (202 + ``X-Call-Id``).

The queued call is run by :class:`gateway.asyncq.AsyncQueue`, which POSTs the result to
``X-Callback-Url``. Before a call is accepted (issue 10, items 2 and 1):

* the caller is authenticated exactly as the function's own router would for that method
  and path (a function built on :class:`metertwin.core.http.Router`): no token, or one
  without the route's scope, is answered 401/403 now rather than in the callback, so an
  anonymous caller cannot make the gateway call out at all;
* ``X-Callback-Url`` must pass the zone's destination policy
  (:mod:`metertwin.core.destinations`): a refused destination is a 400 that names it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import Headers

from gateway.asyncq import QueueFull
from gateway.fastpath import new_call_id
from gateway.functions import Event, LoadedFunction
from metertwin.core import auth
from metertwin.core.destinations import DestinationRefused
from metertwin.core.errors import Forbidden, MeterTwinError, Unauthorized, http_status
from metertwin.core.http import Router

if TYPE_CHECKING:
    from gateway.app import GatewayApp

log = logging.getLogger("gateway.async")


def add_async_routes(api: FastAPI, gw: GatewayApp) -> None:
    """Add the two ``/async-function`` routes of ``gw`` to ``api``."""

    async def enqueue(name: str, path: str, request: Request) -> Response:
        if name not in gw.functions:
            return PlainTextResponse(f"error finding function {name}: not found\n", status_code=404)
        body = await _read_limited(request, gw.max_body_bytes)
        if isinstance(body, Response):
            return body
        assert gw.queue is not None, "gateway not started (use the ASGI lifespan or GatewayApp.running())"
        refused = await _authorize(gw.functions[name], request, "/" + path)
        if refused is not None:
            return refused
        callback_url = request.headers.get("x-callback-url", "")
        if callback_url:
            try:  # resolves the name: off the event loop
                await asyncio.to_thread(gw.queue.policy.check_url, callback_url, "X-Callback-Url")
            except DestinationRefused as exc:
                return JSONResponse(exc.to_dict(), status_code=400)
        call_id = request.headers.get("x-call-id") or new_call_id().decode()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        if "x-call-id" not in request.headers:
            headers.append(("X-Call-Id", call_id))
        try:
            await gw.queue.enqueue(
                call_id=call_id, function=name, method=request.method, path="/" + path,
                query=request.url.query, headers=headers, body=body,
                callback_url=callback_url,
            )
        except QueueFull as exc:
            return JSONResponse(exc.to_dict(), status_code=503)
        except Exception as exc:  # Redis unreachable: the call was NOT accepted
            return JSONResponse({"error": "backend_unavailable", "message": f"cannot queue the call: {exc}"},
                                status_code=503)
        return Response(status_code=202, headers={"X-Call-Id": call_id})

    @api.post("/async-function/{name}", status_code=202, tags=["functions"])
    async def async_function(name: str, request: Request) -> Response:
        """Queue a call durably; 202 with `X-Call-Id`. The result is POSTed to `X-Callback-Url`
        with `X-Call-Id` and `X-Function-Status`."""
        return await enqueue(name, "", request)

    @api.post("/async-function/{name}/{path:path}", status_code=202, tags=["functions"])
    async def async_function_path(name: str, path: str, request: Request) -> Response:
        """As `/async-function/{name}`, with a function-relative path."""
        return await enqueue(name, path, request)


async def _authorize(fn: LoadedFunction, request: Request, path: str) -> Response | None:
    """The 401/403 the function's router would answer for this call, or None to accept it.

    Other verdicts (unknown route, bad meter id) are the function's to give: they come back in
    the callback, to a caller with a valid token (of any scope). A function without a
    :class:`Router` authenticates nothing itself, on ``/function`` as here.
    """
    router = getattr(fn.module, "router", None)
    if not isinstance(router, Router):
        return None
    event = Event(b"", Headers(raw=list(request.headers.raw)), request.method, request.url.query, path)
    try:
        try:
            await asyncio.to_thread(router.resolve, event)  # type: ignore[arg-type]
        except (Unauthorized, Forbidden):
            raise
        except MeterTwinError:
            # No route serves this method and path (or its id is malformed): the router answers
            # that before it looks at the token. Still take only a valid token, else anyone can
            # make the gateway POST that answer to a callback URL.
            await asyncio.to_thread(auth.authenticate, event.headers.get("authorization"))
    except (Unauthorized, Forbidden) as exc:
        return JSONResponse(exc.to_dict(), status_code=http_status(exc))
    except Exception as exc:  # the token check could not run (deny-list backend down): not accepted
        log.warning("async call of %s %s: token check failed: %r", fn.name, path, exc)
        return JSONResponse({"error": "backend_unavailable", "message": f"cannot check the token: {exc}"},
                            status_code=503)
    return None


async def _read_limited(request: Request, limit: int) -> bytes | Response:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return _too_large_response(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return _too_large_response(f"body of more than {limit} bytes exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large_response(message: str) -> JSONResponse:
    return JSONResponse({"error": "payload_too_large", "message": message}, status_code=413)
