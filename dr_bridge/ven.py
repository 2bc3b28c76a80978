"""The VEN of one twin: an ``openleadr.OpenADRClient`` with what a conformant 2.0b VEN needs on top.

What the stock client does not do, and :class:`TwinVen` adds:

* ``on_event`` is not a per-event callback here: every ``oadrDistributeEvent`` is sent
  whole to the ``dr-event`` function (one HTTP call per delivery), which also sees
  which events are *missing* (implied cancellation). The answer per event (optIn/optOut,
  an OpenADR response code and its description) goes back in one ``oadrCreatedEvent``.
  Whatever fails — the gateway, the function, a malformed event — the VEN still answers
  optIn/optOut per event and never raises (an exception would opt out of every event
  of the message, on every redelivery).
* Messages are read event by event (:mod:`dr_bridge.oadr_xml`): a schema-invalid event is
  answered with its own error code and never blocks the valid ones; ids stay strings.
* A consumer's opt-out during an event is sent as ``oadrCreateOpt`` (optOut) for that event.
* A VTN restart loses report registrations (openleadr #186): when the VTN answers again
  after a poll found it unreachable, the VEN re-registers and re-registers its reports.
  Reports made while the VTN is unreachable are queued (bounded) and sent once it answers;
  a restart logs one warning per VEN, no tracebacks.
* Registration is retried with backoff instead of giving up when the VTN is down at start
  (the bridge staggers the first attempts, ``register_jitter_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import random
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

import aiohttp
from lxml.etree import XMLSyntaxError
from openleadr import OpenADRClient, enums, errors, objects, utils
from signxml.exceptions import InvalidSignature

from dr_bridge.convert import event_ids
from dr_bridge.oadr_xml import STATUS_SUFFIX, read_message, shape_signed_object
from dr_bridge.security import fast_create_message, read_pem

if TYPE_CHECKING:
    from dr_bridge.bridge import Bridge

log = logging.getLogger("dr_bridge")

#: Reports kept per VEN while the VTN does not answer (the oldest are dropped beyond it).
REPORT_QUEUE_MAX = 1000
#: A VTN's answer that it does not know this VEN (any message may get it, not only a poll).
REREGISTRATION = "oadrRequestReregistration"
#: Re-registrations in a row one report may cause before it is given up.
REREGISTER_TRIES = 3


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
        signing = bool(cfg.cert and cfg.key)
        # openleadr re-parses the private key for every signature (~65 ms with RSA): parse once;
        # and shape what its templates render wrongly (transport address, resource status).
        self._create_message = functools.partial(
            fast_create_message, cert=read_pem(cfg.cert) if signing and cfg.cert else None,
            key=read_pem(cfg.key) if signing and cfg.key else None,
            passphrase=cfg.passphrase, disable_signature=not cfg.sign or not signing, shape=shape_signed_object)
        self.meter_id = meter_id
        self.bridge = bridge
        self.registered = asyncio.Event()
        self._answered = False
        self._vtn_lost = False
        #: Set by :meth:`stop`: a poll cancelled then is the shutdown, not an error to log.
        self._stopping = False
        #: Whether a distribution was handled since this VEN started (an empty one then needs no call).
        self._distribution_seen = False
        #: True while :meth:`reregister` runs: queued reports wait for the VTN's new report requests.
        self._reregistering = False
        #: Set while the report worker waits for the VTN to answer again (created only then: 1,000 VENs).
        self._vtn_back: asyncio.Event | None = None
        #: Reports made while the VTN did not answer, oldest first.
        self.report_backlog: list[Any] = []
        self.reports_sent = 0
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
        self.add_report(callback=self._status, resource_id=self.meter_id,
                        report_specifier_id=f"status-{self.meter_id}", r_id=f"{self.meter_id}{STATUS_SUFFIX}",
                        report_name=enums.REPORT_NAME.TELEMETRY_STATUS, report_duration=duration,
                        reading_type=enums.READING_TYPE.X_NOT_APPLICABLE, sampling_rate=sampling)

    def _usage(self) -> list[tuple[Any, float]]:
        value = self.bridge.telemetry_value(self.meter_id, "power_w")
        return [] if value is None else [(_utcnow(), float(value))]

    def _status(self) -> list[tuple[Any, dict[str, Any]]]:
        """One ``oadrPayloadResourceStatus`` (rendered by :func:`~dr_bridge.oadr_xml.shape_signed_object`)."""
        data = self.bridge.telemetry.get(self.meter_id) or {}
        return [(_utcnow(), {"online": bool(data.get("online")), "manual_override": bool(data.get("opt_out")),
                             "load_limit_w": data.get("load_limit_w"), "baseline_w": data.get("baseline_w")})]

    async def update_report(self, report_request_id: str) -> None:
        # openleadr's create_report shares one r_id list between the report requests of one
        # message (a list built outside its loop): keep each request to its own report's points.
        request = utils.find_by(self.report_requests, "report_request_id", report_request_id)
        if request is not None:
            spec = request["report_specifier_id"]
            request["r_ids"] = [r for r in request["r_ids"] if (spec, r) in self.report_callbacks]
        await super().update_report(report_request_id)

    def _report_message(self, report: Any) -> str:
        statuses: list[dict[str, Any]] = []
        if any(isinstance(i.report_payload.value, dict) for i in report.intervals or []):
            report = copy.deepcopy(report)  # the queued original stays re-sendable
            for interval in report.intervals:
                if isinstance(interval.report_payload.value, dict):  # a status point: its index stands in
                    statuses.append(interval.report_payload.value)
                    interval.report_payload.value = float(len(statuses) - 1)
        message = self._create_message("oadrUpdateReport", ven_id=self.ven_id, request_id=utils.generate_id(),
                                       reports=[report], shape_args={"statuses": statuses})
        return str(message)

    async def _report_queue_worker(self) -> None:
        """Send reports in order; while the VTN does not answer, keep them (bounded) and wait for it."""
        refused = 0  # times in a row the VTN answered the first queued report oadrRequestReregistration
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                if not self.report_backlog:
                    self.report_backlog.append(await self.pending_reports.get())
                while not self.pending_reports.empty():
                    self.report_backlog.append(self.pending_reports.get_nowait())
                del self.report_backlog[:-REPORT_QUEUE_MAX]  # bounded: the oldest go first
                report = self.report_backlog[0] = self._for_current_request(self.report_backlog[0])
                self._answered = False
                try:
                    result = await self._perform_request("EiReport", self._report_message(report))
                except Exception as exc:  # a report that cannot be built is dropped, not retried forever
                    log.warning("VEN %s: report not sent: %s: %s", self.meter_id, type(exc).__name__, exc)
                    self.report_backlog.pop(0)
                    continue
                if not self._answered:
                    self._vtn_back = asyncio.Event()
                    await self._vtn_back.wait()
                    self._vtn_back = None
                    continue
                if isinstance(result, tuple) and result[0] == REREGISTRATION:
                    if refused < REREGISTER_TRIES:
                        # The VTN has forgotten this VEN (a VTN that looks VENs up): the report was not
                        # taken. Register again, then send it under the new report request.
                        refused += 1
                        await self.reregister()
                        continue
                    log.warning("VEN %s: report dropped: the VTN asks to re-register after every registration",
                                self.meter_id)
                refused = 0
                self.report_backlog.pop(0)
                self.reports_sent += 1
                payload = result[1] if isinstance(result, tuple) else {}
                if "cancel_report" in payload:
                    await self.cancel_report(payload["cancel_report"])

    def _for_current_request(self, report: Any) -> Any:
        """A queued report under the VTN's current request for its report: after a restart and
        re-registration the VTN knows only its new report request ids (openleadr's VTN silently
        drops values sent under an id it does not know)."""
        current = [r for r in self.report_requests if r.get("report_specifier_id") == report.report_specifier_id]
        if not current or any(r.get("report_request_id") == report.report_request_id for r in current):
            return report
        report = copy.copy(report)
        report.report_request_id = current[-1]["report_request_id"]
        return report

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
        rejected = [r for r in message.get("rejected_events") or [] if r.get("event_id")]
        invalid_vtn_id = str(message.get("vtn_id") or "").islower()
        # An empty distribution cancels, by implication, every event the VEN had: it goes to the twin
        # unless the VEN knows it has none (a VTN may send one on every poll).
        had_events = bool(getattr(self, "received_events", None))  # (set by openleadr)
        if events or rejected or had_events or not self._distribution_seen:
            answers = await self.bridge.deliver(self, message, events, [r["event_id"] for r in rejected])
        else:
            answers = {}
        self._distribution_seen = True
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
                answer = {"opt": previous or "optOut", "response_code": 200 if previous else 469,
                          "description": "OK" if previous else "the twin could not be reached; try again"}
            opt = str(answer.get("opt")) if answer.get("opt") in ("optIn", "optOut") else "optOut"
            self.responded_events[event_id] = opt
            if event.get("response_required", "always") != "always":
                continue
            try:
                if utils.determine_event_status(event["active_period"]) == "completed":
                    continue
            except Exception:  # a malformed active period is answered, with the function's code
                pass
            code = int(answer.get("response_code", 200))
            responses.append(_response(message, event_id, mod, opt, code, answer.get("description")))
        for bad in rejected:
            self.responded_events[bad["event_id"]] = "optOut"
            if bad.get("response_required", "always") == "always":
                responses.append(_response(message, bad["event_id"], bad["modification_number"], "optOut",
                                           bad["response_code"], bad["description"]))
        self.received_events = [e for e in events if event_ids(e) is not None]
        self.bridge.stats.events_answered += len(responses)
        if not responses:
            return
        response = {"response_code": enums.STATUS_CODES.INVALID_ID if invalid_vtn_id else 200,
                    "response_description": escape(f"vtnID {message.get('vtn_id')!r} is all lower case")
                    if invalid_vtn_id else "OK", "request_id": message.get("request_id")}
        xml = self._create_message("oadrCreatedEvent", response=response, event_responses=responses,
                                   ven_id=self.ven_id)
        await self._perform_request("EiEvent", xml)

    async def opt_out(self, event_id: str, modification_number: int, reason: str) -> bool:
        """Tell the VTN this VEN no longer takes part in an event (``oadrCreateOpt`` optOut); True once
        the VTN acknowledged it. Later redeliveries are answered optOut (the twin's record says so)."""
        self.responded_events[event_id] = "optOut"
        log.info("VEN %s: opting out of event %s (%s)", self.meter_id, event_id, reason)
        result = await self.create_opt(opt_type=enums.OPT.OPT_OUT, opt_reason=enums.OPT_REASON.OVERRIDE_STATUS,
                                       targets=[objects.Target(ven_id=self.ven_id)], event_id=event_id,
                                       modification_number=modification_number)
        return bool(result)

    # --- transport, polling, VTN restarts -------------------------------------------------
    async def _perform_request(self, service: str, message: str) -> tuple[str | None, dict[str, Any]]:
        """openleadr's request, reading the answer event by event (see :mod:`dr_bridge.oadr_xml`);
        a VTN that does not answer is one quiet line, not a traceback."""
        await self._ensure_client_session()
        assert self.client_session is not None
        url = f"{self.vtn_url}/{service}"
        try:
            await self._execute_hooks("before_send_xml", utils.ensure_str(message))
            async with self.client_session.post(url, data=message) as req:
                content = await req.read()
                self._answered = True
                await self._execute_hooks("after_receive_xml", utils.ensure_str(content))
                if req.status != HTTPStatus.OK:
                    if req.status >= 500 or req.status in (HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS):
                        # Not the VTN's answer to this message (a proxy in front of a restarting VTN, an
                        # overloaded one): as if unanswered, so a report stays queued for later.
                        self._answered = False
                    log.warning("VEN %s: VTN answered %s to %s", self.meter_id, req.status, service)
                    return None, {}
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.debug("VEN %s: %s to %s failed: %s: %s", self.meter_id, service, url, type(exc).__name__, exc)
            return None, {}
        if self._vtn_back is not None and not (self._vtn_lost or self._reregistering):
            self._vtn_back.set()  # (after a restart, reregister() wakes the report sender once done)
        if not content:
            return None, {}
        try:
            message_type, payload = read_message(content, self.vtn_fingerprint)
        except (XMLSyntaxError, errors.FingerprintMismatch, InvalidSignature) as exc:
            log.warning("VEN %s: VTN message rejected: %s: %s", self.meter_id, type(exc).__name__, exc)
            return None, {}
        except Exception as exc:
            log.warning("VEN %s: VTN message unreadable: %s: %s", self.meter_id, type(exc).__name__, exc)
            return None, {}
        code = (payload.get("response") or {}).get("response_code")
        if code is not None and code != 200:
            log.warning("VEN %s: VTN answered %s %s", self.meter_id, code,
                        payload["response"].get("response_description"))
        return message_type, payload

    async def _poll(self) -> None:
        try:
            await super()._poll()
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # stop() shut the scheduler down while this poll waited for the VTN: apscheduler
            # would log the cancellation as a job failure, with a traceback.

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
            if result and result[0] == REREGISTRATION:
                return None, {}  # just done: openleadr's _poll would register a second time
        if not result:
            return None, {}
        if result[0] == "oadrDistributeEvent" and not (result[1] or {}).get("events") \
                and not (result[1] or {}).get("rejected_events"):
            # openleadr's _poll drops a distribution without events; per 2.0b it cancels them all.
            await self._on_event(result[1] or {})
            return None, {}
        return result  # type: ignore[no-any-return]

    async def reregister(self) -> None:
        """Register again, and the reports with it: a restarted VTN has forgotten both (openleadr #186)."""
        self.bridge.stats.reregistrations += 1
        self._reregistering = True
        try:
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
        finally:
            self._reregistering = False
            if self._vtn_back is not None:
                self._vtn_back.set()  # queued reports go now, under the new report requests

    async def create_party_reregistration(self, registration_id: str | None = None) -> None:
        """The VTN asked for it (``oadrRequestReregistration``): :meth:`reregister`. openleadr's own
        would keep the old report jobs beside the new ones and start a second report sender."""
        await self.reregister()

    async def start(self) -> None:
        """Register (retrying with backoff while the VTN is unreachable) and start polling."""
        cfg = self.bridge.config
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
            delay = min(delay * 2, cfg.register_retry_max_s)

    def _drop_status_log_job(self) -> None:
        # openleadr logs event status changes every 10 s per VEN; the twin keeps the status itself,
        # and a thousand such jobs are a tenth of the idle CPU.
        for job in self.scheduler.get_jobs():
            if getattr(job.func, "__name__", "") == "_event_status_log":
                job.remove()

    async def stop(self) -> None:
        self._stopping = True
        try:
            if self.client_session is not None:
                await super().stop()
            elif self.scheduler.running:
                self.scheduler.shutdown(wait=False)
        except Exception:  # stopping must not fail the others
            log.debug("VEN %s: error while stopping", self.meter_id, exc_info=True)


def _response(message: dict[str, Any], event_id: str, mod: int, opt: str, code: int,
              description: Any) -> dict[str, Any]:
    text = "OK" if code == 200 else str(description or "ERROR")
    # openleadr's templates do not escape: the description may quote XML (a schema error).
    return {"response_code": code, "response_description": escape(text[:500]), "opt_type": opt,
            "request_id": message.get("request_id"), "modification_number": mod, "event_id": event_id}


def _utcnow() -> datetime:
    return datetime.now(UTC)
