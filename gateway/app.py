"""The local OpenFaaS-compatible gateway of one zone, as one ASGI app.

A small ASGI dispatcher sits in front:

* ``/function/<name>[/path]`` is served by a raw ASGI fast path (no routing framework,
  no middleware): read the body with a size limit, build the template's ``Event``,
  run the sync handler in a dedicated thread pool, convert the result the way the
  python3-http template does, add ``X-Call-Id``, ``X-Start-Time``, ``X-Duration-Seconds``.
* ``/system/*`` is checked for basic auth (user ``admin``) before anything else runs.
* everything else (``/system``, ``/async-function``, ``/healthz``, ``/metrics``,
  ``/docs``, ``/openapi.json``) goes to a FastAPI app.

Background tasks (started by the ASGI lifespan, or :meth:`GatewayApp.running` in tests):
invocation-count flush to Redis, the async-call worker, the MQTT and cron connectors.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import gc
import hmac
import json
import logging
import os
import platform
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBasic
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers

from gateway.asyncq import AsyncQueue, QueueFull
from gateway.connectors import CronConnector, MqttConnector, ServiceToken, validate_schedule
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
    load_functions,
    merged_environment,
)
from gateway.metrics import GatewayMetrics
from gateway.pool import HandlerPool
from gateway.stack import FunctionSpec, StackError, load_stack
from metertwin.core import clients
from metertwin.core.settings import Settings, get_settings, reset_settings

log = logging.getLogger("gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

VERSION = "0.1.0"
BASIC_USER = b"admin"
FUNCTION_PREFIX = "/function/"
_PREFIX_LEN = len(FUNCTION_PREFIX)
_UNAUTHORIZED_BODY = b"Unauthorized\n"
_UNAUTHORIZED_HEADERS = [
    (b"www-authenticate", b'Basic realm="OpenFaaS API"'),
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", str(len(_UNAUTHORIZED_BODY)).encode()),
]


#: Apps started in this process and not yet shut down (their environments must agree).
_RUNNING: set[GatewayApp] = set()


class ExecTimeout(Exception):
    """A handler did not answer within ``exec_timeout_s``."""


def new_call_id() -> bytes:
    """A random version-4 UUID, as OpenFaaS sends in X-Call-Id.

    ``random`` (reseeded in forked workers) rather than ``uuid.uuid4``: an id needs to be
    unique, not unguessable, and this saves a ``getrandom`` syscall (~4 µs) per call.
    """
    h = f"{random.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}".encode()


@dataclass(slots=True)
class GatewayOptions:
    """Tunables of one gateway process (CLI flags map onto these)."""

    #: Threads running sync handlers (waitress runs the template with a few threads per replica).
    max_threads: int = 16
    #: A call not answered in this time gets 504 (OpenFaaS's watchdog exec_timeout); its thread runs on.
    exec_timeout_s: float = 30.0
    #: Stable name of this worker: async-queue consumer and MQTT client id. Reusing it after a
    #: crash lets the new process pick up the old one's pending calls and MQTT session at once.
    instance: str | None = None
    #: Pending async calls of *other* consumers idle this long are taken over.
    claim_idle_s: float = 60.0
    async_concurrency: int = 8
    callback_timeout_s: float = 10.0
    callback_attempts: int = 3
    #: MQTT messages in flight per worker (the session's Receive Maximum).
    mqtt_concurrency: int = 16
    mqtt_session_expiry_s: int = 300
    token_ttl_s: int = 3600
    #: Run the async worker, MQTT and cron connectors (off for a pure HTTP benchmark).
    background: bool = True
    flush_interval_s: float = 1.0
    drain_timeout_s: float = 10.0


class GatewayApp:
    """ASGI app of one zone's gateway. Create with :func:`create_app`."""

    def __init__(
        self,
        stack_path: str | Path,
        zone: str,
        *,
        secrets_dir: str | Path | None = None,
        options: GatewayOptions | None = None,
    ) -> None:
        self.options = options or GatewayOptions()
        self.zone = zone
        if secrets_dir is not None:
            os.environ["SECRETS_DIR"] = str(Path(secrets_dir).resolve())
        self.stack = load_stack(stack_path)
        self.specs: list[FunctionSpec] = self.stack.select(zone)
        for spec in self.specs:
            if spec.schedule:
                validate_schedule(spec)
        # One process, one environment: apply the zone's (conflict-free) union before any
        # handler is imported, and forget settings/clients built from the old environment.
        self.environment = merged_environment(self.specs)
        self._check_environment()
        os.environ.update(self.environment)
        reset_settings()
        clients.close_all()
        self.settings: Settings = get_settings()
        self.functions: dict[str, LoadedFunction] = load_functions(self.specs)
        self.max_body_bytes = self.settings.max_body_bytes
        self.instance = self.options.instance or f"{socket.gethostname()}-{os.getpid()}"
        self.context = Context()
        self.executor = HandlerPool(self.options.max_threads, name=f"fn-{zone}")
        self.metrics = GatewayMetrics(zone, self.functions)
        self.token = ServiceToken(zone, self.options.token_ttl_s)
        self.started_at = datetime.now(UTC)
        self.redis: aioredis.Redis | None = None
        self.queue: AsyncQueue | None = None
        self.mqtt: MqttConnector | None = None
        self.cron: CronConnector | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._deadlines: dict[asyncio.Future[Result], float] = {}
        self._redis_clients: list[aioredis.Redis] = []
        self._started = False
        password = self.settings.gateway_basic_auth_password.get_secret_value()
        self._basic_password = password.encode() if password else None
        if self._basic_password is None:
            log.warning("secret gateway-basic-auth-password is empty: every /system route answers 401")
        self.api = build_api(self)

    def _check_environment(self) -> None:
        for other in _RUNNING:
            clash = sorted(k for k, v in self.environment.items() if other.environment.get(k, v) != v)
            if clash:
                raise StackError(
                    f"gateway {self.zone} and gateway {other.zone} run in one process but set {clash} differently; "
                    "the environment is process-wide: run zones in separate processes (gateway.server.GatewayProcess)"
                )

    # -- ASGI -----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith(FUNCTION_PREFIX):
                await self._function(scope, receive, send)
                return
            if path.startswith("/system") and not self._authorized(scope):
                await send({"type": "http.response.start", "status": 401, "headers": _UNAUTHORIZED_HEADERS})
                await send({"type": "http.response.body", "body": _UNAUTHORIZED_BODY})
                return
        elif kind == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.api(scope, receive, send)

    async def _function(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        start_ns = time.time_ns()
        name, _, rest = scope["path"][_PREFIX_LEN:].partition("/")
        fn = self.functions.get(name)
        if fn is None:
            await _send_plain(send, 404, f"error finding function {name}: not found".encode())
            return
        method: str = scope["method"]
        if method not in HANDLER_METHODS:
            if method == "OPTIONS":
                await _send_plain(send, 200, b"", [(b"allow", ALLOW_HEADER)])
                return
            if method != "HEAD":
                await _send_plain(send, 405, b"Method Not Allowed", [(b"allow", ALLOW_HEADER)])
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
        return convert_answer(fn, event, answer)

    async def _too_large(self, send: Send, size: int, *, partial: bool = False) -> None:
        what = f"more than {self.max_body_bytes}" if partial else str(size)
        res = error_result(
            413, "payload_too_large", f"body of {what} bytes exceeds the limit of {self.max_body_bytes} bytes"
        )
        res.headers.append((b"content-length", str(len(res.body)).encode()))
        await send({"type": "http.response.start", "status": 413, "headers": res.headers})
        await send({"type": "http.response.body", "body": res.body})

    def _authorized(self, scope: Scope) -> bool:
        if self._basic_password is None:
            return False
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, encoded = value.partition(b" ")
                if scheme.lower() != b"basic":
                    return False
                try:
                    user, _, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
                except (binascii.Error, ValueError):
                    return False
                # Compare both in full (no short-circuit) so timing tells nothing.
                ok_user = hmac.compare_digest(user, BASIC_USER)
                ok_password = hmac.compare_digest(password, self._basic_password)
                return ok_user and ok_password
        return False

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("gateway startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

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
        self.metrics.observe(name, result.status, time.perf_counter() - started)
        return result

    # -- lifecycle --------------------------------------------------------------------------------
    def _new_redis(self, socket_timeout_s: float) -> aioredis.Redis:
        client = aioredis.Redis.from_url(
            self.settings.redis_url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=self.settings.redis_timeout_s,
            health_check_interval=30,
        )
        self._redis_clients.append(client)
        return client

    async def startup(self) -> None:
        """Open Redis, start the count flush, the async worker and the connectors."""
        if self._started:
            return
        self._check_environment()
        _RUNNING.add(self)
        self._started = True
        # Everything imported so far (functions, their libraries) lives as long as the process:
        # keep it out of the collector's full passes, which otherwise stall the event loop for
        # tens of milliseconds under load (seen as the p99 of cached reads).
        gc.freeze()
        self.redis = self._new_redis(self.settings.redis_timeout_s)
        self._spawn(self._expire_calls(), "exec-timeout")
        self._spawn(self.metrics.flush_forever(self.redis, self.options.flush_interval_s), "flush")
        # The async worker blocks up to 1 s in XREADGROUP: its own client with a longer timeout.
        self.queue = AsyncQueue(
            self.zone,
            self._new_redis(self.settings.redis_timeout_s + 2.0),
            self.invoke,
            consumer=self.instance,
            claim_idle_s=self.options.claim_idle_s,
            concurrency=self.options.async_concurrency,
            callback_timeout_s=self.options.callback_timeout_s,
            callback_attempts=self.options.callback_attempts,
        )
        if not self.options.background:
            return
        self._spawn(self.queue.run(), "async-worker")
        self.cron = CronConnector(self.zone, self.specs, self.invoke, self.token, self.redis)
        if self.cron.schedules:
            self._spawn(self.cron.run(), "cron")
        s = self.settings
        self.mqtt = MqttConnector(
            self.zone, self.specs, self.invoke, self.token,
            host=s.mqtt_host, port=s.mqtt_port, username=s.mqtt_username,
            password=s.mqtt_password.get_secret_value(), client_id=f"gw-{self.zone}-{self.instance}",
            concurrency=self.options.mqtt_concurrency, session_expiry_s=self.options.mqtt_session_expiry_s,
        )
        self.mqtt.start()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=f"gw-{self.zone}-{name}")
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway task %s stopped", task.get_name(), exc_info=task.exception())

    async def shutdown(self) -> None:
        """Stop taking events, finish (or leave pending) in-flight calls, close every client.

        Bounded by ``drain_timeout_s`` overall: what has not finished by then stays pending
        (async calls and unacknowledged MQTT messages are redelivered later).
        """
        if not self._started:
            self.executor.shutdown(wait=False)
            return
        deadline = time.monotonic() + self.options.drain_timeout_s

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        if self.mqtt is not None:
            await self.mqtt.stop(left())
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.queue is not None:
            await self.queue.drain(left())
        if self.cron is not None:
            await self.cron.stop(left())
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.metrics.flush(self.redis), left())
        self.executor.shutdown(wait=False)
        await asyncio.to_thread(self.executor.join, left())
        for client in self._redis_clients:
            with contextlib.suppress(Exception):
                await client.aclose()
        self._redis_clients.clear()
        clients.close_all()
        self._started = False
        _RUNNING.discard(self)
        log.info("gateway %s (%s) stopped: in-flight calls drained, clients closed", self.zone, self.instance)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[GatewayApp]:
        """Startup/shutdown around a block (ASGITransport does not run the lifespan)."""
        await self.startup()
        try:
            yield self
        finally:
            await self.shutdown()

    def connectors_ready(self) -> bool:
        """True when every MQTT subscription is in place (or there is none)."""
        return self.mqtt is None or not self.mqtt.enabled or self.mqtt.ready()

    def connector_status(self) -> dict[str, Any]:
        """What the connectors are doing (``/system/info``; lets a test or the demo wait for MQTT)."""
        if self.mqtt is None or not self.mqtt.enabled:
            mqtt_state = "off"
        else:
            mqtt_state = "subscribed" if self.mqtt.ready() else "connecting"
        return {
            "mqtt": mqtt_state,
            "topics": list(self.mqtt.filters) if self.mqtt is not None else [],
            "schedules": dict(self.cron.schedules) if self.cron is not None else {},
            "async": self.queue.stats() if self.queue is not None else {},
        }

    # -- /system data -------------------------------------------------------------------------------
    async def invocation_counts(self) -> dict[str, int]:
        if self.redis is None:
            return dict(self.metrics.pending)
        try:
            return await self.metrics.counts(self.redis)
        except Exception as exc:
            log.warning("reading invocation counts from Redis failed: %s", exc)
            return dict(self.metrics.pending)

    def function_status(self, fn: LoadedFunction, count: int) -> dict[str, Any]:
        spec = fn.spec
        return {
            "name": spec.name,
            "image": f"local/{spec.handler_dir.name}",
            "namespace": "openfaas-fn",
            "invocationCount": count,
            "replicas": 1,
            "availableReplicas": 1,
            "envProcess": "",
            "envVars": dict(spec.environment),
            "labels": dict(spec.labels),
            "annotations": dict(spec.annotations),
            "secrets": list(spec.secrets),
            "createdAt": self.started_at.isoformat().replace("+00:00", "Z"),
        }


