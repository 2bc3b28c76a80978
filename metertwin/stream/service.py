"""The streaming service: ``GET /events`` as Server-Sent Events, ``GET /healthz``; raw ASGI.

``GET /metrics``: Prometheus text (clients, events read, clients cut).

The python3-http contract cannot stream, so this is a service of its own (like the VEN
bridge), one per zone, reading the zone's stream through one :class:`~metertwin.stream.hub.Hub`.

``GET /events?meter=&type=&topic=`` with ``Authorization: Bearer <token>``:

* each event is ``id: <stream id>`` and ``data: {"id", "type", "meter", "topic", "data"}``;
* ``Last-Event-ID`` (header, or ``last_event_id`` query parameter) resumes after that id with
  no gap and no duplicate while the events are retained; if some were trimmed meanwhile, an
  ``event: gap`` frame says so first;
* a comment line ``: heartbeat`` after ``STREAM_HEARTBEAT_S`` without events;
* a client that falls ``STREAM_CLIENT_QUEUE_MAX`` events behind gets ``event: close`` with
  the reason, and the response ends;
* ``zone=<zone>`` follows another zone's stream instead (``STREAM_ZONE_REDIS_URLS``, e.g. the fog's
  ``alert`` events for the dashboard's feeder page); ids and ``Last-Event-ID`` are that stream's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import redis

from metertwin.core.auth import authenticate
from metertwin.core.errors import BackendUnavailable, InvalidInput, MeterTwinError, NotFound, http_status
from metertwin.core.settings import get_settings
from metertwin.stream import keys, proxy
from metertwin.stream.access import Filter, filter_for
from metertwin.stream.events import Event
from metertwin.stream.hub import Framed, Hub, Subscriber, stream_id
from metertwin.stream.settings import StreamSettings, get_stream_settings

log = logging.getLogger("metertwin.stream.service")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
               (b"x-accel-buffering", b"no")]
#: Entries one backfill XRANGE returns.
BACKFILL_COUNT = 500
#: Queued events written in one chunk at most (fewer writes under load).
WRITE_BATCH = 256


class StreamApp:
    """The ASGI application. Lifespan starts the hub; every ``/events`` request is one subscriber."""

    def __init__(self, settings: StreamSettings | None = None) -> None:
        self.settings = settings or get_stream_settings()
        self.hub: Hub | None = None
        #: Other zones' streams (``STREAM_ZONE_REDIS_URLS``): one hub each, chosen with ``zone=``.
        self.zone_hubs: dict[str, Hub] = {}
        self._zone_tasks: list[asyncio.Task[None]] = []
        self._task: asyncio.Task[None] | None = None
        self.extra_routes: dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]] = {}
        #: The dashboard's REST reads (``/api/function/...``), set by :func:`create_app`.
        self.proxy: proxy.Proxy | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/events":
            await self._events(scope, receive, send)
        elif path == "/healthz":
            hub = self.hub
            await _json(send, 200 if hub else 503, {
                "clients": hub.clients if hub else 0, "last_id": hub.last_id if hub else None,
                "events_read": hub.events_read if hub else 0, "clients_cut": hub.clients_cut if hub else 0})
        elif path == "/metrics":
            await _metrics(send, self.hub)
        elif path.startswith(proxy.PREFIX) and self.proxy is not None:
            await self.proxy.handle(scope, send)
        elif path in self.extra_routes:
            await self.extra_routes[path](scope, receive, send)
        else:
            await _json(send, 404, {"error": "not_found", "message": f"no route {path!r}"})

    # --- lifespan ------------------------------------------------------------------------------
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:  # any startup failure is reported to the server, which exits
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start(self) -> None:
        """Connect to the zone's Redis and start the one XREAD loop."""
        import redis.asyncio as aioredis

        s = get_settings()
        # The hub's blocking XREAD holds one connection; backfills and health share the rest.
        client = aioredis.Redis.from_url(s.redis_url, decode_responses=True, max_connections=32,
                                         socket_timeout=s.redis_timeout_s + 5.0,
                                         socket_connect_timeout=s.redis_timeout_s)
        self.hub = Hub(client, keys.zone_events(s.zone), read_count=self.settings.read_count)
        await self.hub.start_position()
        self._task = asyncio.create_task(self.hub.run(), name="stream-hub")
        for zone, url in parse_zone_redis_urls(self.settings.zone_redis_urls).items():
            if zone == s.zone:
                continue
            other = aioredis.Redis.from_url(url, decode_responses=True, max_connections=8,
                                            socket_timeout=s.redis_timeout_s + 5.0,
                                            socket_connect_timeout=s.redis_timeout_s)
            hub = self.zone_hubs[zone] = Hub(other, keys.zone_events(zone), read_count=self.settings.read_count)
            await hub.start_position()
            self._zone_tasks.append(asyncio.create_task(hub.run(), name=f"stream-hub-{zone}"))

    async def stop(self) -> None:
        hubs = [h for h in (self.hub, *self.zone_hubs.values()) if h is not None]
        for hub in hubs:
            hub.close_all("server shutting down; reconnect with Last-Event-ID to resume")
        for task in (self._task, *self._zone_tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for hub in hubs:
            await hub.client.aclose()
        if self.proxy is not None:
            await self.proxy.aclose()

    # --- /events -------------------------------------------------------------------------------
    async def _events(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub = self.hub
        if hub is None:
            await _json(send, 503, {"error": "backend_unavailable", "message": "the stream is starting"})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
        try:
            zone = query.get("zone")
            if zone and zone != get_settings().zone:
                if zone not in self.zone_hubs:
                    raise NotFound(f"zone={zone[:40]!r} is not followed here (STREAM_ZONE_REDIS_URLS)", field="zone")
                hub = self.zone_hubs[zone]
            if scope["method"] != "GET":
                raise InvalidInput(f"method {scope['method']} is not GET", field="method")
            principal = await asyncio.to_thread(authenticate, headers.get("authorization"))
            flt = filter_for(principal, meter=query.get("meter"), type_=query.get("type"), topic=query.get("topic"))
            last_id = headers.get("last-event-id") or query.get("last_event_id") or None
            if last_id is not None:
                try:
                    stream_id(last_id)
                except ValueError:
                    raise InvalidInput(f"Last-Event-ID {last_id[:60]!r} is not a stream id",
                                       field="Last-Event-ID") from None
            if hub.clients >= self.settings.max_clients:
                raise BackendUnavailable(f"{hub.clients} clients already (STREAM_MAX_CLIENTS)")
        except MeterTwinError as exc:
            await _json(send, http_status(exc), exc.to_dict())
            return
        sub = Subscriber(flt, self.settings.client_queue_max)
        hub.add(sub)  # before the backfill: what arrives meanwhile is queued, duplicates are skipped
        watcher = asyncio.create_task(_watch_disconnect(receive, sub))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await self._serve(hub, sub, flt, last_id, send)
        except (OSError, TimeoutError, redis.RedisError) as exc:
            log.info("SSE client ended: %s", exc)
        finally:
            hub.remove(sub)
            watcher.cancel()

    async def _serve(self, hub: Hub, sub: Subscriber, flt: Filter, last_id: str | None, send: Send) -> None:
        timeout = self.settings.send_timeout_s

        async def write(chunk: bytes, more: bool = True) -> None:
            # asyncio.timeout, not wait_for: wait_for wraps each send in a task of its own
            # (loadtest.stream_bench, 1,000 clients: p50 88 -> 59 ms with both waits changed).
            async with asyncio.timeout(timeout):
                await send({"type": "http.response.body", "body": chunk, "more_body": more})

        await write(b": connected\n\n")  # headers reach the client now, not with the first event
        sent = stream_id(last_id) if last_id else (0, 0)
        if last_id is not None:
            sent = await self._backfill(hub, flt, last_id, write)
        while True:
            try:
                if sub.queue.empty():
                    async with asyncio.timeout(self.settings.heartbeat_s):
                        item = await sub.queue.get()
                else:
                    item = sub.queue.get_nowait()
            except TimeoutError:
                await write(b": heartbeat\n\n")
                continue
            chunk: list[bytes] = []
            stop = False
            while True:
                if item is None:
                    stop = True
                    break
                at = stream_id(item.event.id)
                if at > sent:  # an event both backfilled and queued goes out once
                    chunk.append(item.frame)
                    sent = at
                if len(chunk) >= WRITE_BATCH or sub.queue.empty():
                    break
                item = sub.queue.get_nowait()
            if chunk:
                await write(b"".join(chunk))
            if stop:
                if sub.closed_reason is not None and sub.closed_reason != "disconnected":
                    reason = json.dumps({"reason": sub.closed_reason})
                    await write(f"event: close\ndata: {reason}\n\n".encode(), more=False)
                return

    async def _backfill(self, hub: Hub, flt: Filter, last_id: str,
                        write: Callable[[bytes], Awaitable[None]]) -> tuple[int, int]:
        """Send what was appended after ``last_id`` (XRANGE, exclusive); returns the last id sent or passed."""
        client = hub.client
        info = await client.xinfo_stream(hub.key) if await client.exists(hub.key) else {}
        first = info.get("recorded-first-entry-id") or "0-0"
        # Trimming (unlike XDEL) leaves max-deleted-entry-id alone: entries were trimmed if fewer are
        # left than were added; the resume point is behind the first one left, so some may be lost.
        if info and int(info["entries-added"]) > int(info["length"]) and stream_id(first) > stream_id(last_id):
            gap = json.dumps({"after": last_id, "first_retained": first,
                              "reason": "events after Last-Event-ID may have been trimmed (retention)"})
            await write(f"event: gap\ndata: {gap}\n\n".encode())
        cursor, sent = last_id, stream_id(last_id)
        while True:
            entries = await client.xrange(hub.key, min=f"({cursor}", max="+", count=BACKFILL_COUNT)
            frames = []
            for entry_id, fields in entries:
                event = Event.from_entry(entry_id, fields)
                if flt.matches(event):
                    frames.append(Framed.of(event).frame)
            if frames:
                await write(b"".join(frames))
            if entries:
                cursor = entries[-1][0]
                sent = stream_id(cursor)
            if len(entries) < BACKFILL_COUNT:
                return sent


async def _watch_disconnect(receive: Receive, sub: Subscriber) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            sub.close("disconnected")
            return


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


#: Prometheus text exposition: (name, type, help, read from the hub).
METRICS: tuple[tuple[str, str, str, Callable[[Hub], int]], ...] = (
    ("metertwin_stream_clients", "gauge", "SSE clients connected.", lambda h: h.clients),
    ("metertwin_stream_events_read_total", "counter", "Events read from the zone's stream.", lambda h: h.events_read),
    ("metertwin_stream_clients_cut_total", "counter", "Clients cut off as slow consumers.", lambda h: h.clients_cut),
)


async def _metrics(send: Send, hub: Hub | None) -> None:
    """``GET /metrics``: what deploy/grafana/metertwin-gateways.json charts of this service."""
    lines = []
    for name, kind, text, read in METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {read(hub) if hub else 0}"]
    raw = ("\n".join(lines) + "\n").encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                            (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


def parse_zone_redis_urls(text: str) -> dict[str, str]:
    """``"fog=redis://h:6379/0"`` -> ``{"fog": ...}``: other zones' Redis whose streams ``zone=`` follows."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        zone, sep, url = item.partition("=")
        if not sep or zone not in ("edge", "fog", "cloud") or not url.startswith(("redis://", "rediss://")):
            raise ValueError(f"STREAM_ZONE_REDIS_URLS entry {item.split('@')[-1]!r} is not "
                             "<edge|fog|cloud>=redis(s)://host:port/db")
        out[zone] = url
    return out


def create_app() -> StreamApp:
    """The service as uvicorn runs it (``python -m metertwin.stream``): streams and the dashboard."""
    from metertwin.stream import dashboard

    app = StreamApp()
    app.extra_routes.update(dashboard.routes())
    app.proxy = proxy.Proxy(proxy.parse_gateway_urls(app.settings.gateway_urls))
    return app
