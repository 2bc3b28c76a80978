"""The MQTT connector, as OpenFaaS's mqtt-connector does it, inside the gateway.

MQTT (annotation ``topic``, comma-separated filters): one MQTT v5 session per gateway
worker subscribes to ``$share/gw-<zone>/<filter>`` (the zone's workers split the load; a
zone served by one worker may subscribe plainly, ``--mqtt-no-share``, which survives a
broker restart: Mosquitto 2.0 does not restore shared subscriptions of persistent sessions)
with a subscription identifier per filter, so a message is routed to exactly the
functions whose filter it matched. Each message invokes the function (or, annotated
``mqtt-batch``, joins a batch call: ``gateway.mqtt_batcher``) with the payload as
body, ``POST /``, headers ``X-Topic``, ``Content-Type: application/json`` and the
gateway's service bearer token. Delivery is at-least-once: messages are QoS1 and
acknowledged (``manual_ack``) only after the handler returned with an answer other than
429/502/503/504 (those mean the backend is down: the message is retried with back-off
and stays unacknowledged meanwhile); a message a function refuses (any other 4xx or 5xx) is
kept as a dead letter first (``gateway.dead_letters``); the session is persistent
(stable client id, session expiry) so unacknowledged messages are redelivered when a
crashed worker comes back; the broker sends at most ``concurrency`` unacknowledged
messages at a time (MQTT v5 Receive Maximum), which bounds the work in flight.

The session's client id is ``gw-<zone>-<instance>-<digest of the topic filters>``
(:func:`session_client_id`): a restarted worker with the same instance name and the same
annotations resumes its session and gets its unacknowledged and queued QoS1 messages;
a worker whose annotations changed starts a fresh session instead of inheriting
subscriptions it does not know about. The tradeoff: messages held by the old session
(queued while it was offline, or unacknowledged) are not redelivered to the new one and
are dropped by the broker when the old session expires (``session_expiry_s``, 300 s by
default). Change a zone's topic annotations after its workers have drained (a graceful
stop acknowledges everything received and ends the session), not across a crash. An
instance name must also be stable across restarts for redelivery (``--instance``; the
default, ``<host>-<pid>``, changes with every process).

Cron (annotation ``schedule``): :mod:`gateway.cron`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as _Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from starlette.datastructures import Headers

from gateway.dead_letters import ConnectorDeadLetters
from gateway.functions import Event, Result
from gateway.mqtt_batcher import Batcher
from gateway.stack import FunctionSpec, StackError
from metertwin.core import auth, mqtt_batch
from metertwin.core.errors import MeterTwinError
from metertwin.core.paho_fast import speed_up_paho

log = logging.getLogger("gateway.connectors")

Invoke = Callable[[str, Event], Awaitable[Result]]


def _props(packet_type: int) -> Any:
    return _Properties(packet_type)  # type: ignore[no-untyped-call]


class ServiceToken:
    """The gateway's ``service`` bearer token, minted at startup and re-minted before it expires."""

    def __init__(self, zone: str, ttl_s: int = 3600) -> None:
        self.subject = f"gateway-{zone}"
        self.ttl_s = ttl_s
        self._value: bytes | None = None
        self._renew_at = 0.0
        self._warned = False

    def header(self) -> bytes | None:
        """``Bearer <token>`` as bytes, or None when no signing key is configured."""
        now = time.time()
        if self._value is None or now >= self._renew_at:
            try:
                token = auth.issue_token(self.subject, {"service"}, ttl_s=self.ttl_s)
            except MeterTwinError as exc:
                if not self._warned:
                    log.warning("connectors invoke without a bearer token: %s", exc)
                    self._warned = True
                return None
            self._value = f"Bearer {token}".encode()
            self._renew_at = now + self.ttl_s * 0.75
        return self._value


#: Answers that mean the backend is down or busy, not that the message is bad: the message
#: is invoked again (unacknowledged meanwhile). A 500 is a handler bug and is acknowledged,
#: so that a poison message cannot hold a slot of the receive window forever.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: Backoff between re-invocations.
RETRY_MIN_S = 0.2
RETRY_MAX_S = 10.0

def session_client_id(base: str, filters: list[str]) -> str:
    """The MQTT client id (the session's key) of a connector: ``<base>-<digest of its filters>``.

    A session resumed with ``clean_start=False`` keeps the subscriptions it had, and MQTT has
    no way to list them: a gateway with other topic annotations that took over the session
    would inherit the old subscriptions, receive the messages queued for them, and route
    them by subscription identifier to its own functions (issue 10, item 12). With the
    filters in the id, only a gateway subscribing to the same filters, in the same order
    (so the same identifiers), resumes a session.
    """
    digest = hashlib.sha256("\n".join(filters).encode()).hexdigest()[:10]
    return f"{base}-{digest}"


