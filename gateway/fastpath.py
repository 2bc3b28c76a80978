"""The raw-ASGI fast path of ``/function/<name>[/path]``, and function invocation.

No routing framework, no middleware: read the body with a size limit, build the
template's ``Event``, run the sync handler in a dedicated thread pool (or an async
handler on the loop), convert the result the way the python3-http template does, add
``X-Call-Id``, ``X-Start-Time``, ``X-Duration-Seconds``. :class:`FunctionInvoker` is a
mixin of :class:`gateway.app.GatewayApp` (methods of the app itself, so the hot path
pays no extra indirection); :meth:`FunctionInvoker.invoke` is what async calls and
connectors use.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers

from gateway.functions import (
    ALLOW_HEADER,
    HANDLER_METHODS,
    Context,
    Event,
    LoadedFunction,
    Result,
    call_handler,
    convert_answer,
    error_result,
)
from gateway.metrics import GatewayMetrics
from gateway.pool import HandlerPool
from metertwin.core.auth import CALLER, CallerSlot

if TYPE_CHECKING:
    from gateway.access_log import AccessLog
    from gateway.options import GatewayOptions

log = logging.getLogger("gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FUNCTION_PREFIX = "/function/"
_PREFIX_LEN = len(FUNCTION_PREFIX)


class ExecTimeout(Exception):
    """A handler did not answer within ``exec_timeout_s``."""


def new_call_id() -> bytes:
    """A random version-4 UUID, as OpenFaaS sends in X-Call-Id.

    ``random`` (reseeded in forked workers) rather than ``uuid.uuid4``: an id needs to be
    unique, not unguessable, and this saves a ``getrandom`` syscall (~4 µs) per call.
    """
    h = f"{random.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}".encode()


async def send_plain(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer with a plain-text ``body`` (404/405/OPTIONS of the fast path)."""
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


