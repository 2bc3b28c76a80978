"""A command sent to many meters at once (``CommandService.submit_many``, what a command job uses):
the same records, downlinks and events as one ``submit`` per meter."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from metertwin.core import clients, topics
from metertwin.core.clients import get_redis
from metertwin.core.errors import UnknownMeter
from metertwin.core.settings import reset_settings
from metertwin.stream import events
from metertwin.stream import keys as stream_keys
from metertwin.twin import keys
from metertwin.twin.commands import CommandService
from storage.embedded import Mosquitto
from tests.concentrator.support import provision
from tests.waiting import wait_until


def _subscriber(broker: Mosquitto, *wanted: str) -> tuple[mqtt.Client, list[mqtt.MQTTMessage]]:
    got: list[mqtt.MQTTMessage] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(broker.service_user, broker.service_password)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_message = lambda _c, _u, msg: got.append(msg)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.subscribe([(t, 1) for t in wanted])
    assert subscribed.wait(5)
    return client, got


def test_batch_goes_direct_and_down_the_concentrator_with_records_and_events(env: dict[str, str],
                                                                             mosquitto: Mosquitto) -> None:
    tag = uuid.uuid4().hex[:8]
    direct, behind, dcu = [f"cb-{tag}-0", f"cb-{tag}-1"], f"cb-{tag}-2", f"dcu-{tag}"
    provision(direct)
    provision([behind], dcu)
    client, got = _subscriber(mosquitto, *[topics.commands(m) for m in direct], topics.concentrator_commands(dcu))
    try:
        r = get_redis()
        out = CommandService(r).submit_many([direct[0], f"cb-{tag}-none", behind, direct[1]], "relay",
                                            {"state": "open"}, expiry_s=60, actor="job:t")
        assert isinstance(out[1], UnknownMeter)
        assert f"cb-{tag}-none" in out[1].message
        sent = dict(zip([direct[0], behind, direct[1]], [out[0], out[2], out[3]], strict=True))
        assert all(isinstance(c, str) for c in sent.values()), out
        wait_until(lambda: len(got) == 3)
        by_id = {json.loads(m.payload)["id"]: m for m in got}
        down = by_id[sent[behind]]
        assert down.topic == topics.concentrator_commands(dcu)
        assert json.loads(down.payload)["meter_id"] == behind
        for m in direct:
            msg = by_id[str(sent[m])]
            assert msg.topic == topics.commands(m)
            assert json.loads(msg.payload)["params"] == {"state": "open"}
            assert "meter_id" not in json.loads(msg.payload)
            props: Any = msg.properties
            assert 0 < props.MessageExpiryInterval <= 60
        commands = CommandService(r)
        for m, cid in sent.items():
            record = commands.get(m, str(cid))
            assert (record["status"], record["attempts"], record["actor"]) == ("delivered", 1, "job:t")
            assert [c["id"] for c in commands.recent(m)] == [cid]
            assert r.sismember(keys.METERS_WITH_OPEN_COMMANDS, m)
        assert not r.sismember(keys.METERS_WITH_OPEN_COMMANDS, f"cb-{tag}-none") or not r.exists(
            keys.pending_commands(f"cb-{tag}-none"))
        seen: dict[str, list[str]] = {}
        for entry_id, fields in r.xrange(stream_keys.zone_events("edge")):
            e = events.Event.from_entry(entry_id, fields)
            if e.type == events.COMMAND and e.meter in sent:
                seen.setdefault(e.meter, []).append(json.loads(e.data)["status"])
        assert seen == {m: ["pending", "delivered"] for m in sent}
    finally:
        client.disconnect()
        client.loop_stop()


def test_broker_down_leaves_the_batch_pending_for_the_sweeper(env: dict[str, str], monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = [f"cb-{tag}-0", f"cb-{tag}-1"]
    provision(ids)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("MQTT_PORT", str(closed))
    clients.close_all()
    reset_settings()
    r = get_redis()
    out = CommandService(r).submit_many(ids, "relay", {"state": "closed"}, expiry_s=60, actor="job:t")
    assert all(isinstance(c, str) for c in out), out
    for m, cid in zip(ids, out, strict=True):
        record = CommandService(r).get(m, str(cid))
        assert (record["status"], record["attempts"]) == ("pending", 1)
        assert r.sismember(keys.METERS_WITH_OPEN_COMMANDS, m)
