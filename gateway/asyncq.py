"""Durable ``/async-function`` calls: a Redis stream per zone, consumed by every gateway worker.

Accepting a call is one ``XADD`` (the 202 is sent after Redis has it). Workers read
with a consumer group; an entry is ``XACK``-ed and deleted only after the function ran
and its result was delivered to ``X-Callback-Url`` (or delivery gave up after bounded
retries). Nothing accepted is lost when a gateway dies:

* a worker restarted under the same consumer name (``--instance``) first re-runs the
  entries still pending for it (``XREADGROUP ... 0``);
* every worker also claims entries left pending by *other* consumers for longer than
  ``claim_idle_s`` (``XAUTOCLAIM``), at startup and then periodically.

Delivery is therefore at-least-once, as with OpenFaaS's NATS queue-worker.

Callbacks go through :mod:`metertwin.core.destinations`: the URL was checked when the call
was accepted, and the address is checked again when the callback connects (DNS rebinding);
a refused destination is not called, the refusal is logged and counted
(``callbacks_refused`` in ``/system/info``), and the entry is acknowledged. No redirects are
followed and at most ``destination_max_response_bytes`` of the answer is read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from starlette.datastructures import Headers

from gateway import keys
from gateway.functions import Event, Result
from metertwin.core.aio import cancel_and_wait, stop_requested
from metertwin.core.destinations import DestinationPolicy, DestinationRefused, guarded_async_client, post_async
from metertwin.core.errors import BackendUnavailable

log = logging.getLogger("gateway.async")

Invoke = Callable[[str, Event], Awaitable[Result]]
Fields = dict[bytes, bytes]


class QueueFull(BackendUnavailable):
    code = "queue_full"


class AsyncQueue:
    def __init__(
        self,
        zone: str,
        redis: Redis,
        invoke: Invoke,
        *,
        consumer: str,
        claim_idle_s: float = 60.0,
        concurrency: int = 8,
        callback_timeout_s: float = 10.0,
        callback_attempts: int = 3,
        retry_base_s: float = 0.5,
        policy: DestinationPolicy | None = None,
    ) -> None:
        self.zone = zone
        self.stream = keys.async_queue(zone)
        self.redis = redis
        self.invoke = invoke
        self.consumer = consumer
        self.claim_idle_s = claim_idle_s
        self.concurrency = concurrency
        self.callback_timeout_s = callback_timeout_s
        self.callback_attempts = callback_attempts
        self.retry_base_s = retry_base_s
        #: Where callbacks may go; its resolver is looked up at every connection.
        self.policy = dataclasses.replace(policy or DestinationPolicy(), timeout_s=callback_timeout_s)
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self._inflight_ids: set[bytes] = set()
        self._http: httpx.AsyncClient | None = None
        self.processed = 0
        self.callbacks_refused = 0

    # -- producer -------------------------------------------------------------------------
    async def enqueue(
        self,
        *,
        call_id: str,
        function: str,
        method: str,
        path: str,
        query: str,
        headers: list[tuple[str, str]],
        body: bytes,
        callback_url: str,
    ) -> str:
        """Store the call durably; return its stream id. Raises :class:`QueueFull` when at the bound."""
        if await self.redis.xlen(self.stream) >= keys.ASYNC_QUEUE_MAXLEN:
            raise QueueFull(f"async queue {self.stream} holds {keys.ASYNC_QUEUE_MAXLEN} calls; try again later")
        fields: dict[str, str | bytes] = {
            "call_id": call_id,
            "function": function,
            "method": method,
            "path": path,
            "query": query,
            "headers": json.dumps(headers),
            "body": body,
            "callback_url": callback_url,
            "queued_at": repr(time.time()),
        }
        entry_id = await self.redis.xadd(self.stream, fields)  # type: ignore[arg-type]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    # -- consumer -------------------------------------------------------------------------
    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, keys.ASYNC_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        """Consume until cancelled: own pending entries, then claimed ones, then new ones."""
        self._http = guarded_async_client(self.policy)
        try:
            while True:
                try:
                    await self.ensure_group()
                    await self._drain_own_pending()
                    await self._claim_abandoned()
                    await self._consume_new()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis gone: keep trying, accepted calls stay in the stream
                    if stop_requested():
                        raise asyncio.CancelledError from exc
                    log.warning("async worker %s: %s; retrying in 1 s", self.consumer, exc)
                    await asyncio.sleep(1.0)
        finally:
            await self._http.aclose()

    async def _drain_own_pending(self) -> None:
        start = "0"
        while True:
            reply: Any = await self.redis.xreadgroup(
                keys.ASYNC_GROUP, self.consumer, {self.stream: start}, count=self.concurrency
            )
            entries = _entries(reply)
            if not entries:
                return
            for entry_id, fields in entries:
                start = entry_id.decode()
                await self._spawn(entry_id, fields)

    async def _claim_abandoned(self) -> None:
        cursor: bytes | str = "0-0"
        idle_ms = int(self.claim_idle_s * 1000)
        while True:
            reply: Any = await self.redis.xautoclaim(
                self.stream, keys.ASYNC_GROUP, self.consumer, idle_ms, start_id=cursor, count=self.concurrency
            )
            cursor, entries = reply[0], reply[1]
            for entry_id, fields in entries:
                if fields is not None:
                    await self._spawn(entry_id, fields)
            if cursor in (b"0-0", "0-0"):
                return

    async def _consume_new(self) -> None:
        next_claim = time.monotonic() + max(self.claim_idle_s / 2, 1.0)
        while True:
            await self._slots.acquire()  # only read what we can run now; the rest stays claimable
            self._slots.release()
            reply: Any = await self.redis.xreadgroup(
                keys.ASYNC_GROUP, self.consumer, {self.stream: ">"}, count=self.concurrency, block=1000
            )
            for entry_id, fields in _entries(reply):
                await self._spawn(entry_id, fields)
            if time.monotonic() >= next_claim:
                await self._claim_abandoned()
                next_claim = time.monotonic() + max(self.claim_idle_s / 2, 1.0)

    async def _spawn(self, entry_id: bytes, fields: Fields) -> None:
        if entry_id in self._inflight_ids:
            return  # re-read after a Redis hiccup or re-claimed while still running here
        await self._slots.acquire()
        self._inflight_ids.add(entry_id)
        task = asyncio.create_task(self._process(entry_id, fields))
        self._inflight.add(task)
        task.add_done_callback(lambda t: self._done(t, entry_id))

    def _done(self, task: asyncio.Task[None], entry_id: bytes) -> None:
        self._inflight.discard(task)
        self._inflight_ids.discard(entry_id)
        self._slots.release()

    async def _process(self, entry_id: bytes, fields: Fields) -> None:
        call_id = fields.get(b"call_id", b"").decode()
        function = fields.get(b"function", b"").decode()
        try:
            raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                           for k, v in json.loads(fields.get(b"headers", b"[]"))]
            event = Event(
                fields.get(b"body", b""),
                Headers(raw=raw_headers),
                fields.get(b"method", b"POST").decode(),
                fields.get(b"query", b""),
                fields.get(b"path", b"/").decode() or "/",
            )
            started = time.perf_counter()
            result = await self.invoke(function, event)
            duration = time.perf_counter() - started
            callback_url = fields.get(b"callback_url", b"").decode()
            if callback_url:
                await self._callback(callback_url, call_id, function, result, duration)
        except asyncio.CancelledError:
            raise  # shutting down mid-call: the entry stays pending and is re-run
        except Exception:
            log.exception("async call %s of %s failed; left pending for a retry", call_id, function)
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.stream, keys.ASYNC_GROUP, entry_id)
        pipe.xdel(self.stream, entry_id)
        await pipe.execute()
        self.processed += 1

    async def _callback(self, url: str, call_id: str, function: str, result: Result, duration: float) -> None:
        assert self._http is not None
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in result.headers}
        headers.update({
            "X-Call-Id": call_id,
            "X-Function-Status": str(result.status),
            "X-Function-Name": function,
            "X-Duration-Seconds": f"{duration:.6f}",
        })
        for attempt in range(1, self.callback_attempts + 1):
            try:
                status, _ = await post_async(self._http, self.policy, url, content=result.body, headers=headers)
            except DestinationRefused as exc:
                # Resolved to a refused address at connect time (rebinding): never called, never retried.
                self.callbacks_refused += 1
                log.warning("callback for call %s of %s not sent: %s", call_id, function, exc.message)
                return
            except (httpx.HTTPError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if status < 500 and status != 429:
                    return
                problem = f"HTTP {status}"
            if attempt < self.callback_attempts:
                await asyncio.sleep(self.retry_base_s * 2 ** (attempt - 1))
        log.warning("callback for call %s of %s to %s failed %d times (last: %s); dropping the result",
                    call_id, function, url, self.callback_attempts, problem)

    async def drain(self, timeout_s: float) -> None:
        """Wait for in-flight calls (they ack when done); cancel what is left after ``timeout_s``."""
        if not self._inflight:
            return
        _, pending = await asyncio.wait(set(self._inflight), timeout=timeout_s)
        await cancel_and_wait(pending, timeout_s)

    def stats(self) -> dict[str, Any]:
        return {"consumer": self.consumer, "inflight": len(self._inflight), "processed": self.processed,
                "callbacks_refused": self.callbacks_refused}


def _entries(reply: Any) -> list[tuple[bytes, Fields]]:
    """Entries of an XREADGROUP reply (RESP2: list of [stream, entries]; RESP3: dict)."""
    if not reply:
        return []
    groups = reply.values() if isinstance(reply, dict) else [item[1] for item in reply]
    out: list[tuple[bytes, Fields]] = []
    for entries in groups:
        out.extend((entry_id, fields) for entry_id, fields in entries if fields is not None)
    return out
