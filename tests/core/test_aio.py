"""Background tasks stop even when a library turns their cancellation into another exception.

The gateway's count flush once hung a shutdown for good: the ``CancelledError`` of its
``Task.cancel()`` came out of the Redis client as a plain exception, the retry loop caught it
and slept again, and ``await task`` never returned (CI: a 120 s pytest timeout).
"""

from __future__ import annotations

import asyncio

from metertwin.core.aio import cancel_and_wait, stop_requested


async def _swallows_cancel_once(swallowed: list[bool]) -> None:
    """A retry loop whose first cancellation arrives as ``RuntimeError`` (as a library may do)."""
    while True:
        try:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError as exc:
                if not swallowed:
                    swallowed.append(True)
                    raise RuntimeError("connection closed") from exc
                raise
        except RuntimeError:
            continue  # the naive retry: the task runs on as if nothing asked it to stop


async def _honours_stop_requested() -> None:
    while True:
        try:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError as exc:
                raise RuntimeError("connection closed") from exc
        except RuntimeError as exc:
            if stop_requested():
                raise asyncio.CancelledError from exc


async def test_a_task_that_swallowed_its_cancellation_is_cancelled_again() -> None:
    swallowed: list[bool] = []
    task = asyncio.create_task(_swallows_cancel_once(swallowed))
    await asyncio.sleep(0)
    left = await cancel_and_wait([task], timeout_s=5.0)
    assert swallowed == [True]
    assert left == set()
    assert task.cancelled()


async def test_a_loop_that_checks_stop_requested_ends_at_the_first_cancel() -> None:
    task = asyncio.create_task(_honours_stop_requested())
    await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5.0)
    assert task in done
    assert task.cancelled()


async def test_a_task_that_never_stops_is_left_behind_after_the_deadline() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    left = await cancel_and_wait([task], timeout_s=0.3)
    assert left == {task}
    release.set()
    task.cancel()  # lets it see the event and end
    await asyncio.wait({task}, timeout=5.0)
    assert task.done()


async def test_a_task_not_cancelled_is_not_asked_to_stop() -> None:
    assert stop_requested() is False
    assert await cancel_and_wait([], timeout_s=1.0) == set()
