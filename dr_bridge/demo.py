"""A utility's VTN (stock openleadr ``OpenADRServer``) and the bridge in one process: the DR demo and test rig.

:func:`run_demo` is what ``make demo`` calls once the zone gateway and the meters run::

    summary = asyncio.run(run_demo("http://127.0.0.1:8080", ["m-1", "m-2"], token=service_token))

It starts a VTN on a free loopback port and the bridge for the meters, issues one
SIMPLE event, waits for the opt-ins and for the event to run, and returns opt-in
counts and the load reduction measured from the meters' readings (twin measurements)
against each twin's baseline (its measured load when the event was decided).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from lxml import etree
from openleadr import OpenADRServer, objects, utils
from openleadr.service import OptService, VTNService, vtn_service

from dr_bridge.bridge import Bridge, BridgeConfig, quiet_scheduler_logs
from dr_bridge.invoke import HttpInvoker, Invoke
from dr_bridge.oadr_xml import parse_tree

log = logging.getLogger("dr_bridge.demo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OptAnswer:
    ven_id: str
    event_id: str
    modification_number: int
    opt_type: str
    response_code: int
    at: float
    #: The message-level code (452 when the VTN id is all lower case).
    message_code: int = 200
    description: str = ""


@dataclass
class ReportValue:
    ven_id: str
    report_name: str
    r_id: str
    value: float
    at: float
    #: A TELEMETRY_STATUS point's oadrPayloadResourceStatus, as parsed.
    status: dict[str, Any] | None = None
    #: When the VEN sampled it (the report interval's dtstart).
    sampled: datetime | None = None


@dataclass
class OptReceived:
    ven_id: str
    event_id: str
    modification_number: int
    opt_type: str
    opt_reason: str
    at: float


def _keep_ids(content: bytes) -> tuple[str, dict[str, Any]]:
    """openleadr's VTN parser, keeping identifiers strings (it makes ``"0042001234"`` the int 42001234)."""
    return parse_tree(etree.fromstring(content))


#: The fixed itemDescription of each itemBase (EMIX schema).
_ITEM_DESCRIPTIONS = {"powerReal": "RealPower", "currencyPerKWh": "currencyPerKWh", "energyReal": "RealEnergy"}


class UtilityVtn:
    """A stock openleadr VTN with the bookkeeping a utility (and a test) needs.

    * accepts every VEN (its ven id is the name it registers with);
    * records every ``oadrCreatedEvent`` answer per VEN (openleadr's own callbacks are keyed
      by event id alone, so one event sent to many VENs would report one answer);
    * requests every offered TELEMETRY_USAGE / TELEMETRY_STATUS report at ``sampling_s``;
    * :meth:`issue` queues events *with* their randomization (``add_event`` drops it, #187).
    """

    def __init__(self, vtn_id: str = "MeterTwinVtn", port: int | None = None, poll_s: float = 1.0,
                 sampling_s: float = 2.0, host: str = "127.0.0.1", ven_fingerprint: str | None = None,
                 ven_lookup: bool = False,
                 **server_kw: Any) -> None:
        if vtn_id.islower():
            raise ValueError(f"VTN id {vtn_id!r} is all lower case: VENs answer 452 (use a capital letter)")
        self.vtn_id = vtn_id
        self.port = port or free_port()
        self.host = host
        self.poll_s = poll_s
        self.sampling_s = sampling_s
        self.server_kw = server_kw
        #: With TLS: the fingerprint every VEN's client certificate must have (one bridge certificate).
        self.ven_fingerprint = ven_fingerprint
        #: Look VENs up as openleadr recommends (always with TLS): a message from a VEN this VTN does
        #: not know (its registrations lost) is answered ``oadrRequestReregistration``.
        self.ven_lookup = ven_lookup or ven_fingerprint is not None
        self.registration_attempts = 0
        self.answers: list[OptAnswer] = []
        self.reports: list[ReportValue] = []
        self.registered: dict[str, str] = {}
        self.report_registrations: dict[str, int] = {}
        self.issued_at: dict[str, float] = {}
        #: ven id -> when (monotonic) each registration arrived.
        self.registered_at: dict[str, list[float]] = {}
        self.opts: list[OptReceived] = []
        #: Every report value received, also those of report requests this VTN no longer knows (restart).
        self.raw_reports: list[ReportValue] = []
        self.server: OpenADRServer | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.server_kw.get("http_cert") else "http"
        return f"{scheme}://{self.host}:{self.port}/OpenADR2/Simple/2.0b"

    async def start(self) -> None:
        quiet_scheduler_logs()
        # The utility's VTN keeps ids as strings, as the VENs do (openleadr's parser would not).
        vtn_service.parse_message = _keep_ids
        extra = {"ven_lookup": self._ven_lookup} if self.ven_lookup else {}
        server = OpenADRServer(vtn_id=self.vtn_id, http_port=self.port, http_host=self.host,
                               requested_poll_freq=timedelta(seconds=self.poll_s), show_fingerprint=False,
                               **extra, **self.server_kw)
        server.add_handler("on_create_party_registration", self._register)
        server.add_handler("on_register_report", self._register_report)
        events = server.services["event_service"]
        original = events.handlers["oadrCreatedEvent"]

        async def created_event(payload: dict[str, Any]) -> Any:
            now = time.monotonic()
            message_code = int((payload.get("response") or {}).get("response_code") or 200)
            for r in payload.get("event_responses", []):
                self.answers.append(OptAnswer(payload.get("ven_id", ""), str(r.get("event_id")),
                                              int(r.get("modification_number") or 0), str(r.get("opt_type")),
                                              int(r.get("response_code") or 0), now, message_code,
                                              str(r.get("response_description") or "")))
            return await original(payload)

        events.handlers["oadrCreatedEvent"] = created_event
        reports = server.services["report_service"]
        update_report = reports.handlers["oadrUpdateReport"]

        async def updated_report(payload: dict[str, Any]) -> Any:
            self._record_raw_reports(payload)
            for report in payload.get("reports", []):  # openleadr's handler reads floats only
                for interval in report.get("intervals", []):
                    rp = interval.get("report_payload") or {}
                    if "payload_resource_status" in rp:
                        rp["value"] = 1.0 if (rp["payload_resource_status"] or {}).get("online") else 0.0
            return await update_report(payload)

        reports.handlers["oadrUpdateReport"] = updated_report
        # openleadr's VTN has no EiOpt endpoint (its OptService is a stub, not routed): add one.
        opts = OptService(self.vtn_id)
        opts.handlers["oadrCreateOpt"] = self._create_opt
        server.services["opt_service"] = opts
        server.app.router.add_post(f"{server.http_path_prefix}/{opts.__service_name__}", opts.handler)
        await server.run()
        self.server = server

    def _record_raw_reports(self, payload: dict[str, Any]) -> None:
        now = time.monotonic()
        ven_id = str(payload.get("ven_id", ""))
        for report in payload.get("reports", []):
            name = str(report.get("report_name", ""))
            for interval in report.get("intervals", []):
                rp = interval.get("report_payload") or {}
                status = rp.get("payload_resource_status")
                value = float(rp["value"]) if "value" in rp else 1.0 if (status or {}).get("online") else 0.0
                self.raw_reports.append(ReportValue(ven_id, name, str(rp.get("r_id")), value, now, status,
                                                    interval.get("dtstart")))

    async def _create_opt(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        self.opts.append(OptReceived(str(payload.get("ven_id")), str(payload.get("event_id")),
                                     int(payload.get("modification_number") or 0), str(payload.get("opt_type")),
                                     str(payload.get("opt_reason")), time.monotonic()))
        return "oadrCreatedOpt", {"opt_id": payload.get("opt_id"),
                                  "response": {"response_code": 200, "response_description": "OK",
                                               "request_id": payload.get("request_id")}}

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.ven_lookup and "ven_lookup" in VTNService.__dict__:
            # openleadr stores ven_lookup on the VTNService *class*: a later VTN in this process would inherit it.
            del VTNService.ven_lookup

    def _ven_lookup(self, ven_id: str) -> dict[str, Any]:
        return {"ven_id": ven_id, "ven_name": ven_id, "fingerprint": self.ven_fingerprint,
                "registration_id": self.registered.get(ven_id)}

    def _register(self, payload: dict[str, Any]) -> tuple[str, str]:
        self.registration_attempts += 1
        ven_id = str(payload.get("ven_id") or payload["ven_name"])
        self.registered_at.setdefault(ven_id, []).append(time.monotonic())
        self.registered[ven_id] = self.registered.get(ven_id) or f"reg-{uuid.uuid4().hex[:12]}"
        return ven_id, self.registered[ven_id]

    async def _register_report(self, report: dict[str, Any]) -> list[tuple[str, Callable[..., None], timedelta]]:
        """Request every offered data point at ``sampling_s`` (openleadr's "full" handler mode)."""
        name = str(report.get("report_name", "")).removeprefix("METADATA_")
        out: list[tuple[str, Callable[..., None], timedelta]] = []
        for rd in report.get("report_descriptions", []):
            r_id = str(rd["r_id"])
            ven_id = str((rd.get("report_data_source") or {}).get("resource_id", ""))
            rate = rd.get("sampling_rate") or {}
            low = rate.get("min_period") or timedelta(seconds=self.sampling_s)
            high = rate.get("max_period") or timedelta(seconds=self.sampling_s)
            sampling = max(low, min(high, timedelta(seconds=self.sampling_s)))

            def on_data(data: list[tuple[datetime, float]], ven_id: str = ven_id, r_id: str = r_id) -> None:
                for dt, value in data:
                    self.reports.append(ReportValue(ven_id, name, r_id, float(value), time.monotonic(),
                                                    sampled=dt))

            out.append((r_id, on_data, sampling))
            self.report_registrations[ven_id] = self.report_registrations.get(ven_id, 0) + 1
        return out

    # --- events -----------------------------------------------------------------------
    def issue(self, ven_ids: list[str], *, signal_name: str = "SIMPLE", signal_type: str = "level",
              intervals: list[tuple[float, float, float]], event_id: str | None = None,
              startafter_s: float = 0.0, targets: list[dict[str, Any]] | None = None,
              market_context: str = "oadr://metertwin/dr", measurement: tuple[str, str, str] | None = None,
              test_event: bool | None = None, recovery_s: float = 0.0) -> str:
        """Queue one event for each VEN; ``intervals`` are (start offset s, duration s, payload).

        ``measurement``: the signal's (itemBase, itemUnits, siScaleCode), e.g. ("powerReal", "W", "k").
        A ``signal_name`` openleadr refuses (not in the 2.0b list) is sent anyway: a foreign VTN may.
        An interval of duration 0 as the only one makes an open-ended event (``PT0S``).
        """
        assert self.server is not None, "start() the VTN first"
        event_id = event_id or f"ev-{uuid.uuid4().hex[:10]}"
        now = datetime.now(UTC)
        for ven_id in ven_ids:
            ivs = [objects.Interval(dtstart=now + timedelta(seconds=a), duration=timedelta(seconds=d),
                                    signal_payload=p, uid=i) for i, (a, d, p) in enumerate(intervals)]
            start = min(i.dtstart for i in ivs)
            end = max(i.dtstart + i.duration for i in ivs)
            period = objects.ActivePeriod(dtstart=start, duration=end - start,
                                          tolerance={"startafter": timedelta(seconds=startafter_s)}
                                          if startafter_s else None,
                                          recovery_period=timedelta(seconds=recovery_s) if recovery_s else None)
            signal = objects.EventSignal(intervals=ivs, signal_name="SIMPLE", signal_type=signal_type,
                                         signal_id=uuid.uuid4().hex[:8])
            signal.signal_name = signal_name  # after the constructor, which would refuse a foreign name
            if measurement is not None:
                name, unit, scale = measurement
                # the schema requires powerAttributes with every power item
                power = objects.PowerAttributes(hertz=50, voltage=230, ac=True) if name.startswith("power") else None
                signal.measurement = objects.Measurement(name=name, description=_ITEM_DESCRIPTIONS.get(name, name),
                                                         unit=unit, scale=scale, power_attributes=power)
            event = objects.Event(
                event_descriptor=objects.EventDescriptor(
                    event_id=event_id, modification_number=0, market_context=market_context,
                    event_status=utils.determine_event_status(period.__dict__), created_date_time=now, priority=0,
                    test_event=test_event),
                event_signals=[signal],
                targets=targets if targets is not None else [{"ven_id": ven_id}],
                active_period=period)
            self._queue(ven_id, event)
        self.issued_at[event_id] = time.monotonic()
        return event_id

    def _queue(self, ven_id: str, event: objects.Event) -> None:
        # add_raw_event would recompute active_period from the intervals and drop the
        # tolerance (openleadr #187); this is its queueing without that step.
        assert self.server is not None
        self.server.events.setdefault(ven_id, []).append(event)
        self.server.events_updated[ven_id] = True

    def _find(self, ven_id: str, event_id: str) -> Any:
        assert self.server is not None
        return utils.find_by(self.server.events.get(ven_id, []), "event_descriptor.event_id", event_id)

    def modify(self, ven_ids: list[str], event_id: str, *, payload: float | None = None,
               duration_s: float | None = None, start_in_s: float | None = None) -> None:
        """A modification: new payload, duration and/or start (``start_in_s`` from now), modification number + 1."""
        for ven_id in ven_ids:
            event = self._find(ven_id, event_id)
            if event is None:
                continue
            shift = (datetime.now(UTC) + timedelta(seconds=start_in_s) - event.active_period.dtstart) \
                if start_in_s is not None else timedelta(0)
            for signal in event.event_signals:
                for interval in signal.intervals:
                    if payload is not None:
                        interval.signal_payload = payload
                    if duration_s is not None and len(signal.intervals) == 1:
                        interval.duration = timedelta(seconds=duration_s)
                    interval.dtstart = interval.dtstart + shift
            event.active_period.dtstart = event.active_period.dtstart + shift
            if duration_s is not None:
                event.active_period.duration = timedelta(seconds=duration_s)
            event.event_descriptor.modification_number += 1
            event.event_descriptor.modification_date_time = datetime.now(UTC)
            assert self.server is not None
            self.server.events_updated[ven_id] = True

    def cancel(self, ven_ids: list[str], event_id: str) -> None:
        assert self.server is not None
        for ven_id in ven_ids:
            self.server.cancel_event(ven_id, event_id)

    def withdraw(self, ven_ids: list[str], event_id: str) -> None:
        """Drop an event without a cancellation: the next delivery simply lacks it (implied cancel)."""
        assert self.server is not None
        for ven_id in ven_ids:
            utils.pop_by(self.server.events.get(ven_id, []), "event_descriptor.event_id", event_id)

    def answers_for(self, event_id: str, modification_number: int | None = None) -> dict[str, OptAnswer]:
        """The latest answer per VEN to one event (optionally to one modification)."""
        out: dict[str, OptAnswer] = {}
        for a in self.answers:
            if a.event_id == event_id and (modification_number is None or a.modification_number == modification_number):
                out[a.ven_id] = a
        return out


async def wait_until(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it is truthy; raise TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


@dataclass
class DemoSummary:
    event_id: str
    twins: int
    registered: int
    opt_in: int
    opt_out: int
    answer_latency_s: dict[str, float]
    baseline_w: float
    during_event_w: float
    reduction_w: float
    reduction_pct: float
    per_meter: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def run_demo(gateway: str, meter_ids: list[str], *, token: str, function: str = "edge-dr-event",
                   level: int = 2, lead_s: float = 3.0, duration_s: float = 8.0, poll_s: float = 1.0,
                   invoke: Invoke | None = None, read_power: Callable[[str], float | None] | None = None,
                   timeout_s: float = 60.0, targets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run a VTN + bridge, issue one SIMPLE ``level`` event to every meter, and summarise it.

    ``targets``: the event's eiTarget (e.g. ``[{"group_id": "dr-pilot"}]``: the twins in that group
    opt in, the others opt out with 462 TARGET_MISMATCH); default each VEN's own ``ven_id``.

    ``read_power(meter_id)`` returns a meter's current load (W); by default the twin's last
    measurement, read through the function's telemetry route. Baseline: the twin's load when
    the event was decided (what ``dr-event`` stored); during: the mean of samples taken in the
    second half of the event window.
    """
    invoker = invoke or HttpInvoker(gateway, token, function=function)
    vtn = UtilityVtn(poll_s=poll_s)
    await vtn.start()
    bridge = Bridge(meter_ids, BridgeConfig(vtn_url=vtn.url, telemetry_refresh_s=1.0), invoker)
    try:
        await asyncio.wait_for(bridge.start(), timeout_s)
        await bridge.refresh_telemetry()
        baseline = {m: bridge.telemetry_value(m, "power_w") for m in meter_ids}
        event_id = vtn.issue(meter_ids, intervals=[(lead_s, duration_s, float(level))], targets=targets)
        issued = time.monotonic()
        await wait_until(lambda: len(vtn.answers_for(event_id)) >= len(meter_ids), timeout_s)
        answers = vtn.answers_for(event_id)
        latencies = sorted(a.at - issued for a in answers.values())
        # Sample the load in the second half of the window (after randomization and the meters' reaction).
        await asyncio.sleep(max(0.0, lead_s + duration_s / 2 - (time.monotonic() - issued)))
        samples: dict[str, list[float]] = {m: [] for m in meter_ids}
        end = issued + lead_s + duration_s - 0.5
        while time.monotonic() < end:
            if read_power is None:
                await bridge.refresh_telemetry()
            for m in meter_ids:
                value = read_power(m) if read_power else bridge.telemetry_value(m, "power_w")
                if value is not None:
                    samples[m].append(float(value))
            await asyncio.sleep(0.5)
        per_meter: dict[str, dict[str, Any]] = {}
        base_total = during_total = 0.0
        for m in meter_ids:
            opted = answers.get(m)
            during = statistics.fmean(samples[m]) if samples[m] else None
            base = baseline.get(m)
            per_meter[m] = {"opt": opted.opt_type if opted else None, "baseline_w": base, "during_w": during}
            if opted and opted.opt_type == "optIn" and base is not None and during is not None:
                base_total += float(base)
                during_total += during
        reduction = base_total - during_total
        summary = DemoSummary(
            event_id=event_id, twins=len(meter_ids),
            registered=sum(v.registered.is_set() for v in bridge.vens.values()),
            opt_in=sum(a.opt_type == "optIn" for a in answers.values()),
            opt_out=sum(a.opt_type == "optOut" for a in answers.values()),
            answer_latency_s={"p50": round(latencies[len(latencies) // 2], 3),
                              "max": round(latencies[-1], 3)} if latencies else {},
            baseline_w=round(base_total, 1), during_event_w=round(during_total, 1), reduction_w=round(reduction, 1),
            reduction_pct=round(100 * reduction / base_total, 1) if base_total else 0.0, per_meter=per_meter)
        return summary.as_dict()
    finally:
        await bridge.stop()
        await vtn.stop()


