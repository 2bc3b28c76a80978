"""Many twin VENs in one asyncio process, each an ``openleadr.OpenADRClient``.

What the stock client does not do, and :class:`TwinVen` adds:

* ``on_event`` is not a per-event callback here: every ``oadrDistributeEvent`` is sent
  whole to the ``dr-event`` function (one HTTP call per delivery), which also sees
  which events are *missing* (implied cancellation). The answer per event (optIn/optOut
  and an OpenADR response code such as 460 or 462) goes back in one ``oadrCreatedEvent``.
  Whatever fails — the gateway, the function, a malformed event — the VEN still answers
  optIn/optOut per event and never raises (an exception would opt out of every event
  of the message, on every redelivery).
* A VTN restart loses report registrations (openleadr #186): when the VTN answers again
  after a poll found it unreachable, the VEN re-registers and re-registers its reports.
* Registration is retried with backoff instead of giving up when the VTN is down at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from openleadr import OpenADRClient, enums, objects, utils

from dr_bridge.convert import event_ids, normalize_event
from dr_bridge.invoke import Invoke
from dr_bridge.security import fast_create_message, read_pem

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
    #: event id -> time (monotonic) this process first saw it; for latency measurements.
    first_seen: dict[str, float] = field(default_factory=dict)


class TwinVen(OpenADRClient):  # type: ignore[misc]
    """The VEN of one twin; its ``ven_name`` is the meter id."""

    def __init__(self, meter_id: str, bridge: Bridge) -> None:
        cfg = bridge.config
        super().__init__(
            ven_name=meter_id, vtn_url=cfg.vtn_url, ven_id=meter_id, cert=cfg.cert, key=cfg.key,
            passphrase=cfg.passphrase, vtn_fingerprint=cfg.vtn_fingerprint, show_fingerprint=False,
            ca_file=cfg.ca_file, disable_signature=not cfg.sign, check_hostname=cfg.check_hostname,
        )
        # apscheduler skips a job that starts more than 1 s late (misfire_grace_time=1): under load a
        # busy loop would silently drop polls. Run late polls anyway, merging missed ones.
        self.scheduler.configure(job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1})
        if cfg.cert and cfg.key:
            # openleadr re-parses the private key for every signature (~65 ms with RSA): parse once.
            self._create_message = functools.partial(
                fast_create_message, cert=read_pem(cfg.cert), key=read_pem(cfg.key), passphrase=cfg.passphrase,
                disable_signature=not cfg.sign)
        self.meter_id = meter_id
        self.bridge = bridge
        self.registered = asyncio.Event()
        self._answered = False
        self._vtn_lost = False
        self.add_hook("after_receive_xml", self._on_any_response)
        self._add_reports()

    # --- reports ---------------------------------------------------------------------
    def _add_reports(self) -> None:
        cfg = self.bridge.config
        sampling = objects.SamplingRate(
            min_period=timedelta(seconds=cfg.min_sampling_s), max_period=timedelta(seconds=cfg.max_sampling_s),
            on_change=False)
        duration = timedelta(seconds=cfg.report_duration_s)
        self.add_report(callback=self._usage, resource_id=self.meter_id, measurement="real_power", unit="W",
                        report_specifier_id=f"usage-{self.meter_id}", r_id=f"{self.meter_id}-power",
                        report_name=enums.REPORT_NAME.TELEMETRY_USAGE, report_duration=duration,
                        sampling_rate=sampling)
        for name in ("online", "load_limit_w"):
            self.add_report(callback=lambda n=name: self._status(n), resource_id=self.meter_id,
                            report_specifier_id=f"status-{self.meter_id}", r_id=f"{self.meter_id}-{name}",
                            report_name=enums.REPORT_NAME.TELEMETRY_STATUS, report_duration=duration,
                            reading_type=enums.READING_TYPE.X_NOT_APPLICABLE,
                            sampling_rate=sampling)

    def _usage(self) -> list[tuple[Any, float]]:
        value = self.bridge.telemetry_value(self.meter_id, "power_w")
        return [] if value is None else [(_utcnow(), float(value))]

    def _status(self, name: str) -> list[tuple[Any, float]]:
        data = self.bridge.telemetry.get(self.meter_id)
        if not data:
            return [(_utcnow(), 0.0)] if name == "online" else []
        if name == "online":
            return [(_utcnow(), 1.0 if data.get("online") else 0.0)]
        limit = data.get("load_limit_w")
        # -1 means "no load limit in force" (a float is all TELEMETRY_STATUS carries here).
        return [(_utcnow(), -1.0 if limit is None else float(limit))]

    async def update_report(self, report_request_id: str) -> None:
        # openleadr's create_report shares one r_id list between the report requests of one
        # message (a list built outside its loop): keep each request to its own report's points.
        request = utils.find_by(self.report_requests, "report_request_id", report_request_id)
        if request is not None:
            spec = request["report_specifier_id"]
            request["r_ids"] = [r for r in request["r_ids"] if (spec, r) in self.report_callbacks]
        await super().update_report(report_request_id)

    # --- events ----------------------------------------------------------------------
    async def _on_event(self, message: dict[str, Any]) -> None:
        """Answer every event of one delivery; never raises."""
        try:
            await self._answer_events(message)
        except Exception:  # the VEN must keep polling whatever happens
            log.exception("VEN %s: could not answer a delivery", self.meter_id)

    async def _answer_events(self, message: dict[str, Any]) -> None:
        events = message.get("events") or []
        if not isinstance(events, list):
            events = [events]
        invalid_vtn_id = str(message.get("vtn_id") or "").islower()
        answers = await self.bridge.deliver(self, message, events)
        responses = []
        for event in events:
            ids = event_ids(event)
            if ids is None:
                continue  # nothing to answer to without an id
            event_id, mod = ids
            answer = answers.get(event_id)
            if answer is None:
                # The function could not be reached: keep an earlier answer, else decline (469).
                previous = self.responded_events.get(event_id)
                answer = {"opt": previous or "optOut", "response_code": 200 if previous else 469}
            opt = answer.get("opt") if answer.get("opt") in ("optIn", "optOut") else "optOut"
            self.responded_events[event_id] = opt
            if event.get("response_required", "always") != "always":
                continue
            try:
                if utils.determine_event_status(event["active_period"]) == "completed":
                    continue
            except Exception:  # a malformed active period is answered, with the function's code
                pass
            code = int(answer.get("response_code", 200))
            responses.append({"response_code": code, "response_description": "OK" if code == 200 else "ERROR",
                              "opt_type": opt, "request_id": message.get("request_id"),
                              "modification_number": mod, "event_id": event_id})
        self.received_events = [e for e in events if event_ids(e) is not None]
        self.bridge.stats.events_answered += len(responses)
        if not responses:
            return
        response = {"response_code": enums.STATUS_CODES.INVALID_ID if invalid_vtn_id else 200,
                    "response_description": "ERROR" if invalid_vtn_id else "OK",
                    "request_id": message.get("request_id")}
        xml = self._create_message("oadrCreatedEvent", response=response, event_responses=responses,
                                   ven_id=self.ven_id)
        await self._perform_request("EiEvent", xml)

    # --- polling, VTN restarts ----------------------------------------------------------
    async def _on_any_response(self, _xml: str) -> None:
        self._answered = True

    async def poll(self) -> tuple[str | None, dict[str, Any]]:
        self._answered = False
        result = await super().poll()
        if not self._answered:
            if not self._vtn_lost:
                log.warning("VEN %s: VTN %s unreachable", self.meter_id, self.vtn_url)
            self._vtn_lost = True
            return None, {}
        if self._vtn_lost:
            self._vtn_lost = False
            await self.reregister()
        if not result:
            return None, {}
        return result  # type: ignore[no-any-return]

    async def reregister(self) -> None:
        """Register again, and the reports with it: a restarted VTN has forgotten both (openleadr #186)."""
        self.bridge.stats.reregistrations += 1
        requests: list[dict[str, Any]] = list(self.report_requests)
        for request in requests:
            job = request.get("job")
            if job is not None:
                with contextlib.suppress(Exception):  # already gone
                    job.remove()
        self.report_requests.clear()
        self.incomplete_reports.clear()
        await self.create_party_registration(ven_id=self.ven_id)
        if self.registration_id:
            await self.register_reports(self.reports)
            await self.sync_events()

    async def start(self) -> None:
        """Register (retrying with backoff while the VTN is unreachable) and start polling."""
        delay = 1.0
        while True:
            await self.run()
            if self.registration_id:
                self._drop_status_log_job()
                self.registered.set()
                return
            self.client_session = None  # run() closed it when registration failed
            self.scheduler.remove_all_jobs()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.bridge.config.register_retry_max_s)

    def _drop_status_log_job(self) -> None:
        # openleadr logs event status changes every 10 s per VEN; the twin keeps the status itself,
        # and a thousand such jobs are a tenth of the idle CPU.
        for job in self.scheduler.get_jobs():
            if getattr(job.func, "__name__", "") == "_event_status_log":
                job.remove()

    async def stop(self) -> None:
        try:
            if self.client_session is not None:
                await super().stop()
            elif self.scheduler.running:
                self.scheduler.shutdown(wait=False)
        except Exception:  # stopping must not fail the others
            log.debug("VEN %s: error while stopping", self.meter_id, exc_info=True)


