"""One simulated meter: the core a physical meter keeps, over its own MQTT v5 session.

A :class:`SimMeter` measures (:class:`~meter_sim.profile.LoadModel`), reports
periodic :class:`~metertwin.twin.messages.Reading` s with a sequence number, answers
read requests on the MQTT v5 response topic, applies or rejects commands with a
:class:`~metertwin.twin.messages.CommandAck`, hands EMS messages to its local EMS
untouched and forwards the EMS's messages up, and obeys control messages.

Everything runs on one asyncio loop shared by the whole fleet. Per meter there
is a connection task (connect with backoff, persistent session), a reader task
(stamps each received message with its link delay and schedules its handling),
and a sender task (publishes the outbox in order, each message no earlier than
its link delay). Measuring and reporting use loop timers, not tasks.

Everything the meter sends goes through its outbox, which survives disconnects:
a message leaves the outbox only when the broker has acknowledged it (QoS1), so
readings taken while offline are sent on reconnect, in order, with their
original ``seq`` and ``ts``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import pydantic
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from meter_sim.profile import LinkProfile, LoadModel
from metertwin.core import topics
from metertwin.twin import messages

log = logging.getLogger("meter_sim")

ONLINE = b"online"
OFFLINE = b"offline"
RELAY_STATES = ("open", "closed")
#: Settings a ``desired`` command may set, and the names ``reported`` uses for them.
SETTING_NAMES = ("relay", "reporting_interval_s", "load_limit_w", "tariff_id")
#: How many command acks a meter remembers to answer redeliveries identically.
ACK_MEMORY = 256
MIN_INTERVAL_S, MAX_INTERVAL_S = 1.0, 86400.0


class Rejected(Exception):
    """A command the meter refuses; the message is the ack's reason."""


@dataclass(frozen=True)
class FleetConfig:
    """What every meter of a fleet shares: broker, timing, clock."""

    broker_host: str
    broker_port: int
    time_scale: float = 1.0
    #: Simulated epoch time at ``wall_start`` (defaults to the wall clock: real time of day).
    sim_start: float = 0.0
    wall_start: float = 0.0
    keepalive_s: int = 60
    session_expiry_s: int = 86400
    connect_timeout_s: float = 10.0
    publish_timeout_s: float = 30.0
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    #: Messages a meter keeps while it cannot send; the oldest readings go first beyond this.
    max_buffer: int = 10_000
    ems_inbox_size: int = 100

    def sim_time(self, wall: float) -> float:
        """The meter's physical clock (drives the load shape and the registers)."""
        return self.sim_start + (wall - self.wall_start) * self.time_scale


@dataclass(slots=True)
class _Out:
    due: float  # loop time before which the message may not leave (link latency)
    topic: str
    payload: bytes
    kind: str
    retain: bool = False
    correlation: bytes | None = None


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


class _Client(aiomqtt.Client):
    """aiomqtt's client with a slower housekeeping tick.

    aiomqtt wakes every client once a second to run paho's ``loop_misc`` (keepalive
    pings); with thousands of meters on one loop that is thousands of wake-ups per
    second for nothing. A tick of a quarter of the keepalive is enough for pings.
    """

    misc_interval_s: float = 5.0

    async def _misc_loop(self) -> None:
        while self._client.loop_misc() == 0:
            await asyncio.sleep(self.misc_interval_s)