class MqttConnector:
    """Invoke functions for MQTT messages on their ``topic`` annotation (see module docstring)."""

    def __init__(
        self,
        zone: str,
        specs: Iterable[FunctionSpec],
        invoke: Invoke,
        token: ServiceToken,
        *,
        host: str,
        port: int,
        username: str | None,
        password: str | None,
        client_id: str,
        concurrency: int = 16,
        session_expiry_s: int = 300,
        shared: bool = True,
        dead_letters: ConnectorDeadLetters | None = None,
    ) -> None:
        self.zone = zone
        #: Where messages the functions refused are kept before they are acknowledged (None: only logged).
        self.dead_letters = dead_letters
        self.invoke = invoke
        self.token = token
        self.host, self.port = host, port
        self.concurrency = concurrency
        self.session_expiry_s = session_expiry_s
        #: Subscribe as ``$share/gw-<zone>/...`` (workers split the load) or plainly (one worker
        #: per zone). Mosquitto 2.0 restores a persistent session's plain subscriptions after a
        #: broker restart but not its shared ones, so a lone worker loses nothing across one.
        self.share = shared
        self.filters: list[str] = []
        self.routes: dict[str, list[str]] = {}
        specs = list(specs)
        for spec in specs:
            for topic in spec.topics:
                if topic not in self.routes:
                    self.filters.append(topic)
                    self.routes[topic] = []
                self.routes[topic].append(spec.name)
        #: Functions that take their messages in batch calls (annotation ``mqtt-batch``, gateway.mqtt_batcher).
        self.batchers: dict[str, Batcher] = {}
        for spec in specs:
            if spec.topics and spec.annotations.get(mqtt_batch.ANNOTATION):
                try:
                    size, wait_s = mqtt_batch.parse_settings(spec.annotations[mqtt_batch.ANNOTATION])
                except ValueError as exc:
                    raise StackError(f"functions.{spec.name}.annotations.{mqtt_batch.ANNOTATION}: {exc}") from None
                self.batchers[spec.name] = Batcher(
                    spec.name, invoke, token.header, size, wait_s, retry_statuses=RETRY_STATUSES,
                    retry_min_s=RETRY_MIN_S, retry_max_s=RETRY_MAX_S, stopping=lambda: self._stopping,
                    dead_letters=dead_letters)
        self.delivered = 0
        #: Re-invocations after a function answered one of RETRY_STATUSES (message unacknowledged).
        self.retries = 0
        #: Seconds from a message's receipt to its acknowledgement (retries included): the
        #: connector's lag, observed by the gateway's metrics when set.
        self.observe_lag: Callable[[float], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sem = asyncio.Semaphore(concurrency)
        self._subscribed: set[int] = set()
        self._sub_mids: dict[int, int] = {}
        self._ready = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._tasks: set[concurrent.futures.Future[None]] = set()
        speed_up_paho()  # one ReasonCode per acknowledged message: keep it cheap
        self.client_id = session_client_id(client_id, [self.shared(t) for t in self.filters])
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        if username:
            self.client.username_pw_set(username, password or None)
        self.client.reconnect_delay_set(min_delay=1, max_delay=15)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    @property
    def enabled(self) -> bool:
        return bool(self.filters)

    def ready(self) -> bool:
        """True once every filter is subscribed on the current connection."""
        return self._ready.is_set()

    def shared(self, topic: str) -> str:
        """The filter this worker subscribes to for ``topic`` (shared group or plain)."""
        return f"$share/gw-{self.zone}/{topic}" if self.share else topic

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if not self.enabled:
            return
        self._loop = asyncio.get_running_loop()
        props = _props(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        # A batch fills only if the broker may send that many unacknowledged messages.
        props.ReceiveMaximum = max([self.concurrency, *(2 * b.size for b in self.batchers.values())])
        # connect_async + loop_forever(retry_first_connection=True): the network thread keeps
        # (re)connecting with backoff until stop(), including when the broker is down at startup.
        self.client.connect_async(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        self._thread = threading.Thread(target=self._network_loop, name=f"mqtt-{self.zone}", daemon=True)
        self._thread.start()

    def _network_loop(self) -> None:
        while not self._stopping:
            try:
                self.client.loop_forever(retry_first_connection=True)
            except Exception as exc:  # never let the connector thread die
                log.warning("MQTT loop for zone %s failed: %s; restarting", self.zone, exc)
                time.sleep(1.0)
            else:
                return

    async def stop(self, timeout_s: float) -> None:
        """Leave the shared group, finish the messages already received, then end the session.

        After the UNSUBACK the broker sends nothing more; the messages it sent before are
        handled and acknowledged. Only when all of them are is the session ended at once
        (expiry 0); otherwise it is kept, so the unacknowledged ones are redelivered.
        """
        if self._thread is None:
            return
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        for batcher in self.batchers.values():
            batcher.flush()
        unsubscribed = threading.Event()
        self.client.on_unsubscribe = lambda *_args: unsubscribed.set()
        with contextlib.suppress(Exception):
            if self.client.is_connected():
                self.client.unsubscribe([self.shared(t) for t in self.filters])
                await asyncio.to_thread(unsubscribed.wait, min(2.0, timeout_s))
        pending: set[concurrent.futures.Future[None]] = set(self._tasks)
        if pending:
            _, pending = await asyncio.to_thread(
                concurrent.futures.wait, pending, max(0.1, deadline - time.monotonic())
            )
        props = _props(PacketTypes.DISCONNECT)
        if pending:
            log.warning("MQTT zone %s: %d messages still being handled at shutdown; keeping the session "
                        "so that they are redelivered", self.zone, len(pending))
        else:
            props.SessionExpiryInterval = 0
        with contextlib.suppress(Exception):
            self.client.disconnect(properties=props)
        await asyncio.to_thread(self._thread.join, max(0.1, deadline - time.monotonic()))
        self._thread = None

    # -- paho callbacks (network thread) -----------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT broker %s:%d refused the gateway: %s", self.host, self.port, reason)
            return
        self._subscribed.clear()
        self._sub_mids.clear()
        for index, topic in enumerate(self.filters, start=1):
            props = _props(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = index
            _, mid = client.subscribe(self.shared(topic), options=SubscribeOptions(qos=1), properties=props)
            if mid is not None:
                self._sub_mids[mid] = index

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        index = self._sub_mids.pop(mid, None)
        if index is None:
            return
        if any(r.is_failure for r in reasons):
            log.warning("subscribing to %s was refused: %s", self.shared(self.filters[index - 1]), reasons)
            return
        self._subscribed.add(index)
        if len(self._subscribed) == len(self.filters):
            self._ready.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._ready.clear()
        if not self._stopping:
            log.warning("MQTT connection of zone %s lost (%s); reconnecting", self.zone, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) if msg.properties else None
        if ids:
            # The filter is checked too: an identifier never routes a topic its filter does not match.
            matched = [self.filters[i - 1] for i in ids if 0 < i <= len(self.filters)]
            names = [n for t in matched if mqtt.topic_matches_sub(t, msg.topic) for n in self.routes[t]]
        else:  # a broker without subscription identifiers: match the filters ourselves
            names = [n for t in self.filters if mqtt.topic_matches_sub(t, msg.topic) for n in self.routes[t]]
        assert self._loop is not None
        msg.timestamp = time.monotonic()  # receipt, on the clock observe_lag is measured with
        future = asyncio.run_coroutine_threadsafe(self._deliver(msg, list(dict.fromkeys(names))), self._loop)
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)

    # -- event loop ----------------------------------------------------------------------------
    async def _deliver(self, msg: mqtt.MQTTMessage, names: list[str]) -> None:
        direct = [n for n in names if n not in self.batchers]
        if direct and not await self._deliver_direct(msg, direct):
            return
        batched = [self.batchers[n].submit(msg) for n in names if n in self.batchers]
        if batched and not all(await asyncio.gather(*batched)):
            return  # unacknowledged: redelivered
        self.delivered += 1
        if msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)
        if self.observe_lag is not None:
            self.observe_lag(time.monotonic() - msg.timestamp)

    async def _deliver_direct(self, msg: mqtt.MQTTMessage, names: list[str]) -> bool:
        """One invocation per function; False if the message must stay unacknowledged."""
        async with self._sem:
            raw = [(b"x-topic", msg.topic.encode()), (b"content-type", b"application/json")]
            pending = names
            delay = RETRY_MIN_S
            while pending:
                token = self.token.header()
                headers = [*raw, (b"authorization", token)] if token else raw
                failed: list[str] = []
                try:
                    for name in pending:
                        result = await self.invoke(name, Event(msg.payload, Headers(raw=headers), "POST", b"", "/"))
                        if result.status in RETRY_STATUSES:
                            # The backend failed, not the message: never acknowledge it unprocessed.
                            failed.append(name)
                            log.warning("%s on %s answered %d (retrying in %.1f s): %s", name, msg.topic,
                                        result.status, delay, result.body[:200])
                        elif result.status >= 400:
                            # The function's verdict on the message itself (or a bug): kept as a dead
                            # letter, then acknowledged; if it cannot be kept, invoked again later.
                            log.warning("%s on %s answered %d: %s", name, msg.topic, result.status,
                                        result.body[:200])
                            if self.dead_letters is not None and not await self.dead_letters.keep(
                                    name, msg.topic, msg.payload, result.status, result.body):
                                failed.append(name)
                except Exception:
                    # Not acknowledged: the broker redelivers it on the next connection of this session.
                    log.exception("delivering %s to %s failed; leaving it unacknowledged", msg.topic, pending)
                    return False
                pending = failed
                if pending:
                    if self._stopping:
                        return False  # unacknowledged: redelivered to the session's next connection
                    self.retries += 1
                    # Holding the message (and its slot of the receive window) is the backpressure:
                    # the broker sends no more than the window until the backend answers again.
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
            return True

    @property
    def inflight(self) -> int:
        """Messages received and not yet acknowledged."""
        return len(self._tasks)
