"""Userspace WAN emulation: an asyncio TCP delay-line proxy with byte counters.

The kernel here has no ``netem``, so every emulated link is a set of listening ports
(one per *route*: a link, the side that connects, and the service it reaches). Each
route relays TCP connections to its target and, in each direction:

* delays every chunk by ``latency_ms`` plus a uniform jitter in ``[-jitter_ms, +jitter_ms]``
  while keeping the byte order (a chunk never overtakes the one before it), like a
  pipelined delay line: chunks in flight do not wait for each other;
* optionally shapes the rate with a token bucket shared by every route of the link in
  that direction (``bandwidth_mbps``);
* counts bytes per link and direction (``"edge->fog"``) and per route.

A new connection pays one round trip (``2 * latency``) before its first bytes move, as
a TCP handshake over the real link would.

Counters are available from the Python API (:meth:`DelayProxy.stats`), from a JSON
endpoint (``GET /stats`` on ``stats_port``) and in ``stats_file`` written on exit. The
proxy is bounded: it stops itself after ``max_duration_s``.

CLI (used by ``loadtest.compare``; one process carries all routes of one architecture)::

    python -m loadtest.proxy --config routes.json --stats-port 0 --stats-file stats.json --max-duration 600

``routes.json``: ``{"links": {"edge-fog": {"latency_ms": 5, "jitter_ms": 1, "bandwidth_mbps": {"edge->fog": 100,
"fog->edge": 100}}}, "routes": [{"name": "read->redis", "link": "edge-fog", "src": "edge", "dst": "fog",
"listen_port": 0, "target_host": "127.0.0.1", "target_port": 6379}]}``. Instead of ``target_port`` a route may
name ``target_route``: it then relays to that route's listening port (chains of hops without picking ports in
advance, which other programs could take in between). The listening ports actually bound are printed as one
JSON line on stdout (``{"ready": true, "ports": {...}, "stats_port": N}``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import random
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Largest chunk read at once; bigger payloads become several chunks, each shaped and delayed.
CHUNK_BYTES = 64 * 1024
#: Bytes of a direction's queue before reading from the sender pauses (back-pressure).
MAX_BUFFER_BYTES = 4 * 1024 * 1024
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class LinkSpec:
    """Emulation parameters of one link; figures are one-way."""

    name: str
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    #: Mbit/s per direction key ``"a->b"``; a missing key means unshaped.
    bandwidth_mbps: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"link {self.name!r}: latency_ms {self.latency_ms!r} and jitter_ms "
                             f"{self.jitter_ms!r} must be >= 0")
        for key, mbps in self.bandwidth_mbps.items():
            if mbps <= 0:
                raise ValueError(f"link {self.name!r}: bandwidth_mbps[{key!r}] = {mbps!r} must be > 0")


@dataclass(frozen=True)
class Route:
    """A listening port on ``link`` relaying connections opened by ``src`` to a service at ``dst``."""

    name: str
    link: str
    src: str
    dst: str
    target_host: str
    target_port: int = 0
    listen_port: int = 0
    #: Relay to this other route's listening port instead of ``target_port``.
    target_route: str | None = None

    def __post_init__(self) -> None:
        if self.target_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"route {self.name!r}: target_host {self.target_host!r} is not loopback")
        if not self.target_port and not self.target_route:
            raise ValueError(f"route {self.name!r} needs a target_port or a target_route")

    @property
    def up(self) -> str:
        return f"{self.src}->{self.dst}"

    @property
    def down(self) -> str:
        return f"{self.dst}->{self.src}"


class TokenBucket:
    """Rate limiter in bytes per second, shared by the connections of one link direction.

    Callers take their bytes at once and sleep off any debt, which serialises concurrent
    senders at the configured rate (a burst of one ``burst_bytes`` passes unshaped).
    """

    def __init__(self, mbps: float, burst_bytes: int = 16 * 1024) -> None:
        self.rate = mbps * 1_000_000 / 8  # bytes per second
        self.burst = float(burst_bytes)
        self.tokens = self.burst
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


class DelayProxy:
    """All routes of one emulated topology in one event loop.

    Use ``await proxy.start()`` then ``proxy.port(route_name)``; ``await proxy.stop()`` closes
    everything. ``max_duration_s`` bounds the proxy's life (``run_until_stopped`` returns then).
    """

    def __init__(
        self,
        links: list[LinkSpec],
        routes: list[Route],
        *,
        max_duration_s: float = 600.0,
        stats_port: int | None = None,
        stats_file: Path | None = None,
        seed: int | None = None,
    ) -> None:
        self.links = {link.name: link for link in links}
        for route in routes:
            if route.link not in self.links:
                raise ValueError(f"route {route.name!r} names unknown link {route.link!r}")
        names = [r.name for r in routes]
        if len(set(names)) != len(names):
            raise ValueError(f"route names repeat: {sorted(n for n in names if names.count(n) > 1)}")
        for route in routes:
            if route.target_route is not None and route.target_route not in names:
                raise ValueError(f"route {route.name!r} names unknown target_route {route.target_route!r}")
        self._targets: dict[str, int] = {}
        self.routes = routes
        self.max_duration_s = max_duration_s
        self.stats_port_requested = stats_port
        self.stats_file = stats_file
        self._rng = random.Random(seed)
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        for link in links:
            for direction, mbps in link.bandwidth_mbps.items():
                self._buckets[(link.name, direction)] = TokenBucket(mbps)
        self._servers: dict[str, asyncio.Server] = {}
        self._stats_server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._link_bytes: dict[str, dict[str, int]] = {name: {} for name in self.links}
        self._route_bytes: dict[str, dict[str, int]] = {r.name: {r.up: 0, r.down: 0} for r in routes}
        self._connections: dict[str, int] = {r.name: 0 for r in routes}
        for r in routes:
            self._link_bytes[r.link].setdefault(r.up, 0)
            self._link_bytes[r.link].setdefault(r.down, 0)
        self._started = 0.0
        self._stopped = asyncio.Event()
        self._deadline_handle: asyncio.TimerHandle | None = None

    # --- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self._started = time.monotonic()
        for route in self.routes:
            server = await asyncio.start_server(
                functools.partial(self._accept, route), "127.0.0.1", route.listen_port
            )
            self._servers[route.name] = server
        for route in self.routes:
            self._targets[route.name] = self.port(route.target_route) if route.target_route else route.target_port
        if self.stats_port_requested is not None:
            self._stats_server = await asyncio.start_server(self._serve_stats, "127.0.0.1", self.stats_port_requested)
        loop = asyncio.get_running_loop()
        self._deadline_handle = loop.call_later(self.max_duration_s, self._stopped.set)

    async def run_until_stopped(self) -> None:
        """Wait until :meth:`request_stop` or the maximum duration, then stop."""
        await self._stopped.wait()
        await self.stop()

    def request_stop(self) -> None:
        self._stopped.set()

    async def stop(self) -> None:
        self._stopped.set()
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
        servers = list(self._servers.values()) + ([self._stats_server] if self._stats_server else [])
        for server in servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=2)
        self._servers.clear()
        self._stats_server = None
        if self.stats_file is not None:
            self.stats_file.write_text(json.dumps(self.stats(), indent=2))

    async def __aenter__(self) -> DelayProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- API ---------------------------------------------------------------------------
    def port(self, route_name: str) -> int:
        """The port route ``route_name`` listens on."""
        server = self._servers[route_name]
        return int(server.sockets[0].getsockname()[1])

    def ports(self) -> dict[str, int]:
        return {name: self.port(name) for name in self._servers}

    @property
    def stats_port(self) -> int | None:
        if self._stats_server is None:
            return None
        return int(self._stats_server.sockets[0].getsockname()[1])

    def stats(self) -> dict[str, Any]:
        """Byte counters: ``links[link][direction]``, ``routes[route][direction]``, connections per route."""
        return {
            "elapsed_s": round(time.monotonic() - self._started, 3) if self._started else 0.0,
            "links": {k: dict(v) for k, v in self._link_bytes.items()},
            "routes": {k: dict(v) for k, v in self._route_bytes.items()},
            "connections": dict(self._connections),
        }

    def reset_stats(self) -> None:
        """Zero every counter (between scenarios)."""
        for counters in (*self._link_bytes.values(), *self._route_bytes.values()):
            for key in counters:
                counters[key] = 0
        for key in self._connections:
            self._connections[key] = 0

    # --- relay -------------------------------------------------------------------------
    def _delay_s(self, link: LinkSpec) -> float:
        jitter = self._rng.uniform(-link.jitter_ms, link.jitter_ms) if link.jitter_ms else 0.0
        return max(0.0, link.latency_ms + jitter) / 1000.0

    async def _accept(self, route: Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._connections[route.name] += 1
        link = self.links[route.link]
        up_writer: asyncio.StreamWriter | None = None
        try:
            # The handshake crosses the link once each way before any byte moves.
            connect_at = time.monotonic() + 2 * link.latency_ms / 1000.0
            try:
                up_reader, upstream = await asyncio.wait_for(
                    asyncio.open_connection(route.target_host, self._targets[route.name]), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError):
                return
            up_writer = upstream
            await asyncio.sleep(max(0.0, connect_at - time.monotonic()))
            await asyncio.gather(
                self._pipe(route, route.up, reader, upstream),
                self._pipe(route, route.down, up_reader, writer),
            )
        except asyncio.CancelledError:
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()
            self._tasks.discard(task)

    async def _pipe(
        self, route: Route, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        link = self.links[route.link]
        bucket = self._buckets.get((route.link, direction))
        queue: deque[tuple[float, bytes]] = deque()
        queued = 0
        ready = asyncio.Event()
        room = asyncio.Event()
        room.set()
        eof = False

        async def deliver() -> None:
            nonlocal queued
            last_due = 0.0
            while True:
                while not queue:
                    if eof:
                        return
                    ready.clear()
                    await ready.wait()
                due, chunk = queue.popleft()
                queued -= len(chunk)
                if queued < MAX_BUFFER_BYTES:
                    room.set()
                due = max(due, last_due)
                last_due = due
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if bucket is not None:
                    await bucket.take(len(chunk))
                writer.write(chunk)
                await writer.drain()
                self._link_bytes[route.link][direction] += len(chunk)
                self._route_bytes[route.name][direction] += len(chunk)

        sender = asyncio.ensure_future(deliver())
        try:
            while not sender.done():
                await room.wait()
                chunk = await reader.read(CHUNK_BYTES)
                if not chunk:
                    break
                queue.append((time.monotonic() + self._delay_s(link), chunk))
                queued += len(chunk)
                if queued >= MAX_BUFFER_BYTES:
                    room.clear()
                ready.set()
        except (ConnectionError, OSError):
            pass
        finally:
            eof = True
            ready.set()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await sender
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()
            if not sender.done():
                sender.cancel()

    # --- stats endpoint -------------------------------------------------------------
    async def _serve_stats(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            line = request.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            if method == "GET" and path == "/stats":
                status, body = "200 OK", json.dumps(self.stats()).encode()
            elif method == "POST" and path == "/reset":
                self.reset_stats()
                status, body = "200 OK", json.dumps(self.stats()).encode()
            elif method == "POST" and path == "/stop":
                status, body = "200 OK", b'{"stopping": true}'
                self.request_stop()
            else:
                status, body = "404 Not Found", json.dumps({"error": f"no route {method} {path}"}).encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


# --- config / CLI ---------------------------------------------------------------------
def load_config(data: dict[str, Any]) -> tuple[list[LinkSpec], list[Route]]:
    """Links and routes from the JSON document described in the module docstring."""
    links = [
        LinkSpec(
            name=name,
            latency_ms=float(spec.get("latency_ms", 0.0)),
            jitter_ms=float(spec.get("jitter_ms", 0.0)),
            bandwidth_mbps={k: float(v) for k, v in (spec.get("bandwidth_mbps") or {}).items()},
        )
        for name, spec in data.get("links", {}).items()
    ]
    routes = [
        Route(
            name=r["name"], link=r["link"], src=r["src"], dst=r["dst"], target_host=r.get("target_host", "127.0.0.1"),
            target_port=int(r.get("target_port", 0)), listen_port=int(r.get("listen_port", 0)),
            target_route=r.get("target_route"),
        )
        for r in data.get("routes", [])
    ]
    return links, routes


async def _main(args: argparse.Namespace) -> None:
    links, routes = load_config(json.loads(Path(args.config).read_text()))
    proxy = DelayProxy(
        links, routes, max_duration_s=args.max_duration, stats_port=args.stats_port,
        stats_file=Path(args.stats_file) if args.stats_file else None, seed=args.seed,
    )
    await proxy.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proxy.request_stop)
    print(json.dumps({"ready": True, "ports": proxy.ports(), "stats_port": proxy.stats_port}), flush=True)
    await proxy.run_until_stopped()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="routes JSON file")
    parser.add_argument("--stats-port", type=int, default=None, help="serve GET /stats here (0: any free port)")
    parser.add_argument("--stats-file", default=None, help="write the final counters here on exit")
    parser.add_argument("--max-duration", type=float, default=600.0, help="stop after this many seconds")
    parser.add_argument("--seed", type=int, default=None, help="jitter random seed")
    args = parser.parse_args(argv)
    if args.max_duration <= 0:
        parser.error(f"--max-duration {args.max_duration!r} must be > 0")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is pinned in requirements.txt
        pass
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