class FunctionInvoker:
    """Serving and invoking functions: the part of the gateway app every call goes through."""

    # Set by GatewayApp.__init__ (declared here for the type checker).
    options: GatewayOptions
    functions: dict[str, LoadedFunction]
    max_body_bytes: int
    context: Context
    executor: HandlerPool
    metrics: GatewayMetrics
    access: AccessLog
    _deadlines: dict[asyncio.Future[Result], float]

    async def _function(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        start_ns = time.time_ns()
        name, _, rest = scope["path"][_PREFIX_LEN:].partition("/")
        fn = self.functions.get(name)
        method: str = scope["method"]
        if fn is None:
            await send_plain(send, 404, f"error finding function {name}: not found".encode())
            self.access.record(name, method, "/" + rest, 404, time.perf_counter() - started, "-", None)
            return
        if method not in HANDLER_METHODS:
            if method == "OPTIONS":
                await send_plain(send, 200, b"", [(b"allow", ALLOW_HEADER)])
                return
            if method != "HEAD":
                await send_plain(send, 405, b"Method Not Allowed", [(b"allow", ALLOW_HEADER)])
                self.access.record(name, method, "/" + rest, 405, time.perf_counter() - started, "-", None)
                return
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        call_id: bytes | None = None
        length = -1
        for key, value in raw_headers:
            if key == b"content-length":
                length = int(value) if value.isdigit() else -1
            elif key == b"x-call-id":
                call_id = value
        limit = self.max_body_bytes
        if length > limit:
            await self._too_large(send, length)
            self.access.record(name, method, "/" + rest, 413, time.perf_counter() - started, "-", None)
            return
        message = await receive()
        body: bytes = message.get("body", b"")
        if message.get("more_body", False):
            chunks = [body]
            size = len(body)
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    await self._too_large(send, size, partial=True)
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
        elif len(body) > limit:
            await self._too_large(send, len(body))
            return
        extra: list[tuple[bytes, bytes]] = [(b"x-start-time", str(start_ns).encode())]
        if call_id is None:
            call_id = new_call_id()
            extra.append((b"x-call-id", call_id))
        event = Event(body, Headers(raw=[*raw_headers, *extra]), method, scope["query_string"], "/" + rest)
        if fn.handle_async is None:
            result: Result = await self._call_sync(fn, event)
        else:
            result = await self._call_async(fn, event)
        duration = time.perf_counter() - started
        self.metrics.observe(name, result.status, duration)
        payload = result.body
        headers = result.headers
        headers.append((b"content-length", str(len(payload)).encode()))
        headers.append((b"x-call-id", call_id))
        headers.append((b"x-start-time", extra[0][1]))
        headers.append((b"x-duration-seconds", f"{duration:.6f}".encode()))
        await send({"type": "http.response.start", "status": result.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else payload})
        # After the answer went out: the caller does not wait for its log line.
        self.access.record(name, method, event.path, result.status, duration, call_id, result.caller)

    async def _call_sync(self, fn: LoadedFunction, event: Event) -> Result:
        """``handle`` in the pool, answered with 504 after ``exec_timeout_s`` (the thread runs on)."""
        future = self.executor.submit(call_handler, fn, event, self.context)
        # Deadlines are swept by one background task (cheaper per call than a timer or wait_for).
        self._deadlines[future] = time.monotonic() + self.options.exec_timeout_s
        try:
            return await future
        except ExecTimeout:
            log.warning("function %s did not answer %s %s within %s s", fn.name, event.method, event.path,
                        self.options.exec_timeout_s)
            return error_result(504, "function_timeout",
                                f"function {fn.name} did not answer within {self.options.exec_timeout_s} s")
        finally:
            del self._deadlines[future]

    async def _expire_calls(self) -> None:
        interval = min(1.0, self.options.exec_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for future, deadline in list(self._deadlines.items()):
                if deadline <= now and not future.done():
                    future.set_exception(ExecTimeout())

    async def _call_async(self, fn: LoadedFunction, event: Event) -> Result:
        """The async lane: ``handle_async`` on the event loop; ``NotImplemented`` means "use handle"."""
        slot = CallerSlot()
        CALLER.set(slot)
        try:
            answer = await asyncio.wait_for(fn.handle_async(event, self.context),  # type: ignore[misc]
                                            self.options.exec_timeout_s)
        except TimeoutError:
            return error_result(504, "function_timeout",
                                f"function {fn.name} did not answer within {self.options.exec_timeout_s} s")
        except Exception as exc:
            log.exception("function %s raised on %s %s", fn.name, event.method, event.path)
            return error_result(500, "function_error", f"function {fn.name} raised {type(exc).__name__}: {exc}")
        if answer is NotImplemented:
            return await self._call_sync(fn, event)
        result = convert_answer(fn, event, answer)
        result.caller = slot.principal
        return result

    async def _too_large(self, send: Send, size: int, *, partial: bool = False) -> None:
        what = f"more than {self.max_body_bytes}" if partial else str(size)
        res = error_result(
            413, "payload_too_large", f"body of {what} bytes exceeds the limit of {self.max_body_bytes} bytes"
        )
        res.headers.append((b"content-length", str(len(res.body)).encode()))
        await send({"type": "http.response.start", "status": 413, "headers": res.headers})
        await send({"type": "http.response.body", "body": res.body})

    # -- invocation used by async calls and connectors -------------------------------------------
    async def invoke(self, name: str, event: Event) -> Result:
        """Call function ``name`` with ``event`` in the thread pool, counting it like an HTTP call."""
        fn = self.functions.get(name)
        if fn is None:
            return error_result(404, "not_found", f"error finding function {name}: not found")
        started = time.perf_counter()
        if fn.handle_async is None:
            result = await self._call_sync(fn, event)
        else:
            result = await self._call_async(fn, event)
        duration = time.perf_counter() - started
        self.metrics.observe(name, result.status, duration)
        self.access.record(name, event.method, event.path, result.status, duration,
                           event.headers.get("x-call-id") or "-", result.caller, via="internal")
        return result
