"""The gateway app's life: ASGI lifespan, background tasks, graceful shutdown, connector status.

Background tasks (started by the ASGI lifespan, or :meth:`GatewayLifecycle.running` in
tests): the exec-timeout sweep, the invocation-count flush to Redis, the async-call
worker, the MQTT and cron connectors. A mixin of :class:`gateway.app.GatewayApp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Self, cast

import redis.asyncio as aioredis

from gateway.asyncq import AsyncQueue
from gateway.connectors import MqttConnector, ServiceToken
from gateway.cron import CronConnector
from gateway.dead_letters import ConnectorDeadLetters
from gateway.fastpath import FunctionInvoker, Receive, Send
from gateway.stack import FunctionSpec, StackError
from metertwin.core import clients
from metertwin.core.aio import cancel_and_wait
from metertwin.core.destinations import policy_from_settings
from metertwin.core.settings import Settings

log = logging.getLogger("gateway")

#: Apps started in this process and not yet shut down (their environments must agree).
_RUNNING: set[GatewayLifecycle] = set()


class GatewayLifecycle(FunctionInvoker):
    """Startup and shutdown of one gateway app (its clients, tasks and connectors)."""

    # Set by GatewayApp.__init__ (declared here for the type checker).
    zone: str
    instance: str
    environment: dict[str, str]
    settings: Settings
    specs: list[FunctionSpec]
    token: ServiceToken
    redis: aioredis.Redis | None
    queue: AsyncQueue | None
    mqtt: MqttConnector | None
    cron: CronConnector | None
    dead_letters: ConnectorDeadLetters | None
    _tasks: list[asyncio.Task[Any]]
    _redis_clients: list[aioredis.Redis]
    _started: bool

    def _check_environment(self) -> None:
        for other in _RUNNING:
            clash = sorted(k for k, v in self.environment.items() if other.environment.get(k, v) != v)
            if clash:
                raise StackError(
                    f"gateway {self.zone} and gateway {other.zone} run in one process but set {clash} differently; "
                    "the environment is process-wide: run zones in separate processes (gateway.server.GatewayProcess)"
                )

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

    # -- lifecycle --------------------------------------------------------------------------------
    def _new_redis(self, socket_timeout_s: float) -> aioredis.Redis:
        # A redis+cluster:// URL gives a Redis Cluster client: the gateway's keys are one key per
        # command (or one stream per MULTI), so they run on a cluster unchanged.
        client = clients.async_redis_cluster(self.settings.redis_url, timeout_s=socket_timeout_s,
                                             max_connections=self.settings.redis_max_connections,
                                             decode_responses=False)
        if client is None:
            client = aioredis.Redis.from_url(
                self.settings.redis_url,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=self.settings.redis_timeout_s,
                health_check_interval=30,
            )
        self._redis_clients.append(client)
        return cast(aioredis.Redis, client)

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
        self.dead_letters = ConnectorDeadLetters(self.zone, self.redis)
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
            policy=policy_from_settings(self.settings),
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
            shared=self.options.mqtt_shared, dead_letters=self.dead_letters,
        )
        self.mqtt.observe_lag = self.metrics.mqtt_lag.observe
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
        await cancel_and_wait(self._tasks, left())
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
    async def running(self) -> AsyncIterator[Self]:
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
