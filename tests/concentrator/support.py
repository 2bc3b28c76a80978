"""Helpers for the concentrator tests: tokens, provisioning through the registry, an MQTT client that
plays a concentrator (with each QoS1 publish's PUBACK reason), a batch of readings."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from metertwin.core import topics
from metertwin.core.auth import issue_token
from storage.embedded import Mosquitto
from tests.conftest import TEST_SIGNING_KEY
from tests.invoke import call, load_handler

registry = load_handler("registry")
ingest = load_handler("ingest")
mdms_ingest = load_handler("mdms-ingest")
read = load_handler("read")
write = load_handler("write")


def token(*scopes: str) -> str:
    return issue_token("tester", set(scopes), key=TEST_SIGNING_KEY)


def provision(meters: list[str], concentrator: str | None = None) -> dict[str, Any] | None:
    """Twins for ``meters`` and, if named, a concentrator they are all assigned to (its credentials)."""
    status, body = call(registry, "POST", "/meters/bulk", body={"meters": [{"meter_id": m} for m in meters]},
                        token=token("admin"))
    assert status == 201, body
    if concentrator is None:
        return None
    status, created = call(registry, "POST", "/concentrators", body={"concentrator_id": concentrator},
                           token=token("admin"))
    assert status == 201, created
    status, body = call(registry, "POST", f"/concentrators/{concentrator}/meters", body={"meter_ids": meters},
                        token=token("admin"))
    assert status == 200, body
    assert body["assigned"] == len(meters), body
    return dict(created)


def reading(seq: int, *, ts: float | None = None, **extra: Any) -> dict[str, Any]:
    return {"seq": seq, "ts": ts or time.time() - 60 + seq, "import_kwh": 1.0 + seq, "export_kwh": 0.0,
            "power_w": 500.0, "voltage_v": 230.0, **extra}


def batch(*items: dict[str, Any]) -> bytes:
    return json.dumps({"readings": list(items)}).encode()


def twin_hash(redis_client: Any, meter_id: str) -> dict[str, str]:
    from metertwin.twin import keys

    return dict(redis_client.hgetall(keys.twin(meter_id)))


class Device:
    """An MQTT client with a concentrator's (or meter's) account; ``publish`` returns the PUBACK reason."""

    def __init__(self, broker: Mosquitto, username: str, password: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, password)
        self.received: list[mqtt.MQTTMessage] = []
        self._acks: dict[int, Any] = {}
        self._cv = threading.Condition()
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda _c, _u, msg: self.received.append(msg)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._cv:
            self._acks[mid] = reason
            self._cv.notify_all()

    def publish(self, topic: str, payload: bytes, properties: Any = None) -> Any:
        """Publish QoS1 and return the broker's PUBACK reason code (``Not authorized`` when the ACL refuses)."""
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        with self._cv:
            assert self._cv.wait_for(lambda: info.mid in self._acks, timeout=5), f"no PUBACK for {topic}"
            return self._acks.pop(info.mid)

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connector_call(handler: Any, topic: str, payload: bytes) -> tuple[int, Any]:
    """What the MQTT connector sends for one message."""
    return call(handler, "POST", "/", body=payload, token=token("service"), headers={"X-Topic": topic})


def readings_topic(concentrator: str) -> str:
    return topics.concentrator_readings(concentrator)
