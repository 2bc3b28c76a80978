"""Many twin VENs in one asyncio process (:class:`~dr_bridge.ven.TwinVen`, one per twin) and what they share.

:class:`Bridge` owns the VENs of one shard, the ``dr-event`` invoker (every delivery is one
``POST /events``), the due-action timer (``POST /due``), the telemetry cache the reports read
(``POST /telemetry``) and the consumer opt-outs to pass on to the VTN (``POST /opts/claim``,
sent as ``oadrCreateOpt`` by the VEN of that twin, retried until the VTN acknowledges).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dr_bridge.convert import normalize_event
from dr_bridge.invoke import Invoke
from dr_bridge.ven import TwinVen
from metertwin.core.aio import cancel_and_wait, stop_requested

#: How long :meth:`Bridge.stop` waits for its loops and VENs to end.
STOP_TIMEOUT_S = 10.0

log = logging.getLogger("dr_bridge")


@dataclass
class BridgeConfig:
    """Settings of one bridge process (see ``python -m dr_bridge --help``)."""

    vtn_url: str
    #: TLS client certificate and key (PEM); also used to sign messages unless ``sign`` is False.
    cert: str | None = None
    key: str | None = None
    passphrase: str | None = None
    ca_file: str | None = None
    #: The VTN certificate's fingerprint: incoming signatures are checked against it (TLS only).
    vtn_fingerprint: str | None = None
    sign: bool = True
    check_hostname: bool = True
    #: How often the bridge runs due DR actions (``POST /due``); sub-second keeps execution in window.
    due_poll_s: float = 0.5
    #: Tries of one ``POST /events`` (timeouts, 5xx) and the back-off step between them.
    invoke_attempts: int = 3
    invoke_retry_s: float = 0.5
    #: Parallel ``POST /due`` calls while a backlog drains.
    due_concurrency: int = 8
    #: How often the telemetry cache is refreshed (``POST /telemetry``); <= the shortest sampling interval.
    telemetry_refresh_s: float = 5.0
    #: Most registrations in flight at once (a thousand VENs must not stampede the VTN).
    register_concurrency: int = 50
    #: Each VEN registers after a random delay within this window, so a fleet does not register
    #: (and then poll) in one burst that tells the VTN its VENs share one process. The service
    #: (``python -m dr_bridge``) defaults to 10 s; 0 here for tests and benchmarks.
    register_jitter_s: float = 0.0
    register_retry_max_s: float = 30.0
    #: Offered sampling rates of TELEMETRY_USAGE / TELEMETRY_STATUS.
    min_sampling_s: float = 1.0
    max_sampling_s: float = 3600.0
    report_duration_s: float = 3600.0


@dataclass
class BridgeStats:
    deliveries: int = 0
    events_answered: int = 0
    invoke_errors: int = 0
    due_calls: int = 0
    due_errors: int = 0
    reregistrations: int = 0
    opts_sent: int = 0
    #: event id -> time (monotonic) this process first saw it; for latency measurements.
    first_seen: dict[str, float] = field(default_factory=dict)


class Bridge:
    """The VENs of one shard, their shared ``dr-event`` invoker, the due-action timer and the telemetry cache."""

    def __init__(self, meter_ids: Iterable[str], config: BridgeConfig, invoke: Invoke) -> None:
        self.config = config
        self.invoke = invoke
        self.meter_ids = list(dict.fromkeys(meter_ids))
        self.vens: dict[str, TwinVen] = {}
        self.telemetry: dict[str, dict[str, Any]] = {}
        #: meter id -> the function's last answers (event id -> answer), for operators and tests.
        self.last_answers: dict[str, dict[str, dict[str, Any]]] = {}
        self.stats = BridgeStats()
        self._tasks: list[asyncio.Task[Any]] = []
        self._starting: list[asyncio.Task[Any]] = []
        self._opt_tasks: set[asyncio.Task[Any]] = set()

    async def start(self, wait: bool = True) -> None:
        """Create and register every VEN; with ``wait``, return once all are registered."""
        quiet_scheduler_logs()
        limit = asyncio.Semaphore(self.config.register_concurrency)

        async def start_one(ven: TwinVen) -> None:
            if self.config.register_jitter_s > 0:  # staggered, outside the concurrency limit
                await asyncio.sleep(random.uniform(0, self.config.register_jitter_s))
            async with limit:
                await ven.start()

        for meter_id in self.meter_ids:
            self.vens[meter_id] = TwinVen(meter_id, self)
        self._starting = [asyncio.create_task(start_one(v)) for v in self.vens.values()]
        self._tasks.append(asyncio.create_task(self._due_loop()))
        self._tasks.append(asyncio.create_task(self._telemetry_loop()))
        if wait:
            await asyncio.gather(*self._starting)

    async def stop(self) -> None:
        await cancel_and_wait([*self._tasks, *self._starting, *self._opt_tasks], STOP_TIMEOUT_S)
        await asyncio.gather(*(v.stop() for v in self.vens.values()), return_exceptions=True)
        close = getattr(self.invoke, "close", None)
        if close is not None:
            await close()

    # --- the function ------------------------------------------------------------------
    async def deliver(self, ven: TwinVen, message: dict[str, Any], events: list[Any],
                      rejected_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Send one delivery to ``dr-event``; event id -> answer, or {} when the function failed.

        ``rejected_ids``: events of the message the VEN itself rejected (schema-invalid); still
        listed by the VTN, so they must not count as an implied cancellation.
        """
        now = time.monotonic()
        normalized = []
        for event in events:
            doc = normalize_event(event)
            normalized.append(doc)
            if doc.get("event_id"):
                self.stats.first_seen.setdefault(str(doc["event_id"]), now)
        body = {"meter_id": ven.meter_id, "ven_id": ven.ven_id or ven.meter_id,
                "vtn_id": str(message.get("vtn_id") or ""), "request_id": message.get("request_id"),
                "events": normalized, "rejected_event_ids": [str(i) for i in rejected_ids or []]}
        self.stats.deliveries += 1
        # A redelivery is idempotent in dr-event (same modification -> same answer), so a failed
        # call is retried a few times before the VEN has to answer without the twin (optOut 469).
        status: int = 0
        out: dict[str, Any] = {}
        for attempt in range(self.config.invoke_attempts):
            if attempt:
                await asyncio.sleep(self.config.invoke_retry_s * attempt)
            try:
                status, out = await self.invoke("POST", "/events", body)
            except Exception as exc:
                status, out = 0, {"error": f"{type(exc).__name__}: {exc}"}
            if status == 200 or 400 <= status < 500:
                break
        if status != 200:
            self.stats.invoke_errors += 1
            log.warning("VEN %s: dr-event failed (%s): %s", ven.meter_id, status or "unreachable", out)
            return {}
        answers = {str(a.get("event_id")): a for a in out.get("responses", []) if isinstance(a, dict)}
        for answer in answers.values():
            if answer.get("response_code") != 200:
                log.info("VEN %s: event %s answered %s %s: %s", ven.meter_id, answer.get("event_id"),
                         answer.get("opt"), answer.get("response_code"), answer.get("description"))
        self.last_answers[ven.meter_id] = answers
        return answers

    async def run_due(self) -> dict[str, Any]:
        self.stats.due_calls += 1
        status, out = await self.invoke("POST", "/due", None)
        if status != 200:
            self.stats.due_errors += 1
            log.warning("dr-event /due answered %s: %s", status, out)
        if out.get("opts_pending"):
            await self.claim_opts()
        return out

    async def claim_opts(self) -> None:
        """Fetch the twins' opt-outs (consumers opting out mid-event) and send each as ``oadrCreateOpt``."""
        ids = [m for m in self.meter_ids if m in self.vens]
        for i in range(0, len(ids), 1000):
            status, out = await self.invoke("POST", "/opts/claim", {"meter_ids": ids[i:i + 1000]})
            if status != 200:
                log.warning("dr-event /opts/claim answered %s: %s", status, out)
                continue
            for opt in out.get("opts", []):
                ven = self.vens.get(str(opt.get("meter_id")))
                if ven is not None:
                    task = asyncio.create_task(self._send_opt(ven, opt))
                    self._opt_tasks.add(task)
                    task.add_done_callback(self._opt_tasks.discard)

    async def _send_opt(self, ven: TwinVen, opt: dict[str, Any]) -> None:
        """Until the VTN acknowledges it (a restart may intervene): opts are not to be lost."""
        delay = 1.0
        while not await ven.opt_out(str(opt["event_id"]), int(opt.get("modification_number") or 0),
                                    str(opt.get("reason") or "")):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        self.stats.opts_sent += 1

    async def _due_loop(self) -> None:
        while True:
            try:
                out = await self.run_due()
                # A backlog (many meters due at one instant): drain it with parallel calls,
                # which the gateway spreads over the function's replicas.
                while out.get("next_due_in_s") == 0:
                    outs = await asyncio.gather(*(self.run_due() for _ in range(self.config.due_concurrency)),
                                                return_exceptions=True)
                    ok = [o for o in outs if isinstance(o, dict)]
                    if not ok:
                        break
                    out = min(ok, key=_next_due)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if stop_requested():
                    raise asyncio.CancelledError from exc
                self.stats.due_errors += 1
                log.warning("dr-event /due failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.config.due_poll_s)

    async def refresh_telemetry(self) -> None:
        ids = self.meter_ids
        for i in range(0, len(ids), 1000):
            status, out = await self.invoke("POST", "/telemetry", {"meter_ids": ids[i:i + 1000]})
            if status == 200:
                self.telemetry.update({k: v for k, v in out.get("meters", {}).items() if v})

    async def _telemetry_loop(self) -> None:
        while True:
            try:
                await self.refresh_telemetry()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if stop_requested():
                    raise asyncio.CancelledError from exc
                log.warning("dr-event /telemetry failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.config.telemetry_refresh_s)

    def telemetry_value(self, meter_id: str, name: str) -> Any:
        return (self.telemetry.get(meter_id) or {}).get(name)


def _next_due(out: dict[str, Any]) -> float:
    value = out.get("next_due_in_s")
    return float("inf") if value is None else float(value)


class _NoCancelledJobs(logging.Filter):
    """Drops apscheduler's report of a job run cancelled by its own shutdown ("Error running job" with a
    CancelledError traceback, logged for every run not yet started when a VEN stops)."""

    def filter(self, record: logging.LogRecord) -> bool:
        kind = record.exc_info[0] if record.exc_info else None
        return not (kind is not None and issubclass(kind, asyncio.CancelledError))


_NO_CANCELLED_JOBS = _NoCancelledJobs()


def quiet_scheduler_logs() -> None:
    """apscheduler logs every job run at INFO; with a thousand VENs that is the whole log. A stopping
    bridge's cancelled job runs are not failures: not logged (real failures still are)."""
    for name in ("apscheduler", "apscheduler.scheduler", "apscheduler.executors.default"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("apscheduler.executors.default").addFilter(_NO_CANCELLED_JOBS)  # once: a set
    logging.getLogger("openleadr").setLevel(logging.WARNING)
