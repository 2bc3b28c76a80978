"""``/readyz``: is each service this zone's functions need reachable right now?

``/healthz`` says the gateway process is up; ``/readyz`` says whether a call can succeed: it
probes, concurrently and each within ``ready_timeout_s``, the zone's Redis (``PING`` on a fresh
connection, plus the hot tier's Redis when ``HOT_REDIS_URL`` is set), the MQTT broker (a TCP
connection) and, in zones whose functions use the cold tier (``S3_BUCKET`` in their
environment), S3 (any HTTP answer from the bucket's URL). 200 when every probe succeeds, else
503; the body names each target (host and port only, never credentials) and the error.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import redis.asyncio as aioredis

from metertwin.core import clients

if TYPE_CHECKING:
    from gateway.app import GatewayApp


def _host_port(url: str, default_port: int) -> str:
    parts = urlsplit(url.split(",")[0])  # a redis+cluster:// URL lists nodes: name the first
    return f"{parts.hostname or '?'}:{parts.port or default_port}"


async def _redis(url: str, timeout_s: float) -> None:
    client = clients.async_redis_cluster(url, timeout_s=timeout_s, max_connections=1) \
        or aioredis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def _tcp(host: str, port: int, timeout_s: float) -> None:
    _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    writer.close()
    await writer.wait_closed()


async def _s3(url: str, timeout_s: float) -> int:
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        return (await client.head(url)).status_code


async def _probe(name: str, target: str, check: Any, timeout_s: float) -> dict[str, Any]:
    started = time.perf_counter()
    out: dict[str, Any] = {"name": name, "target": target}
    try:
        # The outer bound covers whatever a client library does not time out itself (DNS, TLS).
        answer = await asyncio.wait_for(check, timeout_s + 0.5)
    except Exception as exc:
        out.update(reachable=False, error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    else:
        out["reachable"] = True
        if isinstance(answer, int):
            out["http_status"] = answer
    out["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return out


async def readiness(gw: GatewayApp) -> tuple[int, dict[str, Any]]:
    """(status, body) of ``/readyz`` for ``gw``'s zone."""
    s = gw.settings
    t = gw.options.ready_timeout_s
    probes = [_probe("redis", _host_port(s.redis_url, 6379), _redis(s.redis_url, t), t)]
    hot = gw.environment.get("HOT_REDIS_URL")
    if hot and hot != s.redis_url:
        probes.append(_probe("hot-redis", _host_port(hot, 6379), _redis(hot, t), t))
    probes.append(_probe("mqtt", f"{s.mqtt_host}:{s.mqtt_port}", _tcp(s.mqtt_host, s.mqtt_port, t), t))
    if "S3_BUCKET" in gw.environment:
        endpoint = (s.s3_endpoint_url or f"https://s3.{s.s3_region}.amazonaws.com").rstrip("/")
        probes.append(_probe("s3", _host_port(endpoint, 443 if endpoint.startswith("https") else 80),
                             _s3(f"{endpoint}/{s.s3_bucket}", t), t))
    checks = list(await asyncio.gather(*probes))
    ready = all(c["reachable"] for c in checks)
    return (200 if ready else 503), {"zone": gw.zone, "ready": ready, "checks": checks}
