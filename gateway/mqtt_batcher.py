"""Batched MQTT delivery: many messages to one function per invocation (annotation ``mqtt-batch``).

A function annotated ``mqtt-batch: "<max messages>/<max wait ms>"`` gets its messages in
``POST /mqtt-batch`` calls (:mod:`metertwin.core.mqtt_batch`): a batch leaves when it is full or
when its first message has waited ``max wait``. Each message is acknowledged by the connector
only after its batch call answered it with a final status; messages answered 429/502/503/504
(or all of them, when the whole call failed that way) are invoked again with back-off, still
unacknowledged; a call that raised leaves its messages unacknowledged for the broker to redeliver.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import Headers

from gateway.dead_letters import ConnectorDeadLetters
from gateway.functions import Event, Result
from metertwin.core import mqtt_batch

log = logging.getLogger("gateway.connectors")


class Batcher:
    """Collects one function's messages into batch calls; :meth:`submit` resolves when the message is done."""

    def __init__(self, name: str, invoke: Callable[[str, Event], Awaitable[Result]],
                 token: Callable[[], bytes | None], size: int, wait_s: float, *,
                 retry_statuses: frozenset[int], retry_min_s: float, retry_max_s: float,
                 stopping: Callable[[], bool], dead_letters: ConnectorDeadLetters | None = None) -> None:
        self.name, self.size, self.wait_s = name, size, wait_s
        self._dead_letters = dead_letters
        self._invoke, self._token, self._stopping = invoke, token, stopping
        self._retry, self._retry_min_s, self._retry_max_s = retry_statuses, retry_min_s, retry_max_s
        self._items: list[tuple[Any, asyncio.Future[bool]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Batch calls made and messages they carried (retries included).
        self.calls = 0
        self.messages = 0

    async def submit(self, msg: Any) -> bool:
        """Queue ``msg``; True once its batch answered it finally (acknowledge), False to leave it unacknowledged."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._items.append((msg, fut))
        if len(self._items) >= self.size:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.wait_s, self.flush)
        return await fut

    def flush(self) -> None:
        """Send what is queued now (also at shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._items = self._items, []
        if items:
            task = asyncio.get_running_loop().create_task(self._run(items))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, items: list[tuple[Any, asyncio.Future[bool]]]) -> None:
        delay = self._retry_min_s
        pending = items
        while pending:
            retry = await self._call(pending)
            if retry and self._stopping():
                self._settle(retry, False)  # unacknowledged: redelivered to the session's next connection
                return
            if retry:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
            pending = retry

    async def _call(self, items: list[tuple[Any, asyncio.Future[bool]]]) -> list[tuple[Any, asyncio.Future[bool]]]:
        """One batch call; returns the items to invoke again (the rest are settled)."""
        body = mqtt_batch.encode([(m.topic, m.payload) for m, _ in items])
        raw = [(b"x-connector", mqtt_batch.CONNECTOR.encode()), (b"content-type", b"application/json")]
        token = self._token()
        if token:
            raw.append((b"authorization", token))
        self.calls += 1
        self.messages += len(items)
        try:
            result = await self._invoke(self.name, Event(body, Headers(raw=raw), "POST", b"", mqtt_batch.PATH))
        except Exception:
            log.exception("batch of %d messages to %s failed; leaving them unacknowledged", len(items), self.name)
            self._settle(items, False)
            return []
        if result.status in self._retry:
            log.warning("%s answered a batch of %d with %d (retrying): %s", self.name, len(items), result.status,
                        result.body[:200])
            return items
        try:
            answers = json.loads(result.body)["results"] if result.status == 200 else None
            verdicts = [(int(a["status"]), json.dumps(a.get("body")).encode()) for a in answers] \
                if answers is not None else None
        except (ValueError, KeyError, TypeError, AttributeError):
            verdicts = None
        if verdicts is None or len(verdicts) != len(items):
            # The function's verdict on the batch as a whole (a 4xx, a 500 bug): each message is
            # dead-lettered and acknowledged, as one message would be.
            log.warning("%s answered a batch of %d with %d: %s", self.name, len(items), result.status,
                        result.body[:200])
            verdicts = [(result.status if result.status >= 400 else 500, result.body)] * len(items)
        retry: list[tuple[Any, asyncio.Future[bool]]] = []
        done: list[tuple[Any, asyncio.Future[bool]]] = []
        for item, (status, answer) in zip(items, verdicts, strict=True):
            msg = item[0]
            if status in self._retry:
                retry.append(item)
                continue
            if status >= 400:
                log.warning("%s on %s answered %d in a batch", self.name, msg.topic, status)
                if self._dead_letters is not None and not await self._dead_letters.keep(
                        self.name, msg.topic, msg.payload, status, answer):
                    retry.append(item)  # not recorded: not acknowledged either
                    continue
            done.append(item)
        self._settle(done, True)
        return retry

    @staticmethod
    def _settle(items: list[tuple[Any, asyncio.Future[bool]]], ok: bool) -> None:
        for _, fut in items:
            if not fut.done():
                fut.set_result(ok)
