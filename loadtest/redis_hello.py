"""A raw ASGI app that does what a cached read must at least do: one async Redis HMGET, one JSON answer.

The ceiling for any Redis-backed read served by Python on this machine; ``make bench``
serves it exactly like a gateway and reports the gateway's cached reads against it.
``python -m loadtest.redis_hello --port N --redis-url URL --key KEY``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import redis.asyncio as aioredis

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def make_app(redis_url: str, key: str) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    client: Any = None

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal client
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        version, measurement = await client.hmget(key, ("v", "m"))
        body = json.dumps({"version": version, "reading": json.loads(measurement)}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from gateway.server import uvicorn_config

    parser = argparse.ArgumentParser(prog="python -m loadtest.redis_hello", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args(argv)
    uvicorn.Server(uvicorn_config(make_app(args.redis_url, args.key), args.host, args.port)).run()


if __name__ == "__main__":
    main()
