"""The twin side's MQTT session: QoS1 publish with a timeout, and MQTT v5 request/response.

One :class:`TwinMqtt` per process. paho's network thread reconnects on its own;
``on_connect`` resubscribes to this process's response topic. A request carries a
``ResponseTopic`` unique to this process and a random ``CorrelationData``; the
meter answers there and the waiting caller is woken.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from metertwin.core import topics
from metertwin.core.errors import BackendUnavailable, MeterTimeout
from metertwin.core.paho_fast import speed_up_paho

log = logging.getLogger("metertwin.mqtt")


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    # Requests and answers are small: without TCP_NODELAY, Nagle's algorithm and the
    # peer's delayed ACK hold each one back ~40 ms. paho does not set it; every socket
    # it opens (reconnects too) passes through here.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TwinMqtt:
    """A thread-safe MQTT v5 client for functions and services."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        connect_timeout_s: float = 5.0,
        client_id: str | None = None,
    ) -> None:
        self.requester = client_id or f"twin-{socket.gethostname()[:20]}-{os.getpid()}-{secrets.token_hex(3)}"
        self._host, self._port = host, port
        self._connect_timeout_s = connect_timeout_s
        self._connected = threading.Event()
        self._pending: dict[bytes, Future[dict[str, Any]]] = {}
        self._pending_lock = threading.Lock()
        self._listeners: dict[str, int] = {}
        self._listen_lock = threading.Lock()
        self._closing = False
        speed_up_paho()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.requester, protocol=mqtt.MQTTv5
        )
        if username:
            self._client.username_pw_set(username, password or None)
        self._client.max_inflight_messages_set(1000)
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.on_socket_open = _no_delay
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.message_callback_add(topics.all_responses(self.requester), self._on_response)

    # -- lifecycle ---------------------------------------------------------------------
    def connect(self) -> None:
        try:
            self._client.connect(self._host, self._port, keepalive=30)
        except OSError as exc:
            raise BackendUnavailable(f"MQTT broker {self._host}:{self._port} unreachable: {exc}") from exc
        self._client.loop_start()
        if not self._connected.wait(self._connect_timeout_s):
            self.close()
            raise BackendUnavailable(
                f"MQTT broker {self._host}:{self._port} did not accept the connection "
                f"within {self._connect_timeout_s} s"
            )

    def close(self) -> None:
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()
        with self._pending_lock:
            for fut in self._pending.values():
                fut.cancel()
            self._pending.clear()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            log.error("MQTT connection refused: %s", rc)
            return
        client.subscribe(topics.all_responses(self.requester), qos=1)
        for topic, qos in self._listeners.items():
            client.subscribe(topic, qos=qos)
        self._connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self._connected.clear()
        if rc.value != 0 and not self._closing:
            log.warning("MQTT disconnected (%s); paho reconnects", rc)

    def listen(self, topic: str, callback: Any, *, qos: int = 1, timeout_s: float = 2.0) -> None:
        """Subscribe ``callback(client, userdata, message)`` to ``topic``; restored on reconnect."""
        with self._listen_lock:
            self._client.message_callback_add(topic, callback)
            if topic in self._listeners:
                return
            self._subscribe_confirmed(topic, qos, timeout_s)
            self._listeners[topic] = qos

    def _subscribe_confirmed(self, topic: str, qos: int, timeout_s: float) -> None:
        done = threading.Event()
        granted: list[Any] = []

        def on_subscribe(_c: Any, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any) -> None:
            granted.extend(codes)
            done.set()

        self._client.on_subscribe = on_subscribe
        result, _mid = self._client.subscribe(topic, qos=qos)
        if result != mqtt.MQTT_ERR_SUCCESS or not done.wait(timeout_s):
            raise BackendUnavailable(f"MQTT subscription to {topic!r} not confirmed within {timeout_s} s")
        if granted and granted[0].is_failure:
            raise BackendUnavailable(f"MQTT broker refused subscription to {topic!r}: {granted[0]}")

    # -- publish ------------------------------------------------------------------------
    def publish(
        self,
        topic: str,
        payload: dict[str, Any] | bytes,
        *,
        qos: int = 1,
        timeout_s: float = 2.0,
        properties: Properties | None = None,
        retain: bool = False,
    ) -> None:
        """Publish and, for QoS > 0, wait until the broker has taken the message."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
        if not self._connected.wait(timeout_s):
            raise BackendUnavailable(f"MQTT broker not connected; cannot publish to {topic!r}")
        info = self._client.publish(topic, data, qos=qos, retain=retain, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BackendUnavailable(f"MQTT publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        if qos:
            info.wait_for_publish(timeout_s)
            if not info.is_published():
                raise BackendUnavailable(f"MQTT broker did not acknowledge {topic!r} within {timeout_s} s")

    def publish_many(
        self,
        messages: Sequence[tuple[str, dict[str, Any], Properties | None]],
        *,
        timeout_s: float = 2.0,
        window: int = 500,
    ) -> list[str | None]:
        """QoS 1 publish of ``(topic, payload, properties)`` messages without a PUBACK wait each:
        at most ``window`` await their PUBACK at once, then every one is awaited (each at most
        ``timeout_s`` from its send). Returns, per message, None (the broker took it) or why not."""
        out: list[str | None] = [None] * len(messages)
        if not messages:
            return out
        if not self._connected.wait(timeout_s):
            return [f"MQTT broker not connected; cannot publish to {t!r}" for t, _, _ in messages]
        flight: list[tuple[int, Any, float]] = []

        def settle(i: int, info: Any, sent: float) -> None:
            info.wait_for_publish(max(0.0, sent + timeout_s - time.monotonic()))
            if not info.is_published():
                out[i] = f"MQTT broker did not acknowledge {messages[i][0]!r} within {timeout_s} s"

        for i, (topic, payload, props) in enumerate(messages):
            data = json.dumps(payload, separators=(",", ":")).encode()
            info = self._client.publish(topic, data, qos=1, properties=props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                out[i] = f"MQTT publish to {topic!r} failed: {mqtt.error_string(info.rc)}"
                continue
            flight.append((i, info, time.monotonic()))
            if len(flight) >= window:
                settle(*flight.pop(0))
        for pending in flight:
            settle(*pending)
        return out

    # -- request/response ------------------------------------------------------------
    def request(
        self, meter_id: str, topic: str, payload: dict[str, Any], *, timeout_s: float
    ) -> dict[str, Any]:
        """Send a request to a meter and wait for its answer (MQTT v5 response topic)."""
        correlation = secrets.token_bytes(8)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = topics.responses(meter_id, self.requester)
        props.CorrelationData = correlation
        props.MessageExpiryInterval = max(1, int(timeout_s + 0.999))
        fut: Future[dict[str, Any]] = Future()
        with self._pending_lock:
            self._pending[correlation] = fut
        try:
            self.publish(topic, payload, qos=1, timeout_s=timeout_s, properties=props)
            return fut.result(timeout=timeout_s)
        except FutureTimeout:
            raise MeterTimeout(
                f"meter {meter_id!r} did not answer within {timeout_s} s", meter_id=meter_id, timeout_s=timeout_s
            ) from None
        finally:
            with self._pending_lock:
                self._pending.pop(correlation, None)

    def _on_response(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        correlation = getattr(msg.properties, "CorrelationData", None)
        with self._pending_lock:
            fut = self._pending.get(correlation) if correlation else None
        if fut is None or fut.done():
            return  # late answer to a request that already timed out
        try:
            fut.set_result(json.loads(msg.payload))
        except ValueError:
            fut.set_result({"error": "malformed response", "raw": msg.payload[:200].decode(errors="replace")})
