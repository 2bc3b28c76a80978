"""An upgrade operation's records in Redis, and the plumbing every step of it shares.

:class:`OperationStore` is the base of :class:`~metertwin.upgrade.operations.UpgradeManager`:
it reads the operation (``keys.upgrade_op``) and its per-meter index sets, moves meters
between sets, and turns Redis errors into :class:`BackendUnavailable`. The steps built on
it (:mod:`~metertwin.upgrade.switch`, :mod:`~metertwin.upgrade.drain`,
:mod:`~metertwin.upgrade.rollback`) register their Lua in :meth:`OperationStore._register_scripts`.

A state change (:meth:`OperationStore._set` with ``state``) and a twin's move into
:data:`TWIN_STEPS` (:meth:`OperationStore._move`) are ``upgrade`` events on the zone's stream,
appended in the same pipeline as the write (``metertwin.stream.events``).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from metertwin.core.clients import StrRedis
from metertwin.core.errors import BackendUnavailable, NotFound
from metertwin.stream import events
from metertwin.upgrade import keys
from metertwin.upgrade.spec import ACTIVE, ALL_SETS, InjectedCrash, Move, Operation, OperationSpec

#: Sends one control message (meter id, payload, message expiry in seconds) to a meter.
Publish = Callable[[str, dict[str, Any], int], None]
#: Fetches the gateway's Prometheus metrics text from a URL.
FetchMetrics = Callable[[str], str]
#: A twin's moves into these sets are events of its meter (the steps in between are not: a large
#: operation would flood the stream with admitted/prepared/synced for every twin).
TWIN_STEPS = frozenset({"failed", "skipped", "rolled_back"})


class OperationStore:
    """The stored operations of one zone's Redis, and crash points for tests.

    ``crash_at`` names crash points (see :data:`CRASH_POINTS`) at which :class:`InjectedCrash`
    is raised, as if the process died there (tests). ``instance`` names this manager: a
    restarted manager with the same name takes over its own lock at once.
    """

    CRASH_POINTS = (
        "planned", "admitted", "prepared", "synced", "rebind_half_sent", "rebind_sent", "reconciled",
        "finished", "counted", "cancelled", "flipped_back", "back_rebind_sent",
    )

    def __init__(
        self,
        client: StrRedis,
        *,
        instance: str | None,
        crash_at: Iterable[str],
        publish: Publish,
        metrics: FetchMetrics,
    ) -> None:
        self.r = client
        self.instance = instance or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.crash_at = set(crash_at)
        unknown = self.crash_at - set(self.CRASH_POINTS)
        if unknown:
            raise ValueError(f"unknown crash point(s) {sorted(unknown)}; known: {self.CRASH_POINTS}")
        self._publish = publish
        self._fetch_metrics = metrics
        self._register_scripts()

    def _register_scripts(self) -> None:
        """Register this class's Lua on ``self.r``; subclasses extend it (``super()`` first)."""

    def _crash(self, point: str) -> None:
        if point in self.crash_at:
            raise InjectedCrash(point)

    # ------------------------------------------------------------------ reading
    def get(self, op_id: str) -> Operation:
        raw = self._call(lambda: self.r.hgetall(keys.upgrade_op(op_id)))
        if not raw:
            raise NotFound(f"upgrade operation {op_id!r} not found", op_id=op_id)
        return Operation(op_id, OperationSpec.model_validate_json(raw["spec"]), raw)


    def active(self) -> list[str]:
        """Ids of operations not in a terminal state."""
        ids = self._call(lambda: self.r.zrange(keys.UPGRADE_OPS, 0, -1))
        pipe = self.r.pipeline(transaction=False)
        for op_id in ids:
            pipe.hget(keys.upgrade_op(op_id), "state")
        states = self._call(pipe.execute)
        return [op_id for op_id, state in zip(ids, states, strict=True) if state in ACTIVE]

    def counts(self, op_id: str) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for name in ALL_SETS:
            pipe.scard(keys.upgrade_op_set(op_id, name))
        return dict(zip(ALL_SETS, self._call(pipe.execute), strict=True))

    def _members(self, op_id: str, name: str, limit: int) -> list[str]:
        key = keys.upgrade_op_set(op_id, name)
        if limit <= 0:
            return []
        found = self._call(lambda: self.r.srandmember(key, limit))
        return list(found or [])

    def _hget_op(self, op_id: str, name: str) -> str | None:
        try:
            value = self.r.hget(keys.upgrade_op(op_id), name)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        return None if value is None else str(value)

    def _move(self, op_id: str, moves: list[Move]) -> None:
        if not moves:
            return
        pipe = self.r.pipeline(transaction=False)
        for meter_id, src, dst, why in moves:
            pipe.smove(keys.upgrade_op_set(op_id, src), keys.upgrade_op_set(op_id, dst), meter_id)
            if dst == "failed" and why:
                pipe.hset(keys.upgrade_op_set(op_id, "failures"), meter_id, why[:300])
            elif dst == "skipped" and why:
                pipe.hset(keys.upgrade_op_set(op_id, "skips"), meter_id, why[:300])
        events.queue(self.r, pipe, *[events.upgrade_twin(op_id, meter_id, dst, why or "")
                                     for meter_id, _src, dst, why in moves if dst in TWIN_STEPS])
        self._call(pipe.execute)

    def _set(self, op_id: str, **fields: Any) -> None:
        values = {k: ("" if v is None else str(v)) for k, v in fields.items()}
        values["updated_at"] = repr(time.time())
        if "state" not in fields:
            self._call(lambda: self.r.hset(keys.upgrade_op(op_id), mapping=values))
            return
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(keys.upgrade_op(op_id), mapping=values)
        events.queue(self.r, pipe, events.upgrade_state(op_id, values["state"], reason=values.get("reason")))
        self._call(pipe.execute)

    @staticmethod
    def _call(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc

