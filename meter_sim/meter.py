"""One simulated meter: the core a physical meter keeps, over its own MQTT v5 session.

A :class:`SimMeter` measures (:class:`~meter_sim.profile.LoadModel`), reports
periodic :class:`~metertwin.twin.messages.Reading` s with a sequence number, answers
read requests on the MQTT v5 response topic, applies or rejects commands with a
:class:`~metertwin.twin.messages.CommandAck`, hands EMS messages to its local EMS
untouched and forwards the EMS's messages up, and obeys control messages.

It is assembled from three parts: the behaviour (:mod:`meter_sim.device`: registers,
load model, settings, command effects), the MQTT session (:mod:`meter_sim.session`:
connection, outbox, link delay) and the protocol (:mod:`meter_sim.protocol`: topics,
request/response, acks). This module adds the lifecycle and the reporting schedule.

Everything runs on one asyncio loop shared by the whole fleet. Measuring and
reporting use loop timers, not tasks.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meter_sim.config import FleetConfig
from meter_sim.device import MeterDevice
from meter_sim.profile import LinkProfile
from meter_sim.protocol import MeterProtocol
from meter_sim.session import Outgoing
from metertwin.twin import messages


@dataclass
class MeterStats:
    """A snapshot of one meter's counters and settings."""

    meter_id: str
    connected: bool
    offline: bool
    seq: int
    readings_generated: int
    readings_sent: int
    buffered: int
    dropped: int
    commands_applied: int
    commands_rejected: int
    commands_expired: int
    commands_duplicate: int
    reads_answered: int
    ems_received: int
    ems_sent: int
    controls: int
    malformed: int
    messages_in: int
    messages_out: int
    connects: int
    connect_failures: int
    disconnects: int
    import_kwh: float
    export_kwh: float
    power_w: float
    prosumer: bool
    link: str
    binding: Any
    settings: dict[str, Any] = field(default_factory=dict)