class SimMeter:
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
    ) -> None:
        self.meter_id = meter_id
        self._password = password
        self.config = config
        self.rng = random.Random(f"{seed}:{meter_id}")
        prosumer = self.rng.random() < prosumer_share
        self.model = LoadModel.draw(self.rng, prosumer=prosumer, tz_offset_h=tz_offset_h)
        self.link = link
        self.ems_interval_s = ems_interval_s
        self.on_ems = on_ems
        self._gate = connect_gate

        # Registers (Wh internally) and the instant they were last integrated to.
        self.import_wh = self.rng.uniform(1_000.0, 20_000.0) * 1000.0
        self.export_wh = self.rng.uniform(0.0, 3_000.0) * 1000.0 if prosumer else 0.0
        self._integrated_to: float | None = None

        # Settings in force.
        self.relay = "closed"
        self.reporting_interval_s = float(reporting_interval_s)
        self.load_limit_w: float | None = None
        self.tariff_id: str | None = None
        self.tariff: dict[str, Any] | None = None
        self.last_trade: dict[str, Any] | None = None
        self.last_dr: dict[str, Any] | None = None
        self.binding: Any = None

        self.seq = -1
        self.outbox: collections.deque[_Out] = collections.deque()
        self.ems_inbox: collections.deque[bytes] = collections.deque(maxlen=config.ems_inbox_size)
        self._acks: collections.OrderedDict[str, bytes] = collections.OrderedDict()
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

        topic_handlers: dict[str, Callable[[aiomqtt.Message], None]] = {
            topics.commands(meter_id): self._on_command,
            topics.read_requests(meter_id): self._on_read,
            topics.ems_down(meter_id): self._on_ems_down,
            topics.control(meter_id): self._on_control,
        }
        self._handlers = topic_handlers
        self._t_readings = topics.readings(meter_id)
        self._t_acks = topics.command_acks(meter_id)
        self._t_ems_up = topics.ems_up(meter_id)
        self._t_status = topics.status(meter_id)

    # ---------------------------------------------------------------- measuring
    def _now_sim(self, wall: float) -> float:
        return self.config.sim_time(wall)

    def _apply_settings(self, power: float) -> float:
        if self.relay == "open":
            return 0.0
        if self.load_limit_w is not None and power > self.load_limit_w:
            return self.load_limit_w
        return power

    def power_at(self, sim_t: float) -> float:
        """Net power (W) at simulated time ``sim_t`` with the settings in force."""
        return self._apply_settings(self.model.power_w(sim_t))

    def _integrate(self, sim_t: float) -> None:
        """Advance the registers to ``sim_t`` (never backwards)."""
        start = self._integrated_to
        if start is None or sim_t <= start:
            self._integrated_to = sim_t if start is None else max(start, sim_t)
            return
        dt = sim_t - start
        steps = min(48, max(1, math.ceil(dt / 60.0)))
        h = dt / steps
        imp = exp = 0.0
        for i in range(steps):
            p = self.power_at(start + (i + 0.5) * h)  # midpoint rule
            if p >= 0:
                imp += p * h
            else:
                exp -= p * h
        self.import_wh += imp / 3600.0
        self.export_wh += exp / 3600.0
        self._integrated_to = sim_t

    def measure(self, wall: float | None = None) -> dict[str, float]:
        """The meter's measurement now: registers integrated up to this instant."""
        wall = time.time() if wall is None else wall
        sim_t = self._now_sim(wall)
        self._integrate(sim_t)
        power = self.power_at(sim_t)
        return {
            "ts": round(wall, 3),
            "import_kwh": round(self.import_wh / 1000.0, 4),
            "export_kwh": round(self.export_wh / 1000.0, 4),
            "power_w": round(power, 1),
            "voltage_v": round(min(max(self.model.voltage_v(sim_t, power), 0.0), 1000.0), 1),
        }

    def settings(self) -> dict[str, Any]:
        """The settings in force, under the names ``reported`` uses."""
        return {
            "relay": self.relay,
            "reporting_interval_s": _num(self.reporting_interval_s),
            "load_limit_w": self.load_limit_w,
            "tariff_id": self.tariff_id,
        }

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

    def _wake_session(self, why: str) -> None:
        if self._leave is not None and not self._leave.done():
            self._leave.set_result(why)

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"meter {self.meter_id!r} is not started")
        return self._loop

    def _new_client(self) -> _Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.config.session_expiry_s
        client = _Client(
            self.config.broker_host,
            self.config.broker_port,
            username=self.meter_id,
            password=self._password,
            identifier=self.meter_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(self._t_status, OFFLINE, qos=1, retain=True),
            clean_start=False,
            keepalive=self.config.keepalive_s,
            timeout=self.config.connect_timeout_s,
            properties=props,
            max_inflight_messages=20,
            # Small messages both ways: without this, Nagle + delayed ACKs add ~40 ms to answers.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        client.misc_interval_s = max(1.0, self.config.keepalive_s / 4.0)
        client.pending_calls_threshold = 1_000_000  # the sender awaits one publish at a time anyway
        return client

    async def _run(self) -> None:
        backoff = self.config.backoff_min_s
        assert self._online is not None
        while not self._stopping:
            if self.offline:
                await self._online.wait()
                continue
            client = self._new_client()
            try:
                if self._gate is not None:
                    async with self._gate:
                        await client.__aenter__()
                else:
                    await client.__aenter__()
            except (aiomqtt.MqttError, OSError) as exc:
                self.connect_failures += 1
                log.debug("meter %s: connect failed (%s); retry in %.1f s", self.meter_id, exc, backoff)
                await self._pause(backoff * (0.5 + self.rng.random()))
                backoff = min(backoff * 2.0, self.config.backoff_max_s)
                continue
            self.connects += 1
            backoff = self.config.backoff_min_s
            why = await self._session(client)
            if why == "lost":
                self.disconnects += 1
                await self._pause(backoff * self.rng.random())

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the meter stops or goes offline."""
        assert self._leave is not None
        if not self._stopping and not self._leave.done():
            await asyncio.wait([self._leave], timeout=seconds)
        self._reset_leave()

    def _reset_leave(self) -> None:
        if self._leave is not None and self._leave.done() and not self._stopping:
            self._leave = self._require_loop().create_future()

    async def _session(self, client: _Client) -> str:
        """Serve one connection until it drops (``lost``), or the meter goes offline or stops."""
        assert self._leave is not None
        assert self._out_ready is not None
        loop = self._require_loop()
        reader: asyncio.Task[None] | None = None
        sender: asyncio.Task[None] | None = None
        why = "lost"
        try:
            reader = loop.create_task(self._reader(client))
            await client.subscribe([(t, 1) for t in self._handlers])
            self.connected = True
            # ``online`` goes ahead of anything buffered while the link was down.
            self.outbox.appendleft(_Out(self._out_due(), self._t_status, ONLINE, "status", retain=True))
            sender = loop.create_task(self._sender(client))
            waiting: list[asyncio.Future[Any]] = [reader, sender, self._leave]
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if self._leave in done:
                why = self._leave.result()
            else:
                for fut in done:
                    if not fut.cancelled() and fut.exception() is not None:
                        log.debug("meter %s: connection lost: %s", self.meter_id, fut.exception())
        except aiomqtt.MqttError as exc:
            log.debug("meter %s: session failed: %s", self.meter_id, exc)
        finally:
            self.connected = False
            self._session_no += 1  # the sender checks it: a cancel can be swallowed (see _end)
            self._out_ready.set()
            await _end([t for t in (sender, reader) if t is not None])
            await self._disconnect(client, why)
            self._reset_leave()
        return why

    async def _disconnect(self, client: _Client, why: str) -> None:
        paho = client._client
        try:
            if why in ("offline", "stop"):
                # DISCONNECT with reason "with will": the broker publishes the retained ``offline``
                # will, exactly as when it notices a lost link, and the meter waits for nothing.
                paho.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
            await asyncio.wait_for(client.__aexit__(None, None, None), timeout=5.0)
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            log.debug("meter %s: disconnect: %s", self.meter_id, exc)
            if paho.socket() is not None:
                paho._sock_close()
        finally:
            # aiomqtt leaves a lost connection's exception in this future; it has been handled.
            gone = client._disconnected
            if gone.done() and not gone.cancelled():
                gone.exception()

    # ---------------------------------------------------------------- sending
    def _out_due(self) -> float:
        """When the next outgoing message may leave: after its link delay, never before an earlier one."""
        loop = self._require_loop()
        due = max(loop.time() + self.link.sample(self.rng), self._out_last_due)
        self._out_last_due = due
        return due

    def _enqueue(self, item: _Out) -> None:
        if len(self.outbox) >= self.config.max_buffer:
            # Storage full: the oldest reading goes (acks and answers are few and small).
            for i, old in enumerate(self.outbox):
                if old.kind == "reading":
                    del self.outbox[i]
                    self.dropped += 1
                    break
        self.outbox.append(item)
        assert self._out_ready is not None
        self._out_ready.set()

    async def _sender(self, client: _Client) -> None:
        assert self._out_ready is not None
        loop = self._require_loop()
        session = self._session_no
        while session == self._session_no:
            if not self.outbox:
                self._out_ready.clear()
                await self._out_ready.wait()
                continue
            item = self.outbox[0]
            delay = item.due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                continue  # the head may have changed (e.g. ``online`` put in front)
            props = None
            if item.correlation is not None:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.CorrelationData = item.correlation
            await client.publish(
                item.topic, item.payload, qos=1, retain=item.retain, properties=props,
                timeout=self.config.publish_timeout_s,
            )
            if self.outbox and self.outbox[0] is item:
                self.outbox.popleft()
            self.messages_out += 1
            if item.kind == "reading":
                self.readings_sent += 1
            elif item.kind == "response":
                self.reads_answered += 1
            elif item.kind == "ems":
                self.ems_sent += 1

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
        self._enqueue(_Out(self._out_due(), self._t_readings, reading.model_dump_json().encode(), "reading"))
        return reading

    def _reschedule_reports(self) -> None:
        loop = self._require_loop()
        if self._report_timer is not None:
            self._report_timer.cancel()
        self._next_report_at = max(loop.time(), self._last_report_at + self.reporting_interval_s)
        self._report_timer = loop.call_at(self._next_report_at, self._report_tick)

    # ---------------------------------------------------------------- EMS up
    def _ems_tick(self) -> None:
        loop = self._require_loop()
        m = self.measure()
        self.send_ems({"type": "telemetry", "power_w": m["power_w"], "import_kwh": m["import_kwh"]})
        if self.ems_interval_s and not self._stopping:
            self._ems_timer = loop.call_later(self.ems_interval_s, self._ems_tick)

    def send_ems(self, payload: dict[str, Any], msg_id: str | None = None) -> str:
        """Forward a message from the local EMS up to the twin; returns its id."""
        self._ems_n += 1
        ems_id = msg_id or f"{self.meter_id[:40]}-ems-{self._ems_n}"
        msg = messages.EmsMessage(id=ems_id, payload=payload, ts=time.time())
        self._enqueue(_Out(self._out_due(), self._t_ems_up, msg.model_dump_json().encode(), "ems"))
        return ems_id

    # ---------------------------------------------------------------- receiving
    async def _reader(self, client: _Client) -> None:
        loop = self._require_loop()
        async for msg in client.messages:
            self.messages_in += 1
            lat = self.link.sample(self.rng)
            if lat == 0.0 and self._in_pending == 0:
                self._handle(msg)
                continue
            # Strictly increasing due times keep the meter's messages in arrival order.
            due = max(loop.time() + lat, self._in_last_due + 1e-6)
            self._in_last_due = due
            self._in_pending += 1
            loop.call_at(due, self._handle_delayed, msg)

    def _handle_delayed(self, msg: aiomqtt.Message) -> None:
        self._in_pending -= 1
        self._handle(msg)

    def _handle(self, msg: aiomqtt.Message) -> None:
        handler = self._handlers.get(msg.topic.value)
        if handler is None:
            self.malformed += 1
            return
        try:
            handler(msg)
        except Exception:  # a bad message must never kill the meter
            self.malformed += 1
            log.exception("meter %s: failed to handle a message on %s", self.meter_id, msg.topic.value)

    def _on_read(self, msg: aiomqtt.Message) -> None:
        response_topic = getattr(msg.properties, "ResponseTopic", None)
        correlation = getattr(msg.properties, "CorrelationData", None)
        if not response_topic:
            self.malformed += 1
            return
        if msg.payload:
            try:
                messages.ReadRequest.model_validate_json(_as_bytes(msg.payload))
            except pydantic.ValidationError:
                self.malformed += 1  # still answer: the measurement is all a meter can give
        answer = messages.ReadResponse(**self.measure())
        self._enqueue(_Out(
            self._out_due(), response_topic, answer.model_dump_json().encode(), "response",
            correlation=correlation if isinstance(correlation, bytes) else None,
        ))

    def _on_ems_down(self, msg: aiomqtt.Message) -> None:
        payload = _as_bytes(msg.payload)
        self.ems_received += 1
        self.ems_inbox.append(payload)
        if self.on_ems is not None:
            try:
                self.on_ems(self.meter_id, payload)
            except Exception:
                log.exception("meter %s: EMS callback failed", self.meter_id)

    def _ack(self, ack: messages.CommandAck) -> None:
        payload = ack.model_dump_json().encode()
        self._acks[ack.id] = payload
        while len(self._acks) > ACK_MEMORY:
            self._acks.popitem(last=False)
        self._enqueue(_Out(self._out_due(), self._t_acks, payload, "ack"))

    def _on_command(self, msg: aiomqtt.Message) -> None:
        raw = _as_bytes(msg.payload)
        try:
            cmd = messages.Command.model_validate_json(raw)
        except pydantic.ValidationError as exc:
            self.malformed += 1
            cmd_id = _find_id(raw)
            if cmd_id is None:
                return  # nothing to answer to
            if cmd_id in self._acks:
                self._resend_ack(cmd_id)
                return
            self.commands_rejected += 1
            self._ack(self._make_ack(cmd_id, "rejected", f"malformed command: {_summary(exc)}"))
            return
        if cmd.id in self._acks:
            self._resend_ack(cmd.id)
            return
        if cmd.expires_at < time.time():
            self.commands_rejected += 1
            self.commands_expired += 1
            self._ack(self._make_ack(cmd.id, "rejected", "expired"))
            return
        try:
            extra = self.apply(cmd.kind, cmd.params)
        except Rejected as exc:
            self.commands_rejected += 1
            self._ack(self._make_ack(cmd.id, "rejected", str(exc)))
            return
        self.commands_applied += 1
        self._ack(self._make_ack(cmd.id, "applied", None, extra))

    def _resend_ack(self, cmd_id: str) -> None:
        self.commands_duplicate += 1
        self._acks.move_to_end(cmd_id)
        self._enqueue(_Out(self._out_due(), self._t_acks, self._acks[cmd_id], "ack"))

    def _make_ack(
        self, cmd_id: str, status: str, reason: str | None, extra: dict[str, Any] | None = None
    ) -> messages.CommandAck:
        reported = self.settings()
        if extra:
            reported.update(extra)
        return messages.CommandAck(
            id=cmd_id[:64], status=status, reason=None if reason is None else reason[:500],  # type: ignore[arg-type]
            reported=reported, ts=time.time(),
        )

    def apply(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        """Apply a command; return extra ``reported`` fields; raise :class:`Rejected` with a reason."""
        if kind == "relay":
            self._set_settings({"relay": _param(params, "state", kind)})
        elif kind == "reporting_interval":
            self._set_settings({"reporting_interval_s": _param(params, "seconds", kind)})
        elif kind == "load_limit":
            self._set_settings({"load_limit_w": _param(params, "watts", kind)})
        elif kind == "tariff":
            self._set_settings({"tariff_id": _param(params, "tariff_id", kind)})
            self.tariff = dict(params)
        elif kind == "desired":
            fields = params.get("fields")
            if not isinstance(fields, dict) or not fields:
                raise Rejected("desired needs params.fields, a non-empty object of settings")
            self._set_settings(fields)
        elif kind == "trade":
            self.last_trade = dict(params)
            return {"last_trade": self.last_trade}
        elif kind == "dr":
            self.last_dr = dict(params)
            return {"last_dr": self.last_dr}
        else:
            raise Rejected(f"unknown command kind {kind!r}")
        return {}

    def _set_settings(self, fields: dict[str, Any]) -> None:
        """Validate every field first, then apply all of them (all or nothing)."""
        clean = {name: _validate_setting(name, value) for name, value in fields.items()}
        self.measure()  # energy so far was used under the old settings
        old_interval = self.reporting_interval_s
        for name, value in clean.items():
            setattr(self, name, value)
        if self.reporting_interval_s != old_interval and self._loop is not None:
            self._reschedule_reports()

    def _on_control(self, msg: aiomqtt.Message) -> None:
        self.controls += 1
        try:
            ctl = messages.Control.model_validate_json(_as_bytes(msg.payload))
        except pydantic.ValidationError:
            self.malformed += 1
            return
        ack_id = ctl.params.get("id")
        ack_id = ack_id if isinstance(ack_id, str) and 0 < len(ack_id) <= 64 else None
        if ctl.action == "ping":
            response_topic = getattr(msg.properties, "ResponseTopic", None)
            if response_topic:
                correlation = getattr(msg.properties, "CorrelationData", None)
                body = {"action": "pong", "meter_id": self.meter_id, "binding": self.binding, "ts": time.time()}
                self._enqueue(_Out(
                    self._out_due(), response_topic, json.dumps(body).encode(), "control",
                    correlation=correlation if isinstance(correlation, bytes) else None,
                ))
            if ack_id:
                self._ack(self._make_ack(ack_id, "applied", None, {"pong": True, "binding": self.binding}))
            return
        # rebind
        ack_id = ack_id or f"rebind-{ctl.params.get('version')}"[:64]
        if "version" not in ctl.params:
            self._ack(self._make_ack(ack_id, "rejected", "rebind needs params.version"))
            return
        self.binding = ctl.params["version"]
        self._ack(self._make_ack(ack_id, "applied", None, {"binding": self.binding}))

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


async def _end(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait until they are over.

    Python 3.11's ``asyncio.wait_for`` (inside aiomqtt's publish) can swallow a
    cancellation that races with its result, so cancel again until they end.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a lost connection is expected here


# -------------------------------------------------------------------- validation helpers
def _as_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return b"" if payload is None else str(payload).encode()


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _find_id(raw: bytes) -> str | None:
    """The id of a command that failed validation, if one can be found to answer to."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    cmd_id = data.get("id") if isinstance(data, dict) else None
    return cmd_id if isinstance(cmd_id, str) and 0 < len(cmd_id) <= 64 else None


def _summary(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _param(params: dict[str, Any], name: str, kind: str) -> Any:
    if name not in params:
        raise Rejected(f"{kind} needs params.{name}")
    return params[name]


def _validate_setting(name: str, value: Any) -> Any:
    if name == "relay":
        if value not in RELAY_STATES:
            raise Rejected(f"relay {value!r} is not 'open' or 'closed'")
        return value
    if name == "reporting_interval_s":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise Rejected(f"reporting_interval_s {value!r} is not a number of seconds")
        if not MIN_INTERVAL_S <= value <= MAX_INTERVAL_S:
            raise Rejected(f"reporting_interval_s {value!r} is outside [{MIN_INTERVAL_S:g}, {MAX_INTERVAL_S:g}]")
        return float(value)
    if name == "load_limit_w":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise Rejected(f"load_limit_w {value!r} is not null or a number of watts >= 0")
        return float(value)
    if name == "tariff_id":
        if not isinstance(value, str) or not 0 < len(value) <= 64:
            raise Rejected(f"tariff_id {value!r} is not a string of 1..64 characters")
        return value
    raise Rejected(f"unknown setting {name!r} (known: {', '.join(SETTING_NAMES)})")
