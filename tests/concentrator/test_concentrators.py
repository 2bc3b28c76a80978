"""Concentrators against the real Mosquitto (dynamic security) and Redis: the ACL at the broker and at
ingest, a batch with bad readings, reads and commands through a concentrator, moving meters."""

from __future__ import annotations

import json
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from metertwin.core import topics
from metertwin.core.clients import get_redis
from metertwin.mdms import dead_letters, hot_store
from metertwin.twin.concentrators import downlink
from storage.embedded import Mosquitto
from tests.concentrator.support import (
    Device,
    batch,
    connector_call,
    ingest,
    mdms_ingest,
    provision,
    read,
    reading,
    readings_topic,
    registry,
    token,
    twin_hash,
    write,
)
from tests.invoke import call
from tests.waiting import wait_until


def _ids(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"dm-{tag}-{i}" for i in range(n)]


def _dcu() -> str:
    return f"dcu-{uuid.uuid4().hex[:8]}"


def test_broker_lets_a_concentrator_publish_only_for_its_meters(env: dict[str, str], mosquitto: Mosquitto) -> None:
    mine, other = _ids(2)
    dcu = _dcu()
    creds = provision([mine], dcu)
    provision([other])
    assert creds is not None
    device = Device(mosquitto, creds["username"], creds["password"])
    try:
        assert not device.publish(topics.concentrator_readings(dcu), batch()).is_failure
        assert not device.publish(topics.command_acks(mine), b"{}").is_failure
        assert device.publish(topics.readings(other), b"{}").is_failure  # not assigned: Not authorized
        assert device.publish(topics.concentrator_readings("someone-else"), batch()).is_failure
    finally:
        device.close()


def test_batch_applies_each_reading_on_its_own(env: dict[str, str], mosquitto: Mosquitto) -> None:
    a, b, stranger = _ids(3)
    dcu = _dcu()
    provision([a, b], dcu)
    provision([stranger])
    payload = batch({"meter_id": a, **reading(1)}, {"meter_id": b, **reading(1)},
                    {"meter_id": a, **reading(2, power_w="lots")}, {"meter_id": stranger, **reading(1)},
                    {"meter_id": "no such id!", **reading(1)})
    status, body = connector_call(ingest, readings_topic(dcu), payload)
    assert status == 200, body
    assert (body["applied"], body["duplicate"], body["rejected"]) == (2, 0, 3)
    rules = sorted(r["rule"] for r in body["not_applied"])
    assert rules == ["not_assigned", "schema", "schema"]
    assert "m" not in twin_hash(get_redis(), stranger)  # nothing of another meter's reading is applied
    status, recorded = call(registry, "GET", f"/concentrators/{dcu}/rejected", token=token("utility"))
    assert status == 200
    assert len(recorded["rejected"]) == 3
    assert any(stranger in r.get("reason", "") for r in recorded["rejected"])
    # Redelivered: counted once.
    version = twin_hash(get_redis(), a)["v"]
    status, again = connector_call(ingest, readings_topic(dcu), payload)
    assert (again["applied"], again["duplicate"]) == (0, 2)
    assert twin_hash(get_redis(), a)["v"] == version


def test_fog_dead_letters_the_bad_reading_alone(env: dict[str, str]) -> None:
    a, b = _ids(2)
    dcu = _dcu()
    before = dead_letters.count()
    payload = batch({"meter_id": a, **reading(1)}, {"meter_id": b, **reading(1)},
                    {"meter_id": a, **reading(2, voltage_v=-5)}, {"meter_id": b, **reading(2)})
    status, body = connector_call(mdms_ingest, readings_topic(dcu), payload)
    assert status == 200, body
    assert (body["accepted"], body["rejected"]) == (3, 1)
    assert dead_letters.count() == before + 1
    entry = dead_letters.list_entries(meter_id=a)[0][0]
    assert (entry.rule, entry.source, entry.topic) == ("range", "concentrator", readings_topic(dcu))
    assert len(hot_store.rows(b, 0, 2**62)) == 2
    status, again = connector_call(mdms_ingest, readings_topic(dcu), payload)
    assert (again["accepted"], again["duplicate"]) == (0, 3)


