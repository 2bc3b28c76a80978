"""The cron connector, as OpenFaaS's cron-connector does it, inside the gateway.

Cron (annotation ``schedule``): 5-field cron, or 6 fields with seconds last
(``*/1 * * * * *``; a local extension that the real cron-connector does not accept).
At each tick every worker tries a compare-and-set on ``keys.schedule_lock(zone, fn)``
holding the last fired tick; the one that wins calls ``POST /`` with
``X-Connector: cron-connector``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from croniter import croniter
from redis.asyncio import Redis
from starlette.datastructures import Headers

from gateway import keys
from gateway.connectors import Invoke, ServiceToken
from gateway.functions import Event
from gateway.stack import FunctionSpec, StackError
from metertwin.core.aio import stop_requested

log = logging.getLogger("gateway.cron")


def validate_schedule(spec: FunctionSpec) -> str:
    expr = spec.schedule or ""
    if len(expr.split()) not in (5, 6) or not croniter.is_valid(expr):
        raise StackError(
            f"functions.{spec.name}.annotations.schedule: {expr!r} is not a cron expression "
            "(5 fields, or 6 with seconds last)"
        )
    return expr


# Compare-and-set of the last fired tick: any worker, however late, fires a tick at most once.
_CLAIM_TICK = """
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if last >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


class CronConnector:
    def __init__(self, zone: str, specs: Iterable[FunctionSpec], invoke: Invoke, token: ServiceToken,
                 redis: Redis) -> None:
        self.zone = zone
        self.schedules = {spec.name: validate_schedule(spec) for spec in specs if spec.schedule}
        self.invoke = invoke
        self.token = token
        self.redis = redis
        self.fired: dict[str, int] = dict.fromkeys(self.schedules, 0)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._claim = redis.register_script(_CLAIM_TICK)

    async def run(self) -> None:
        if not self.schedules:
            return
        await asyncio.gather(*(self._run_one(name, expr) for name, expr in self.schedules.items()))

    async def _run_one(self, name: str, expr: str) -> None:
        last = time.time()
        while True:
            base = datetime.fromtimestamp(max(time.time(), last), UTC)
            tick = float(croniter(expr, base).get_next(float))
            following = float(croniter(expr, datetime.fromtimestamp(tick, UTC)).get_next(float))
            await asyncio.sleep(max(0.0, tick - time.time()))
            last = tick
            try:
                won = await self._claim(keys=[keys.schedule_lock(self.zone, name)],
                                        args=[int(tick * 1000), max(2, int(2 * (following - tick)) + 60)])
            except Exception as exc:  # Redis down: skip this tick rather than fire it twice
                if stop_requested():
                    raise asyncio.CancelledError from exc
                log.warning("cron %s: cannot take the tick lock: %s", name, exc)
                continue
            if won:
                task = asyncio.create_task(self._fire(name))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _fire(self, name: str) -> None:
        raw = [(b"x-connector", b"cron-connector"), (b"content-type", b"application/json")]
        token = self.token.header()
        if token:
            raw.append((b"authorization", token))
        result = await self.invoke(name, Event(b"", Headers(raw=raw), "POST", b"", "/"))
        self.fired[name] += 1
        if result.status >= 400:
            log.warning("cron call of %s answered %d: %s", name, result.status, result.body[:200])

    async def stop(self, timeout_s: float) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