def _utcnow() -> datetime:
    return datetime.now(UTC)


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

    async def start(self, wait: bool = True) -> None:
        """Create and register every VEN; with ``wait``, return once all are registered."""
        quiet_scheduler_logs()
        limit = asyncio.Semaphore(self.config.register_concurrency)

        async def start_one(ven: TwinVen) -> None:
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
        for task in [*self._tasks, *self._starting]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._starting, return_exceptions=True)
        await asyncio.gather(*(v.stop() for v in self.vens.values()), return_exceptions=True)
        close = getattr(self.invoke, "close", None)
        if close is not None:
            await close()

    # --- the function ------------------------------------------------------------------
    async def deliver(self, ven: TwinVen, message: dict[str, Any], events: list[Any]) -> dict[str, dict[str, Any]]:
        """Send one delivery to ``dr-event``; event id -> answer, or {} when the function failed."""
        now = time.monotonic()
        normalized = []
        for event in events:
            doc = normalize_event(event)
            normalized.append(doc)
            if doc.get("event_id"):
                self.stats.first_seen.setdefault(str(doc["event_id"]), now)
        body = {"meter_id": ven.meter_id, "ven_id": ven.ven_id or ven.meter_id,
                "vtn_id": str(message.get("vtn_id") or ""), "request_id": message.get("request_id"),
                "events": normalized}
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
        return out

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
                log.warning("dr-event /telemetry failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.config.telemetry_refresh_s)

    def telemetry_value(self, meter_id: str, name: str) -> Any:
        return (self.telemetry.get(meter_id) or {}).get(name)


def _next_due(out: dict[str, Any]) -> float:
    value = out.get("next_due_in_s")
    return float("inf") if value is None else float(value)


def quiet_scheduler_logs() -> None:
    """apscheduler logs every job run at INFO; with a thousand VENs that is the whole log."""
    for name in ("apscheduler", "apscheduler.scheduler", "apscheduler.executors.default"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("openleadr").setLevel(logging.WARNING)