def test_read_and_command_go_through_the_concentrator(env: dict[str, str], mosquitto: Mosquitto) -> None:
    [meter] = _ids(1)
    dcu = _dcu()
    creds = provision([meter], dcu)
    assert creds is not None
    device = Device(mosquitto, creds["username"], creds["password"])
    acks: list[tuple[str, bytes]] = []

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        if msg.topic == topics.concentrator_read_requests(dcu):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            asked: Any = msg.properties
            props.CorrelationData = asked.CorrelationData
            answer = {k: v for k, v in reading(0).items() if k != "seq"}
            device.client.publish(asked.ResponseTopic, json.dumps(answer), qos=1, properties=props)
        elif msg.topic == topics.concentrator_commands(dcu):
            ack = {"id": body["id"], "status": "applied", "ts": reading(0)["ts"], "reported": {"relay": "open"}}
            topic = topics.command_acks(body["meter_id"])
            acks.append((topic, json.dumps(ack).encode()))
            device.client.publish(topic, json.dumps(ack), qos=1)

    device.client.on_message = on_message
    device.subscribe(f"{topics.concentrator_root(dcu)}/down/#")
    try:
        status, body = call(read, "GET", f"/meters/{meter}/reading", token=token("utility"),
                            query={"live": "true", "timeout": "5"})
        assert status == 200, body
        assert body["source"] == "meter"
        status, body = call(write, "POST", f"/meters/{meter}/commands", body={"kind": "relay",
                            "params": {"state": "open"}}, token=token("utility"))
        assert status == 202, body
        command_id = body["command"]["id"]
        wait_until(lambda: acks, 5, "the concentrator's ack")
        # The ack reaches the twin the way the connector hands it over (meters/<id>/up/ack).
        status, answer = connector_call(write, *acks[0])
        assert status == 200, answer
        assert answer["status"] == "acknowledged", answer
        status, body = call(write, "GET", f"/meters/{meter}/commands/{command_id}", token=token("utility"))
        assert body["command"]["status"] == "acknowledged"
    finally:
        device.close()


def test_moving_a_meter_moves_its_acl_and_downlink(env: dict[str, str], mosquitto: Mosquitto) -> None:
    [meter] = _ids(1)
    first, second = _dcu(), _dcu()
    old = provision([meter], first)
    status, new = call(registry, "POST", "/concentrators", body={"concentrator_id": second}, token=token("admin"))
    assert old is not None
    assert status == 201
    status, body = call(registry, "PUT", f"/meters/{meter}/route", body={"concentrator_id": second},
                        token=token("utility"))
    assert status == 200, body
    assert body["moved_from"] == {first: 1}, body
    was, now = Device(mosquitto, old["username"], old["password"]), Device(mosquitto, new["username"],
                                                                           new["password"])
    try:
        assert was.publish(topics.readings(meter), b"{}").is_failure
        assert not now.publish(topics.readings(meter), b"{}").is_failure
        _, body = connector_call(ingest, readings_topic(first), batch({"meter_id": meter, **reading(1)}))
        assert body["not_applied"][0]["rule"] == "not_assigned"
        _, body = connector_call(ingest, readings_topic(second), batch({"meter_id": meter, **reading(1)}))
        assert body["applied"] == 1
        assert downlink(get_redis(), meter, "cmd") == (topics.concentrator_commands(second), {"meter_id": meter})
        status, body = call(registry, "PUT", f"/meters/{meter}/route", body={"concentrator_id": None},
                            token=token("utility"))
        assert status == 200
        assert body["moved_from"] == {second: 1}
        assert now.publish(topics.readings(meter), b"{}").is_failure
        assert downlink(get_redis(), meter, "cmd") == (topics.commands(meter), {})
        _, body = call(registry, "GET", f"/concentrators/{second}", token=token("utility"))
        assert body["meters"] == []
        # Direct again: its own readings apply; a concentrator's do not.
        _, body = connector_call(ingest, topics.readings(meter), json.dumps(reading(2)).encode())
        assert body["result"] == "applied"
    finally:
        was.close()
        now.close()


def test_unknown_concentrator_and_bad_route_are_4xx(env: dict[str, str]) -> None:
    [meter] = _ids(1)
    provision([meter])
    status, body = call(registry, "PUT", f"/meters/{meter}/route", body={"concentrator_id": "nope-x"},
                        token=token("utility"))
    assert status == 404
    assert "nope-x" in body["message"]
    status, body = call(registry, "POST", "/concentrators", body={"concentrator_id": "bad id"}, token=token("admin"))
    assert status == 400
    assert "bad id" in body["message"]
    status, body = connector_call(ingest, readings_topic("x1"), b'{"readings": 3}')
    assert status == 400
    assert "readings" in body["message"]
    status, body = connector_call(ingest, readings_topic("x1"), batch(*[{"meter_id": meter, **reading(i)}
                                                                        for i in range(1001)]))
    assert status == 413
    assert "1001" in body["message"]