async def _send_plain(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


def build_api(gw: GatewayApp) -> FastAPI:
    """The FastAPI part: /system, /async-function, /healthz, /metrics and the OpenAPI document."""
    api = FastAPI(
        title=f"metertwin gateway ({gw.zone})",
        version=VERSION,
        description=(
            "OpenFaaS-compatible gateway of one metertwin zone. `/system/*` needs basic auth "
            "(user `admin`, secret `gateway-basic-auth-password`). Function routes are documented "
            "under `/function/<name>/...` from each handler's `OPENAPI_PATHS`."
        ),
    )
    # Basic auth is enforced by the dispatcher for every /system path; this only documents it.
    basic = HTTPBasic(auto_error=False, realm="OpenFaaS API")
    system = [Depends(basic)]

    pid_header = {"X-Gateway-Pid": str(os.getpid())}

    @api.get("/healthz", response_class=PlainTextResponse, tags=["gateway"])
    async def healthz() -> PlainTextResponse:
        """Liveness: the gateway process is up (no auth). ``X-Gateway-Pid`` names the serving process."""
        return PlainTextResponse("OK", headers=pid_header)

    @api.get("/metrics", tags=["gateway"])
    async def metrics() -> Response:
        """Prometheus metrics: gateway_function_invocation_total, gateway_functions_seconds, ..."""
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/system/functions", dependencies=system, tags=["system"])
    async def list_functions() -> JSONResponse:
        """Every function of this zone with its invocation count (shared by the zone's workers)."""
        counts = await gw.invocation_counts()
        return JSONResponse([gw.function_status(fn, counts.get(name, 0)) for name, fn in gw.functions.items()])

    async def change_functions() -> PlainTextResponse:
        """Deploying, updating and removing functions is done by editing stack.yml and restarting."""
        return PlainTextResponse("the local gateway serves stack.yml as loaded; restart it to change functions\n",
                                 status_code=501)

    for method in ("POST", "PUT", "DELETE"):
        api.add_api_route("/system/functions", change_functions, methods=[method], dependencies=system,
                          tags=["system"], status_code=501, name=f"{method.lower()}_functions")

    @api.get("/system/function/{name}", dependencies=system, tags=["system"])
    async def get_function(name: str) -> Response:
        """One function's status; 404 when this zone has no such function."""
        fn = gw.functions.get(name)
        if fn is None:
            return PlainTextResponse(f"error finding function {name}: not found\n", status_code=404)
        counts = await gw.invocation_counts()
        return JSONResponse(gw.function_status(fn, counts.get(name, 0)))

    @api.post("/system/scale-function/{name}", dependencies=system, tags=["system"], status_code=501)
    async def scale_function(name: str) -> PlainTextResponse:
        """Scaling is fixed at one replica locally (run more gateway workers instead)."""
        return PlainTextResponse("scaling is not supported by the local gateway\n", status_code=501)

    @api.get("/system/info", dependencies=system, tags=["system"])
    async def info() -> dict[str, Any]:
        """Provider and version, in the shape of OpenFaaS's /system/info."""
        return {
            "provider": {"provider": "metertwin-local", "orchestration": "process",
                         "version": {"release": VERSION, "sha": ""}},
            "version": {"release": VERSION, "sha": "", "commit_message": ""},
            "arch": platform.machine(),
            "zone": gw.zone,
            "instance": gw.instance,
            "connectors": gw.connector_status(),
        }

    async def enqueue(name: str, path: str, request: Request) -> Response:
        if name not in gw.functions:
            return PlainTextResponse(f"error finding function {name}: not found\n", status_code=404)
        body = await _read_limited(request, gw.max_body_bytes)
        if isinstance(body, Response):
            return body
        call_id = request.headers.get("x-call-id") or new_call_id().decode()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        if "x-call-id" not in request.headers:
            headers.append(("X-Call-Id", call_id))
        assert gw.queue is not None, "gateway not started (use the ASGI lifespan or GatewayApp.running())"
        try:
            await gw.queue.enqueue(
                call_id=call_id, function=name, method=request.method, path="/" + path,
                query=request.url.query, headers=headers, body=body,
                callback_url=request.headers.get("x-callback-url", ""),
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
    return api


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


def create_app(
    stack_path: str | Path,
    zone: str,
    *,
    secrets_dir: str | Path | None = None,
    options: GatewayOptions | None = None,
    **overrides: Any,
) -> GatewayApp:
    """Build the gateway of ``zone`` from ``stack_path`` (keyword overrides set :class:`GatewayOptions` fields).

    The zone's function environment is applied to ``os.environ`` and its handlers are
    imported now; background work starts with the ASGI lifespan (uvicorn) or
    ``async with app.running():`` (tests with httpx's ASGITransport).
    """
    opts = options or GatewayOptions()
    for key, value in overrides.items():
        if not hasattr(opts, key):
            raise TypeError(f"unknown gateway option {key!r}")
        setattr(opts, key, value)
    return GatewayApp(stack_path, zone, secrets_dir=secrets_dir, options=opts)


def app_from_env() -> GatewayApp:
    """Factory for ``uvicorn --factory`` with several workers: reads ``GATEWAY_*`` variables."""
    stack = os.environ["GATEWAY_STACK"]
    zone = os.environ["GATEWAY_ZONE"]
    raw = json.loads(os.environ.get("GATEWAY_OPTIONS", "{}"))
    prefix = os.environ.get("GATEWAY_INSTANCE_PREFIX")
    if prefix:
        raw["instance"] = f"{prefix}-{os.getpid()}"
    return create_app(stack, zone, secrets_dir=os.environ.get("GATEWAY_SECRETS_DIR") or None, **raw)
