"""Stopping background tasks for sure.

``Task.cancel()`` only asks: the ``CancelledError`` it throws into the task can be turned into
another exception on its way out of a library (for example by an ``asyncio.timeout`` that
expires at the same moment inside a Redis client), and a retry loop that catches ``Exception``
then sleeps and goes round again. Awaiting such a task waits forever: seen as a gateway
shutdown that never finished. Loops that retry on ``Exception`` call :func:`stop_requested`
before they retry, and whoever stops tasks uses :func:`cancel_and_wait`, which asks again and
gives up after a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

#: How often :func:`cancel_and_wait` repeats the request to a task that did not stop.
RECANCEL_INTERVAL_S = 0.2


def stop_requested() -> bool:
    """True when the running task has been cancelled, even if the ``CancelledError`` was swallowed."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], timeout_s: float) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait up to ``timeout_s`` for them to end; return those still running.

    A task that ignored the request is cancelled again every :data:`RECANCEL_INTERVAL_S`.
    Exceptions the tasks end with are logged, not raised: this runs on shutdown paths.
    """
    pending = {task for task in tasks if not task.done()}
    deadline = time.monotonic() + timeout_s
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_INTERVAL_S, left))
    for task in pending:
        log.warning("task %s did not stop within %.1f s of being cancelled; left running", task.get_name(), timeout_s)
    return pending
