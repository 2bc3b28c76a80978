"""The local OpenFaaS-compatible gateway of one zone, as one ASGI app (its assembly).

A small ASGI dispatcher sits in front:

* ``/function/<name>[/path]`` is served by the raw ASGI fast path (:mod:`gateway.fastpath`).
* ``/system/*`` is checked for basic auth (user ``admin``, :mod:`gateway.system`) before anything else runs.
* everything else (``/system``, ``/async-function``, ``/healthz``, ``/metrics``,
  ``/docs``, ``/openapi.json``) goes to a FastAPI app (:mod:`gateway.api`).

Background tasks (started by the ASGI lifespan, or :meth:`GatewayApp.running` in tests) are
in :mod:`gateway.lifecycle`: invocation-count flush to Redis, the async-call worker, the MQTT
and cron connectors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from gateway import access_log
from gateway.access_log import AccessLog
from gateway.api import build_api
from gateway.asyncq import AsyncQueue
from gateway.connectors import MqttConnector, ServiceToken
from gateway.cron import CronConnector, validate_schedule
from gateway.dead_letters import ConnectorDeadLetters
from gateway.fastpath import FUNCTION_PREFIX, Receive, Scope, Send
from gateway.functions import Context, LoadedFunction, Result, load_functions, merged_environment
from gateway.lifecycle import GatewayLifecycle
from gateway.metrics import GatewayMetrics
from gateway.options import GatewayOptions
from gateway.pool import HandlerPool
from gateway.stack import FunctionSpec, load_stack
from gateway.system import UNAUTHORIZED_BODY, UNAUTHORIZED_HEADERS, basic_authorized, redact_environment
from metertwin.core import clients
from metertwin.core.settings import Settings, get_settings, reset_settings

__all__ = ["GatewayApp", "GatewayOptions", "app_from_env", "create_app"]

log = logging.getLogger("gateway")


class GatewayApp(GatewayLifecycle):
    """ASGI app of one zone's gateway. Create with :func:`create_app`.

    Serving functions comes from :class:`gateway.fastpath.FunctionInvoker`, startup and
    shutdown from :class:`gateway.lifecycle.GatewayLifecycle`.
    """

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
        self.access = AccessLog(zone, self.functions, fmt=self.options.access_log_format,
                                level=self.options.access_log_level)
        self.token = ServiceToken(zone, self.options.token_ttl_s)
        self.started_at = datetime.now(UTC)
        self.redis: aioredis.Redis | None = None
        self.queue: AsyncQueue | None = None
        self.mqtt: MqttConnector | None = None
        self.cron: CronConnector | None = None
        self.dead_letters: ConnectorDeadLetters | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._deadlines: dict[asyncio.Future[Result], float] = {}
        self._redis_clients: list[aioredis.Redis] = []
        self._started = False
        password = self.settings.gateway_basic_auth_password.get_secret_value()
        self._basic_password = password.encode() if password else None
        if self._basic_password is None:
            log.warning("secret gateway-basic-auth-password is empty: every /system route answers 401")
        self.api = build_api(self)

    # -- ASGI -----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith(FUNCTION_PREFIX):
                await self._function(scope, receive, send)
                return
            if path.startswith("/system") and not basic_authorized(scope["headers"], self._basic_password):
                await send({"type": "http.response.start", "status": 401, "headers": UNAUTHORIZED_HEADERS})
                await send({"type": "http.response.body", "body": UNAUTHORIZED_BODY})
                return
        elif kind == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.api(scope, receive, send)

    # -- /system data -------------------------------------------------------------------------------
    async def invocation_counts(self) -> dict[str, int]:
        """Invocations per function, shared by the zone's workers (Redis), else this process's own."""
        if self.redis is None:
            return dict(self.metrics.pending)
        try:
            return await self.metrics.counts(self.redis)
        except Exception as exc:
            log.warning("reading invocation counts from Redis failed: %s", exc)
            return dict(self.metrics.pending)

    def function_status(self, fn: LoadedFunction, count: int) -> dict[str, Any]:
        """``fn`` as OpenFaaS's ``FunctionStatus`` (``/system/functions``)."""
        spec = fn.spec
        return {
            "name": spec.name,
            "image": f"local/{spec.handler_dir.name}",
            "namespace": "openfaas-fn",
            "invocationCount": count,
            "replicas": 1,
            "availableReplicas": 1,
            "envProcess": "",
            "envVars": redact_environment(dict(spec.environment)),
            "labels": dict(spec.labels),
            "annotations": dict(spec.annotations),
            "secrets": list(spec.secrets),
            "createdAt": self.started_at.isoformat().replace("+00:00", "Z"),
        }


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
    access_log.configure()  # a fresh worker process: access lines alone on its stderr
    return create_app(stack, zone, secrets_dir=os.environ.get("GATEWAY_SECRETS_DIR") or None, **raw)
