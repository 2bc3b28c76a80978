"""The thread pool that runs sync handlers, tuned for many short calls.

``loop.run_in_executor`` on a ``ThreadPoolExecutor`` pays, per call, a
``concurrent.futures.Future``, an asyncio wrapper future and one
``call_soon_threadsafe`` (a self-pipe write that wakes the event loop). Here a
worker hands its result to a shared list and wakes the loop only when no wake-up
is pending yet, so under load one wake-up delivers many results. Measured on the
2-core dev machine (wrk, 32 connections): a trivial handler costs ~65 µs of CPU per
request instead of ~100 µs, a handler with one Redis round trip ~130 µs instead of
~190 µs.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Item = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class HandlerPool:
    """A fixed set of daemon threads; :meth:`submit` returns an asyncio future of the call."""

    def __init__(self, size: int, name: str = "fn") -> None:
        if size < 1:
            raise ValueError(f"handler pool size {size} must be at least 1")
        self.size = size
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._wake_pending = False
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` on a pool thread; await the returned future on the running loop."""
        if self._closed:
            raise RuntimeError("handler pool is shut down")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args = item
            try:
                outcome: tuple[Any, BaseException | None] = (fn(*args), None)
            except BaseException as exc:  # delivered to the awaiting coroutine
                outcome = (None, exc)
            with self._lock:
                self._done.append((future, *outcome))
                if self._wake_pending:
                    continue
                self._wake_pending = True
            try:
                future.get_loop().call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                with self._lock:
                    self._wake_pending = False

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, []
            self._wake_pending = False
        current = asyncio.get_running_loop()
        for future, result, exc in done:
            loop = future.get_loop()
            if loop is not current:  # a future of another loop: hand it over there
                loop.call_soon_threadsafe(_settle, future, result, exc)
            else:
                _settle(future, result, exc)

    def shutdown(self, wait: bool = True) -> None:
        """Let queued calls finish, then stop the threads (``wait``: join them)."""
        if not self._closed:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)
        if wait:
            self.join(None)

    def join(self, timeout_s: float | None) -> bool:
        """Wait up to ``timeout_s`` for the threads to end (after :meth:`shutdown`); True if they all did."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