class SimMeter(MeterProtocol):
    """A minimal physical meter. Create through :class:`meter_sim.fleet.MeterFleet`."""

    def __init__(
        self,
        meter_id: str,
        password: str,
        config: FleetConfig,
        *,
        seed: int,
        reporting_interval_s: float,
        prosumer_share: float,
        link: LinkProfile,
        tz_offset_h: float = 0.0,
        ems_interval_s: float | None = None,
        connect_gate: asyncio.Semaphore | None = None,
        on_ems: Callable[[str, bytes], None] | None = None,
        prosumer: bool | None = None,
    ) -> None:
        MeterDevice.__init__(
            self, meter_id, config, seed=seed, reporting_interval_s=reporting_interval_s,
            prosumer_share=prosumer_share, tz_offset_h=tz_offset_h, on_ems=on_ems, prosumer=prosumer,
        )
        self._password = password
        self.link = link
        self.ems_interval_s = ems_interval_s
        self._gate = connect_gate

        self.seq = -1
        self.outbox: collections.deque[Outgoing] = collections.deque()
        self._out_last_due = 0.0
        self._in_last_due = 0.0
        self._in_pending = 0
        self._ems_n = 0

        # Counters.
        self.readings_generated = self.readings_sent = self.dropped = 0
        self.commands_applied = self.commands_rejected = self.commands_expired = self.commands_duplicate = 0
        self.reads_answered = self.ems_received = self.ems_sent = self.controls = self.malformed = 0
        self.messages_in = self.messages_out = 0
        self.connects = self.connect_failures = self.disconnects = 0

        self.connected = False
        self.offline = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._out_ready: asyncio.Event | None = None
        self._session_no = 0
        self._online: asyncio.Event | None = None
        self._leave: asyncio.Future[str] | None = None
        self._report_timer: asyncio.TimerHandle | None = None
        self._ems_timer: asyncio.TimerHandle | None = None
        self._offline_timer: asyncio.TimerHandle | None = None
        self._next_report_at = 0.0
        self._last_report_at = 0.0  # loop time of the last periodic report (or of the start)
        self._init_protocol()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the meter on the running loop (connection, reporting, EMS timers)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._out_ready = asyncio.Event()
        self._online = asyncio.Event()
        self._online.set()
        self._leave = loop.create_future()
        self.measure()  # fixes the register origin
        self._last_report_at = loop.time()
        # Spread the fleet's reports over the interval; the phase is part of the seeded draw.
        self._next_report_at = loop.time() + self.rng.uniform(0.0, self.reporting_interval_s)
        self._report_timer = loop.call_at(self._next_report_at, self._report_tick)
        if self.ems_interval_s:
            self._ems_timer = loop.call_at(loop.time() + self.rng.uniform(0, self.ems_interval_s), self._ems_tick)
        self._task = loop.create_task(self._run(), name=f"meter-{self.meter_id}")

    async def stop(self, flush_timeout_s: float = 2.0) -> None:
        """Stop measuring, send what is queued (up to ``flush_timeout_s``), say ``offline``, disconnect."""
        for timer in (self._report_timer, self._ems_timer, self._offline_timer):
            if timer is not None:
                timer.cancel()
        if self._loop is not None:
            deadline = self._loop.time() + flush_timeout_s
            while self.outbox and self.connected and self._loop.time() < deadline:
                await asyncio.sleep(0.02)
        self._stopping = True
        self._wake_session("stop")
        if self._online is not None:
            self._online.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=self.config.connect_timeout_s)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    def go_offline(self, seconds: float | None = None) -> None:
        """Lose the link (for ``seconds``, or until :meth:`go_online`); keep measuring and buffering."""
        loop = self._require_loop()
        self.offline = True
        assert self._online is not None
        self._online.clear()
        if self._offline_timer is not None:
            self._offline_timer.cancel()
            self._offline_timer = None
        if seconds is not None:
            self._offline_timer = loop.call_later(max(0.0, seconds), self.go_online)
        self._wake_session("offline")

    def go_online(self) -> None:
        """Restore the link: reconnect with the persistent session and flush the buffer."""
        self.offline = False
        if self._offline_timer is not None:
            self._offline_timer.cancel()
            self._offline_timer = None
        if self._online is not None:
            self._online.set()

    # ---------------------------------------------------------------- reporting
    def _report_tick(self) -> None:
        loop = self._require_loop()
        self.report_now()
        self._last_report_at = loop.time()
        # Fixed cadence from the schedule, not from when the callback ran: no drift.
        self._next_report_at = max(self._next_report_at + self.reporting_interval_s, loop.time())
        self._report_timer = loop.call_at(self._next_report_at, self._report_tick)

    def report_now(self) -> messages.Reading:
        """Take a reading now and queue it (it is sent at once if connected, else buffered)."""
        self.seq += 1
        reading = messages.Reading(seq=self.seq, **self.measure())
        self.readings_generated += 1
        self._enqueue(Outgoing(self._out_due(), self._t_readings, reading.model_dump_json().encode(), "reading"))
        return reading

    def _reschedule_reports(self) -> None:
        loop = self._require_loop()
        if self._report_timer is not None:
            self._report_timer.cancel()
        self._next_report_at = max(loop.time(), self._last_report_at + self.reporting_interval_s)
        self._report_timer = loop.call_at(self._next_report_at, self._report_tick)

    def _interval_changed(self) -> None:
        if self._loop is not None:
            self._reschedule_reports()

    # ---------------------------------------------------------------- EMS up
    def _ems_tick(self) -> None:
        loop = self._require_loop()
        self.send_ems(self.ems_telemetry())
        if self.ems_interval_s and not self._stopping:
            self._ems_timer = loop.call_later(self.ems_interval_s, self._ems_tick)

    # ---------------------------------------------------------------- inspection
    def stats(self) -> MeterStats:
        """Counters and settings now (call on the fleet's loop)."""
        m = self.measure()
        return MeterStats(
            meter_id=self.meter_id, connected=self.connected, offline=self.offline, seq=self.seq,
            readings_generated=self.readings_generated, readings_sent=self.readings_sent,
            buffered=len(self.outbox), dropped=self.dropped,
            commands_applied=self.commands_applied, commands_rejected=self.commands_rejected,
            commands_expired=self.commands_expired, commands_duplicate=self.commands_duplicate,
            reads_answered=self.reads_answered, ems_received=self.ems_received, ems_sent=self.ems_sent,
            controls=self.controls, malformed=self.malformed, messages_in=self.messages_in,
            messages_out=self.messages_out, connects=self.connects, connect_failures=self.connect_failures,
            disconnects=self.disconnects, import_kwh=m["import_kwh"], export_kwh=m["export_kwh"],
            power_w=m["power_w"], prosumer=self.model.prosumer, link=self.link.name, binding=self.binding,
            settings={**self.settings(), "last_trade": self.last_trade, "last_dr": self.last_dr,
                      "tariff": self.tariff},
        )
