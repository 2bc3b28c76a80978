"""``python -m gateway.connect``: metertwin's MQTT and cron connectors in front of any OpenFaaS gateway.

OpenFaaS's own mqtt-connector and cron-connector cannot add a bearer token, and
metertwin's connector-driven routes require a ``service`` token. Run this instead of
them, one per zone (a Deployment beside the zone's OpenFaaS gateway): it reads the
zone's ``topic`` and ``schedule`` annotations from stack.yml, subscribes and ticks
exactly as the local gateway does (shared subscription, acknowledge after the
function answered, retry on 429/502/503/504, one cron fire per tick), and invokes
``POST <gateway>/function/<name>`` with ``X-Topic`` / ``X-Connector`` and the token.

    python -m gateway.connect --stack stack.yml --zone edge --gateway http://gateway.openfaas:8080 \\
        --secrets-dir /var/openfaas/secrets

Settings (broker, zone Redis for the cron lock) and secrets (``token-signing-key``,
``mqtt-password``) are read as by the functions: environment plus secret files.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

import httpx
import redis.asyncio as aioredis

from gateway.connectors import MqttConnector, ServiceToken
from gateway.cron import CronConnector
from gateway.dead_letters import ConnectorDeadLetters
from gateway.functions import Event, Result
from gateway.stack import load_stack
from metertwin.core import clients
from metertwin.core.aio import cancel_and_wait
from metertwin.core.errors import MeterTwinError
from metertwin.core.settings import get_settings, reset_settings

log = logging.getLogger("gateway.connect")
#: Headers a connector sets that the function must see; everything else is the connector's own.
_FORWARDED = ("x-topic", "x-connector", "content-type", "authorization")


class HttpInvoker:
    """Invoke a zone's functions through an OpenFaaS-compatible gateway, over HTTP."""

    def __init__(self, gateway_url: str, *, timeout_s: float) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s))

    async def __call__(self, name: str, event: Event) -> Result:
        headers = {k: v for k, v in event.headers.items() if k.lower() in _FORWARDED}
        url = f"{self.gateway_url}/function/{name}{event.path}"
        try:
            resp = await self._client.request(event.method, url, content=event.body, headers=headers)
        except httpx.HTTPError as exc:
            # Unreachable gateway: a retryable answer, so the message stays unacknowledged.
            return Result(503, [(b"content-type", b"text/plain")], f"gateway {url}: {exc!r}".encode(),
                          error=str(exc))
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()]
        return Result(resp.status_code, raw, resp.content)

    async def aclose(self) -> None:
        await self._client.aclose()


async def run(stack_path: str, zone: str, gateway_url: str, *, instance: str, timeout_s: float,
              concurrency: int, stop: asyncio.Event) -> None:
    """Run the zone's connectors until ``stop`` is set."""
    stack = load_stack(stack_path)
    specs = [s for s in stack.functions.values() if zone == "all" or s.name.startswith(f"{zone}-")]
    if not specs:
        raise MeterTwinError(f"no function of {stack_path} matches zone {zone!r}")
    settings = get_settings()
    invoke = HttpInvoker(gateway_url, timeout_s=timeout_s)
    token = ServiceToken(zone)
    redis = clients.async_redis_cluster(settings.redis_url, timeout_s=settings.redis_timeout_s, max_connections=8,
                                        decode_responses=False) \
        or aioredis.Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s,
                                   socket_connect_timeout=settings.redis_timeout_s)
    cron = CronConnector(zone, specs, invoke, token, redis)
    mqtt = MqttConnector(
        zone, specs, invoke, token, host=settings.mqtt_host, port=settings.mqtt_port,
        username=settings.mqtt_username, password=settings.mqtt_password.get_secret_value(),
        client_id=f"gw-{zone}-{instance}", concurrency=concurrency,
        dead_letters=ConnectorDeadLetters(zone, redis),
    )
    tasks = []
    try:
        if cron.schedules:
            tasks.append(asyncio.create_task(cron.run(), name="cron"))
        mqtt.start()
        log.info("connectors of zone %s -> %s: %d topic filter(s), %d schedule(s)", zone, gateway_url,
                 len(mqtt.filters), len(cron.schedules))
        await stop.wait()
    finally:
        await mqtt.stop(10.0)
        await cron.stop(10.0)
        await cancel_and_wait(tasks, 10.0)
        await invoke.aclose()
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway.connect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", required=True)
    p.add_argument("--zone", required=True, help="functions named <zone>-*; 'all' for every function")
    p.add_argument("--gateway", required=True, help="the zone's OpenFaaS (or metertwin) gateway URL")
    p.add_argument("--secrets-dir", help="folder of secret files (default /var/openfaas/secrets)")
    p.add_argument("--instance", default=socket.gethostname(), help="stable name: the MQTT session's client id")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a function's answer")
    p.add_argument("--mqtt-concurrency", type=int, default=16)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.secrets_dir:
        os.environ["SECRETS_DIR"] = args.secrets_dir
        reset_settings()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run(args.stack, args.zone, args.gateway, instance=args.instance, timeout_s=args.timeout,
                  concurrency=args.mqtt_concurrency, stop=stop)

    try:
        asyncio.run(serve())
    except MeterTwinError as exc:
        print(f"gateway.connect: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

