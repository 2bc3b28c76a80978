"""A simulated meter's MQTT v5 session: connect with backoff, persistent session, outbox, link delay.

Per meter there is a connection task (connect with backoff, persistent session,
``online``/``offline`` retained status with a will), a reader task (stamps each received
message with its link delay and schedules its handling by topic), and a sender task
(publishes the outbox in order, each message no earlier than its link delay).

Everything the meter sends goes through its outbox, which survives disconnects: a
message leaves the outbox only when the broker has acknowledged it (QoS1), so readings
taken while offline are sent on reconnect, in order, with their original ``seq`` and
``ts``. :class:`MeterSession` is a base of :class:`meter_sim.meter.SimMeter`; what each
topic's message means is :mod:`meter_sim.protocol`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from meter_sim.config import FleetConfig
from meter_sim.profile import LinkProfile

log = logging.getLogger("meter_sim")

ONLINE = b"online"
OFFLINE = b"offline"


@dataclass(slots=True)
class Outgoing:
    """One message in a meter's outbox."""

    due: float  # loop time before which the message may not leave (link latency)
    topic: str
    payload: bytes
    kind: str
    retain: bool = False
    correlation: bytes | None = None


class MeterClient(aiomqtt.Client):
    """aiomqtt's client with a slower housekeeping tick.

    aiomqtt wakes every client once a second to run paho's ``loop_misc`` (keepalive
    pings); with thousands of meters on one loop that is thousands of wake-ups per
    second for nothing. A tick of a quarter of the keepalive is enough for pings.
    """

    misc_interval_s: float = 5.0

    async def _misc_loop(self) -> None:
        while self._client.loop_misc() == 0:
            await asyncio.sleep(self.misc_interval_s)


class MeterSession:
    """The transport half of a meter: its MQTT connection, outbox, sender and reader."""

    # Set by SimMeter.__init__ (declared here for the type checker).
    meter_id: str
    config: FleetConfig
    rng: random.Random
    link: LinkProfile
    _password: str
    _gate: asyncio.Semaphore | None
    _handlers: dict[str, Callable[[aiomqtt.Message], None]]
    _t_status: str
    outbox: collections.deque[Outgoing]
    _out_last_due: float
    _in_last_due: float
    _in_pending: int
    readings_sent: int
    dropped: int
    reads_answered: int
    ems_sent: int
    malformed: int
    messages_in: int
    messages_out: int
    connects: int
    connect_failures: int
    disconnects: int
    connected: bool
    offline: bool
    _stopping: bool
    _loop: asyncio.AbstractEventLoop | None
    _out_ready: asyncio.Event | None
    _session_no: int
    _online: asyncio.Event | None
    _leave: asyncio.Future[str] | None

    def _wake_session(self, why: str) -> None:
        if self._leave is not None and not self._leave.done():
            self._leave.set_result(why)

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"meter {self.meter_id!r} is not started")
        return self._loop

    def _new_client(self) -> MeterClient:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.config.session_expiry_s
        client = MeterClient(
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

    async def _session(self, client: MeterClient) -> str:
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
            self.outbox.appendleft(Outgoing(self._out_due(), self._t_status, ONLINE, "status", retain=True))
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

    async def _disconnect(self, client: MeterClient, why: str) -> None:
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

    def _enqueue(self, item: Outgoing) -> None:
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

    async def _sender(self, client: MeterClient) -> None:
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

    # ---------------------------------------------------------------- receiving
    async def _reader(self, client: MeterClient) -> None:
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
