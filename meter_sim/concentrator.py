"""Simulated data concentrators (DCUs): N concentrators x M meters, one MQTT session per concentrator.

Each concentrator measures its meters (a :class:`~meter_sim.device.MeterDevice` each, as a direct
meter would) and publishes their readings every ``reporting_interval_s`` as batches on
``dcu/<id>/up/readings`` (QoS 1, at most ``batch_max`` readings a message, each with its meter's
own ``seq`` and ``ts``). It answers the twin's reads and commands for its meters, which come
down ``dcu/<id>/down/read|cmd`` addressed by ``meter_id``: the answer goes to the request's
response topic, the ack to the meter's own ``meters/<id>/up/ack`` (both allowed by its ACL).

Credentials are the registry's answers (``POST /concentrators``, then
``POST /concentrators/{id}/meters``): ``[{"concentrator_id", "username", "password", "meters": [...]}]``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from meter_sim.config import FleetConfig
from meter_sim.device import MeterDevice, Rejected
from metertwin.core import topics


@dataclass
class ConcentratorStats:
    readings: int = 0
    batches: int = 0
    reads_answered: int = 0
    commands_applied: int = 0
    commands_rejected: int = 0


@dataclass
class _Concentrator:
    concentrator_id: str
    client: mqtt.Client
    devices: dict[str, MeterDevice]
    seqs: dict[str, int]
    stats: ConcentratorStats = field(default_factory=ConcentratorStats)
    connected: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ConcentratorFleet:
    """N simulated concentrators; :meth:`start` connects them and reports every ``reporting_interval_s``
    (0: only when :meth:`report_now` is called)."""

    def __init__(self, broker_host: str, broker_port: int, concentrators: list[dict[str, Any]], *,
                 reporting_interval_s: float = 60.0, batch_max: int = 1000, seed: int = 1,
                 prosumer_share: float = 0.3, start_seq: int = 0, spread: bool = False) -> None:
        self.config = FleetConfig(broker_host=broker_host, broker_port=broker_port, wall_start=time.time())
        self.interval_s = reporting_interval_s
        #: Each concentrator reports at its own offset within the interval (real DCUs are not in step),
        #: so the broker sees a steady rate instead of one burst per interval.
        self.spread = spread
        self.batch_max = batch_max
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        #: Publishes not waited for (``report_now(wait=False)``): :meth:`stop` lets them finish.
        self._pending: list[mqtt.MQTTMessageInfo] = []
        self.units: dict[str, _Concentrator] = {}
        for spec in concentrators:
            cid = str(spec["concentrator_id"])
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=str(spec["username"]), protocol=mqtt.MQTTv5)
            client.username_pw_set(str(spec["username"]), str(spec["password"]))
            client.max_inflight_messages_set(1000)
            devices = {m: MeterDevice(m, self.config, seed=seed, reporting_interval_s=reporting_interval_s or 60.0,
                                      prosumer_share=prosumer_share) for m in spec["meters"]}
            unit = _Concentrator(cid, client, devices, dict.fromkeys(devices, start_seq - 1))
            client.on_connect = self._on_connect(unit)
            client.on_message = self._on_message(unit)
            self.units[cid] = unit

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout_s: float = 30.0) -> Self:
        for unit in self.units.values():
            unit.client.connect_async(self.config.broker_host, self.config.broker_port, keepalive=60)
            unit.client.loop_start()
        deadline = time.monotonic() + timeout_s
        for unit in self.units.values():
            if not unit.connected.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise TimeoutError(f"concentrator {unit.concentrator_id!r} did not connect within {timeout_s} s")
        if self.interval_s > 0:
            self._ticker = threading.Thread(target=self._tick, name="dcu-ticker", daemon=True)
            self._ticker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(5)
        deadline = time.monotonic() + 30
        for info in self._pending:  # a reading counted as sent is handed to the broker before we leave
            info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
        for unit in self.units.values():
            unit.client.disconnect()
            unit.client.loop_stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _tick(self) -> None:
        next_at = time.monotonic() + (0.0 if self.spread else self.interval_s)
        if self.spread:
            ids = list(self.units)
            step = self.interval_s / max(1, len(ids))
            k = 0
            while not self._stop.wait(max(0.0, next_at + (k % len(ids)) * step - time.monotonic())):
                self.report_now(ids[k % len(ids)], wait=False)
                k += 1
                if k % len(ids) == 0:
                    next_at += self.interval_s
            return
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self.report_now()
            next_at += self.interval_s

    # ---------------------------------------------------------------- uplink
    def report_now(self, concentrator_id: str | None = None, *, wait: bool = True) -> int:
        """Measure every meter (of one concentrator, or all) and publish the batches; returns readings sent."""
        units = [self.units[concentrator_id]] if concentrator_id else list(self.units.values())
        infos = []
        sent = 0
        for unit in units:
            readings = []
            with unit.lock:
                for meter_id, device in unit.devices.items():
                    unit.seqs[meter_id] += 1
                    readings.append({"meter_id": meter_id, "seq": unit.seqs[meter_id], **device.measure()})
            for start in range(0, len(readings), self.batch_max):
                chunk = readings[start:start + self.batch_max]
                payload = json.dumps({"readings": chunk}, separators=(",", ":"))
                infos.append(unit.client.publish(topics.concentrator_readings(unit.concentrator_id), payload, qos=1))
                unit.stats.batches += 1
                unit.stats.readings += len(chunk)
                sent += len(chunk)
        if wait:
            for info in infos:
                info.wait_for_publish(timeout=30)
        else:
            self._pending = [i for i in self._pending if not i.is_published()] + infos
        return sent

    # ---------------------------------------------------------------- downlink
    def _on_connect(self, unit: _Concentrator) -> Any:
        def on_connect(client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                return
            client.subscribe(f"{topics.concentrator_root(unit.concentrator_id)}/down/#", qos=1)
            unit.connected.set()
        return on_connect

    def _on_message(self, unit: _Concentrator) -> Any:
        def on_message(client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                body = json.loads(msg.payload)
                device = unit.devices[body["meter_id"]]
            except (ValueError, KeyError, TypeError):
                return  # not one of ours: a real DCU would drop it too
            if msg.topic == topics.concentrator_read_requests(unit.concentrator_id):
                asked: Any = msg.properties
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.CorrelationData = getattr(asked, "CorrelationData", b"")
                with unit.lock:
                    answer = device.measure()
                client.publish(getattr(asked, "ResponseTopic", ""), json.dumps(answer), qos=1, properties=props)
                unit.stats.reads_answered += 1
            elif msg.topic == topics.concentrator_commands(unit.concentrator_id):
                ack: dict[str, Any] = {"id": body.get("id"), "ts": time.time()}
                try:
                    with unit.lock:
                        extra = device.apply(str(body.get("kind")), dict(body.get("params") or {}))
                        ack.update(status="applied", reported={**device.settings(), **extra})
                    unit.stats.commands_applied += 1
                except Rejected as exc:
                    ack.update(status="rejected", reason=str(exc)[:500])
                    unit.stats.commands_rejected += 1
                client.publish(topics.command_acks(device.meter_id), json.dumps(ack), qos=1)
        return on_message

    def stats(self) -> ConcentratorStats:
        total = ConcentratorStats()
        for unit in self.units.values():
            for name in vars(total):
                setattr(total, name, getattr(total, name) + getattr(unit.stats, name))
        return total
