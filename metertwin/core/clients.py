"""Long-lived clients, created once per process and reused by every invocation.

Handlers are stateless: all state is in Redis (and S3); these are connections,
not state. They are thread-safe: the gateway runs sync handlers in a thread pool,
as waitress does on OpenFaaS.

Only ``redis`` is imported at load time (every function talks to its zone's Redis).
httpx, paho-mqtt (through :mod:`metertwin.core.mqtt`) and ``redis.asyncio`` are imported
by the getter that needs them, so a function's image installs only what that function
uses: each image pip-installs just the template's requirements and the function's own
``requirements.txt`` (tests/deploy/test_function_envs.py checks every function that way).
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import threading
from typing import TYPE_CHECKING, Any, TypeAlias

import redis

from metertwin.core.settings import get_settings, redis_cluster_nodes

if TYPE_CHECKING:
    import httpx

    from metertwin.core.mqtt import TwinMqtt

_lock = threading.Lock()

#: A Redis client with ``decode_responses=True``. redis-py's annotations type every
#: reply as ``bytes | str`` whatever that flag says, so ours is typed loosely, once, here.
StrRedis: TypeAlias = Any


@functools.cache
def get_redis() -> StrRedis:
    """The zone's Redis (or Redis Cluster, see ``Settings.redis_url``), with timeouts on connect and every command."""
    s = get_settings()
    cluster = redis_cluster(s.redis_url, timeout_s=s.redis_timeout_s, max_connections=s.redis_max_connections)
    if cluster is not None:
        return cluster
    # A blocking pool: past redis_max_connections, callers queue for a connection (bounded by
    # the timeout) instead of failing with "Too many connections" under a burst.
    pool = redis.BlockingConnectionPool.from_url(
        s.redis_url,
        max_connections=s.redis_max_connections,
        timeout=s.redis_timeout_s,
        decode_responses=True,
        socket_timeout=s.redis_timeout_s,
        socket_connect_timeout=s.redis_timeout_s,
        health_check_interval=30,
    )
    return redis.Redis(connection_pool=pool)


def redis_cluster(url: str, *, timeout_s: float, max_connections: int) -> StrRedis | None:
    """A Redis Cluster client for a ``redis+cluster://`` URL (None for any other URL).

    The same timeouts as one Redis; ``max_connections`` is per node, and past it callers queue
    for a connection (a blocking pool per node) instead of failing under a burst. The client
    discovers the slot map from the listed nodes and follows MOVED/ASK redirections itself; its
    pipelines accept script calls (:mod:`metertwin.core.redis_cluster`).
    """
    found = redis_cluster_nodes(url)
    if found is None:
        return None
    from metertwin.core.redis_cluster import cluster_client  # redis.cluster: only cluster zones need it

    return cluster_client(*found, timeout_s=timeout_s, max_connections=max_connections)


def async_redis_cluster(url: str, *, timeout_s: float, max_connections: int,
                        decode_responses: bool = True) -> StrRedis | None:
    """:func:`redis_cluster` for asyncio (``redis.asyncio.cluster.RedisCluster``); None for a plain URL."""
    found = redis_cluster_nodes(url)
    if found is None:
        return None
    from metertwin.core.redis_cluster import async_cluster_client

    return async_cluster_client(*found, timeout_s=timeout_s, max_connections=max_connections,
                                decode_responses=decode_responses)


_async_redis: tuple[asyncio.AbstractEventLoop, StrRedis] | None = None


def get_async_redis() -> StrRedis:
    """The zone's Redis for code running on the current event loop (a local gateway's async lane)."""
    global _async_redis
    loop = asyncio.get_running_loop()
    if _async_redis is None or _async_redis[0] is not loop:
        import redis.asyncio as aioredis  # only the local gateway's async lane needs it

        s = get_settings()
        client = async_redis_cluster(s.redis_url, timeout_s=s.redis_timeout_s, max_connections=s.redis_max_connections)
        if client is None:
            pool = aioredis.BlockingConnectionPool.from_url(
                s.redis_url, max_connections=s.redis_max_connections, timeout=s.redis_timeout_s,
                decode_responses=True, socket_timeout=s.redis_timeout_s,
                socket_connect_timeout=s.redis_timeout_s, health_check_interval=30,
            )
            client = aioredis.Redis(connection_pool=pool)
        _async_redis = (loop, client)
    return _async_redis[1]


@functools.cache
def get_http() -> httpx.Client:
    """Outbound HTTP (webhooks, peer functions), pooled, with a timeout on every phase."""
    import httpx  # a function that never calls out needs no httpx in its image

    return httpx.Client(timeout=httpx.Timeout(get_settings().publish_timeout_s), follow_redirects=False)


_mqtt: TwinMqtt | None = None


def get_mqtt() -> TwinMqtt:
    """The process's MQTT session to the zone's broker (connected on first use)."""
    global _mqtt
    with _lock:
        if _mqtt is None:
            from metertwin.core.mqtt import TwinMqtt  # paho-mqtt: only functions that publish need it

            s = get_settings()
            client = TwinMqtt(
                host=s.mqtt_host,
                port=s.mqtt_port,
                username=s.mqtt_username,
                password=s.mqtt_password.get_secret_value(),
                connect_timeout_s=s.mqtt_connect_timeout_s,
            )
            client.connect()
            _mqtt = client
        return _mqtt


def close_all() -> None:
    """Close every client this module created (process shutdown, tests)."""
    global _mqtt, _async_redis
    with _lock:
        if _mqtt is not None:
            _mqtt.close()
            _mqtt = None
        # The async client belongs to its event loop, which closes its connections.
        _async_redis = None
    if get_http.cache_info().currsize:
        get_http().close()
        get_http.cache_clear()
    if get_redis.cache_info().currsize:
        get_redis().close()
        get_redis.cache_clear()


atexit.register(close_all)
