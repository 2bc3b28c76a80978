"""meter_sim against a real Mosquitto with dynamic security: what a twin sees of a simulated meter."""

from __future__ import annotations

import itertools
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from meter_sim import FleetThread, accounts
from metertwin.core import topics
from metertwin.twin import messages
from storage.embedded import Mosquitto
from tests.waiting import wait_until


@dataclass
class Seen:
    topic: str
    payload: bytes
    at: float
    correlation: bytes | None
    retain: bool


class Twin:
    """The twin side: the service account, watching meters' up topics and sending down."""

    def __init__(self, broker: Mosquitto, username: str | None = None, password: str | None = None) -> None:
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self.requester = f"test-{secrets.token_hex(3)}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.requester, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username or broker.service_user, password or broker.service_password)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        with self._lock:
            self.seen.append(Seen(msg.topic, msg.payload, time.monotonic(), corr, bool(msg.retain)))

    def watch(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(5), f"subscription to {topic} not confirmed"

    def on(self, topic: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.topic == topic]

    def publish(self, topic: str, payload: bytes | dict[str, Any], props: Properties | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, data, qos=1, properties=props)
        info.wait_for_publish(5)
        assert info.is_published()

    def command(self, meter_id: str, kind: str, params: dict[str, Any], *, cmd_id: str | None = None,
                expires_in_s: float = 60.0) -> str:
        cmd_id = cmd_id or f"c-{secrets.token_hex(4)}"
        body = {"id": cmd_id, "kind": kind, "params": params, "expires_at": time.time() + expires_in_s}
        self.publish(topics.commands(meter_id), body)
        return cmd_id

    def acks(self, meter_id: str) -> list[messages.CommandAck]:
        return [messages.CommandAck.model_validate_json(s.payload) for s in self.on(topics.command_acks(meter_id))]

    def wait_ack(self, meter_id: str, cmd_id: str, count: int = 1, timeout_s: float = 10.0) -> messages.CommandAck:
        def found() -> list[messages.CommandAck]:
            hits = [a for a in self.acks(meter_id) if a.id == cmd_id]
            return hits if len(hits) >= count else []
        return wait_until(found, timeout_s, f"ack {count}x of {cmd_id}")[-1]  # type: ignore[no-any-return]

    def request(self, meter_id: str, topic: str, payload: dict[str, Any]) -> tuple[bytes, float]:
        """Send a request with a v5 response topic; return (correlation, sent-at)."""
        correlation = secrets.token_bytes(8)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = topics.responses(meter_id, self.requester)
        props.CorrelationData = correlation
        sent = time.monotonic()
        self.publish(topic, payload, props)
        return correlation, sent

    def response(self, meter_id: str, correlation: bytes, timeout_s: float = 10.0) -> Seen:
        topic = topics.responses(meter_id, self.requester)

        def found() -> list[Seen]:
            return [s for s in self.on(topic) if s.correlation == correlation]
        return wait_until(found, timeout_s, "response")[0]  # type: ignore[no-any-return]

    def readings(self, meter_id: str) -> list[messages.Reading]:
        return [messages.Reading.model_validate_json(s.payload) for s in self.on(topics.readings(meter_id))]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def twin(mosquitto: Mosquitto) -> Iterator[Twin]:
    t = Twin(mosquitto)
    t.watch("meters/+/up/#")
    yield t
    t.close()


def provision(broker: Mosquitto, n: int) -> dict[str, str]:
    return accounts.provision(broker.host, broker.port, broker.service_user, broker.service_password,
                              accounts.new_meter_ids(n, prefix="t"))


@pytest.fixture
def fleet_factory(mosquitto: Mosquitto) -> Iterator[Callable[..., FleetThread]]:
    started: list[FleetThread] = []

    def make(n: int = 1, **kwargs: Any) -> FleetThread:
        creds = provision(mosquitto, n)
        kwargs.setdefault("reporting_interval_s", 3600)
        fleet = FleetThread(mosquitto.host, mosquitto.port, creds, **kwargs)
        started.append(fleet)
        return fleet.start(timeout_s=20)

    yield make
    for fleet in started:
        fleet.stop()


def only(fleet: FleetThread) -> str:
    return next(iter(fleet.meter_ids))


def test_periodic_readings_have_increasing_seq_and_monotonic_registers(twin: Twin, fleet_factory) -> None:
    fleet = fleet_factory(2, reporting_interval_s=1, prosumer_share=0.5)
    for meter_id in fleet.meter_ids:
        wait_until(lambda m=meter_id: len(twin.readings(m)) >= 3, 10, f"3 readings of {meter_id}")
        rs = twin.readings(meter_id)
        assert [r.seq for r in rs] == list(range(len(rs)))
        for a, b in itertools.pairwise(rs):
            assert b.ts > a.ts
            assert b.import_kwh >= a.import_kwh
            assert b.export_kwh >= a.export_kwh
        assert twin.on(topics.status(meter_id))[0].payload == b"online"
        wait_until(lambda m=meter_id: fleet.meter(m).readings_sent >= 3, 5, "PUBACKs counted")
    stats = fleet.stats()
    assert stats.connected == 2
    assert stats.readings_sent >= 6


def test_read_request_is_answered_on_the_response_topic_with_its_correlation(twin: Twin, fleet_factory) -> None:
    fleet = fleet_factory(1)
    meter_id = only(fleet)
    correlation, _ = twin.request(meter_id, topics.read_requests(meter_id), {"fields": None})
    seen = twin.response(meter_id, correlation)
    answer = messages.ReadResponse.model_validate_json(seen.payload)
    assert abs(answer.ts - time.time()) < 5
    assert answer.import_kwh > 0
    wait_until(lambda: fleet.meter(meter_id).reads_answered == 1, 5, "reads_answered counted")


def test_relay_open_applies_and_cuts_power(twin: Twin, fleet_factory) -> None:
    fleet = fleet_factory(1)
    meter_id = only(fleet)
    ack = twin.wait_ack(meter_id, twin.command(meter_id, "relay", {"state": "open"}))
    assert ack.status == "applied"
    assert ack.reported["relay"] == "open"
    snap = fleet.meter(meter_id)
    assert snap.power_w == 0.0
    assert snap.commands_applied == 1
    correlation, _ = twin.request(meter_id, topics.read_requests(meter_id), {})
    assert messages.ReadResponse.model_validate_json(twin.response(meter_id, correlation).payload).power_w == 0.0
    bad = twin.wait_ack(meter_id, twin.command(meter_id, "relay", {"state": "ajar"}))
    assert bad.status == "rejected"
    assert "ajar" in (bad.reason or "")


def test_reporting_interval_load_limit_and_tariff(twin: Twin, fleet_factory) -> None:
    fleet = fleet_factory(1, reporting_interval_s=3600)
    meter_id = only(fleet)
    ack = twin.wait_ack(meter_id, twin.command(meter_id, "reporting_interval", {"seconds": 1}))
    assert ack.status == "applied"
    assert ack.reported["reporting_interval_s"] == 1
    wait_until(lambda: len(twin.readings(meter_id)) >= 2, 10, "readings at the new interval")
    for seconds in (0, 86401, "10"):
        rej = twin.wait_ack(meter_id, twin.command(meter_id, "reporting_interval", {"seconds": seconds}))
        assert rej.status == "rejected"
        assert repr(seconds) in (rej.reason or "")

    ack = twin.wait_ack(meter_id, twin.command(meter_id, "load_limit", {"watts": 50}))
    assert ack.status == "applied"
    assert ack.reported["load_limit_w"] == 50
    assert fleet.meter(meter_id).power_w <= 50
    assert twin.wait_ack(meter_id, twin.command(meter_id, "load_limit", {"watts": -1})).status == "rejected"
    ack = twin.wait_ack(meter_id, twin.command(meter_id, "load_limit", {"watts": None}))
    assert ack.status == "applied"
    assert ack.reported["load_limit_w"] is None

    ack = twin.wait_ack(meter_id, twin.command(meter_id, "tariff", {"tariff_id": "tou-2", "bands": [1, 2]}))
    assert ack.status == "applied"
    assert ack.reported["tariff_id"] == "tou-2"
    assert fleet.meter(meter_id).settings["tariff"] == {"tariff_id": "tou-2", "bands": [1, 2]}


def test_desired_applies_known_fields_and_rejects_unknown_ones(twin: Twin, fleet_factory) -> None:
    fleet = fleet_factory(1)
    meter_id = only(fleet)
    fields = {"relay": "open", "reporting_interval_s": 900, "load_limit_w": 3000.0, "tariff_id": "flat"}
    ack = twin.wait_ack(meter_id, twin.command(meter_id, "desired", {"fields": fields}))
    assert ack.status == "applied"
    assert ack.reported == fields
    rej = twin.wait_ack(meter_id, twin.command(meter_id, "desired", {"fields": {"relay": "closed", "colour": "red"}}))
    assert rej.status == "rejected"
    assert "colour" in (rej.reason or "")
    assert rej.reported["relay"] == "open"  # all or nothing
    rej = twin.wait_ack(meter_id, twin.command(meter_id, "desired", {"fields": {"load_limit_w": "lots"}}))
    assert rej.status == "rejected"
    assert "load_limit_w" in (rej.reason or "")
    assert fleet.meter(meter_id).settings["load_limit_w"] == 3000.0


def test_trade_and_dr_are_remembered(twin: Twin, fleet_factory) -> None:
    fleet = fleet_factory(1)
    meter_id = only(fleet)
    trade = {"peer": "m-2", "kwh": 1.5, "price": 0.2}
    ack = twin.wait_ack(meter_id, twin.command(meter_id, "trade", trade))
    assert ack.status == "applied"
    assert ack.reported["last_trade"] == trade
    ack = twin.wait_ack(meter_id, twin.command(meter_id, "dr", {"event": "e1", "shed_w": 500}))
    assert ack.reported["last_dr"] == {"event": "e1", "shed_w": 500}
    assert fleet.meter(meter_id).settings["last_trade"] == trade


def test_expired_duplicate_and_malformed_commands(twin: Twin, fleet_factory) -> None:
    fleet = fleet_factory(1)
    meter_id = only(fleet)
    ack = twin.wait_ack(meter_id, twin.command(meter_id, "relay", {"state": "open"}, expires_in_s=-1))
    assert (ack.status, ack.reason) == ("rejected", "expired")
    assert fleet.meter(meter_id).settings["relay"] == "closed"

    cmd_id = twin.command(meter_id, "relay", {"state": "open"})
    first = twin.wait_ack(meter_id, cmd_id)
    # A redelivery (same id) gets the same answer and is not applied again.
    twin.command(meter_id, "relay", {"state": "closed"}, cmd_id=cmd_id)
    again = twin.wait_ack(meter_id, cmd_id, count=2)
    assert again == first
    snap = fleet.meter(meter_id)
    assert snap.settings["relay"] == "open"
    assert (snap.commands_applied, snap.commands_duplicate) == (1, 1)

    bad = twin.wait_ack(meter_id, twin.command(meter_id, "teleport", {}))
    assert bad.status == "rejected"
    assert "kind" in (bad.reason or "")
    twin.publish(topics.commands(meter_id), b"{not json")
    twin.publish(topics.commands(meter_id), {"kind": "relay"})
    wait_until(lambda: fleet.meter(meter_id).malformed == 3, 5, "malformed commands counted")


def test_ems_messages_pass_both_ways_untouched(twin: Twin, fleet_factory) -> None:
    received: list[tuple[str, bytes]] = []
    fleet = fleet_factory(1, on_ems=lambda m, p: received.append((m, p)))
    meter_id = only(fleet)
    raw = b'{"opaque": [1, 2, 3], "note": "not for the meter"}'
    twin.publish(topics.ems_down(meter_id), raw)
    wait_until(lambda: fleet.ems_inbox(meter_id) == [raw], 5, "EMS inbox")
    assert received == [(meter_id, raw)]

    ems_id = fleet.send_ems(meter_id, {"flex_kw": 2.5})
    seen = wait_until(lambda: twin.on(topics.ems_up(meter_id)), 5, "EMS up")
    msg = messages.EmsMessage.model_validate_json(seen[0].payload)
    assert (msg.id, msg.payload) == (ems_id, {"flex_kw": 2.5})
    assert fleet.meter(meter_id).ems_sent == 1


def test_periodic_ems_messages(twin: Twin, fleet_factory) -> None:
    fleet = fleet_factory(1, ems_interval_s=0.2)
    meter_id = only(fleet)
    seen = wait_until(lambda: len(twin.on(topics.ems_up(meter_id))) >= 2 and twin.on(topics.ems_up(meter_id)), 5)
    assert messages.EmsMessage.model_validate_json(seen[0].payload).payload["type"] == "telemetry"


def test_control_ping_and_rebind(twin: Twin, fleet_factory) -> None:
    fleet = fleet_factory(1)
    meter_id = only(fleet)
    correlation, _ = twin.request(meter_id, topics.control(meter_id), {"action": "ping"})
    assert json.loads(twin.response(meter_id, correlation).payload)["action"] == "pong"
    twin.publish(topics.control(meter_id), {"action": "rebind", "params": {"version": "v2", "id": "rb-1"}})
    ack = twin.wait_ack(meter_id, "rb-1")
    assert ack.status == "applied"
    assert ack.reported["binding"] == "v2"
    assert fleet.meter(meter_id).binding == "v2"


def test_link_latency_is_added_both_ways(twin: Twin, fleet_factory) -> None:
    fleet = fleet_factory(2, link=(0.3, 0.4))
    slow, fast = list(fleet.meter_ids)
    fleet.set_link(fast, "lan")
    rtts = {}
    for meter_id in (slow, fast):
        correlation, sent = twin.request(meter_id, topics.read_requests(meter_id), {})
        rtts[meter_id] = twin.response(meter_id, correlation).at - sent
    assert 0.6 <= rtts[slow] < 1.2, rtts
    assert rtts[fast] < 0.3, rtts
    assert fleet.meter(slow).link == "custom"


def test_offline_meter_buffers_readings_and_gets_queued_commands(twin: Twin, fleet_factory) -> None:
    fleet = fleet_factory(1, reporting_interval_s=1)
    meter_id = only(fleet)
    wait_until(lambda: twin.readings(meter_id), 5, "a first reading")
    fleet.go_offline(meter_id)
    wait_until(lambda: twin.on(topics.status(meter_id))[-1].payload == b"offline", 5, "will published")
    sent_before = len(twin.readings(meter_id))
    cmd_id = twin.command(meter_id, "relay", {"state": "open"})
    wait_until(lambda: fleet.meter(meter_id).buffered >= 3, 10, "3 readings buffered")
    assert not [a for a in twin.acks(meter_id) if a.id == cmd_id]
    offline_seq = fleet.meter(meter_id).seq
    went_online = time.time()
    fleet.go_online(meter_id)

    ack = twin.wait_ack(meter_id, cmd_id)
    assert ack.status == "applied"
    wait_until(lambda: len(twin.readings(meter_id)) > offline_seq, 10, "buffered readings delivered")
    rs = twin.readings(meter_id)
    assert [r.seq for r in rs] == list(range(len(rs)))  # all of them, in order, none reused
    buffered = rs[sent_before : offline_seq + 1]
    # Original timestamps (ts is rounded to the millisecond).
    assert all(r.ts <= went_online + 0.001 for r in buffered), (went_online, buffered)
    assert twin.on(topics.status(meter_id))[-1].payload == b"online"
    snap = fleet.meter(meter_id)
    assert snap.connects == 2
    assert snap.dropped == 0


def test_timed_offline_period_ends_by_itself(twin: Twin, fleet_factory) -> None:
    fleet = fleet_factory(1)
    meter_id = only(fleet)
    fleet.go_offline(meter_id, 0.3)
    fleet.report_now(meter_id)
    wait_until(lambda: fleet.meter(meter_id).connects == 2, 10, "reconnected")
    wait_until(lambda: twin.readings(meter_id), 5, "the reading taken offline")


def test_a_meter_cannot_use_another_meters_topics(mosquitto: Mosquitto, twin: Twin) -> None:
    creds = provision(mosquitto, 2)
    (a, pw_a), (b, _) = creds.items()
    intruder = Twin(mosquitto, a, pw_a)
    try:
        intruder.publish(topics.readings(b), b'{"forged": true}')
        intruder.publish(topics.readings(a), b'{"own": true}')
        wait_until(lambda: twin.on(topics.readings(a)), 5, "own-topic publish")
        assert twin.on(topics.readings(b)) == []  # same connection, in order: the forged one was dropped
        # Nor may it listen to another meter's commands.
        intruder.client.subscribe(topics.commands(b), qos=1)
        intruder.client.subscribe(topics.commands(a), qos=1)
        twin.publish(topics.commands(b), b"for b")
        twin.publish(topics.commands(a), b"for a")
        wait_until(lambda: intruder.on(topics.commands(a)), 5, "own commands")
        assert intruder.on(topics.commands(b)) == []
    finally:
        intruder.close()


def test_credentials_file_round_trip(tmp_path) -> None:
    path = tmp_path / "creds.json"
    accounts.save_credentials(path, {"m-1": "pw1", "m-2": "pw2"})
    assert accounts.load_credentials(path) == {"m-1": "pw1", "m-2": "pw2"}
    path.write_text('{"meters": [{"meter_id": "m-1"}]}')
    with pytest.raises(ValueError, match=r"meters\[0\]"):
        accounts.load_credentials(path)


def test_cli_runs_a_fleet_for_a_duration(mosquitto: Mosquitto, twin: Twin, tmp_path) -> None:
    creds = provision(mosquitto, 3)
    creds_path, summary = tmp_path / "creds.json", tmp_path / "summary.json"
    accounts.save_credentials(creds_path, creds)
    done = subprocess.run(
        [sys.executable, "-m", "meter_sim", "run", "--broker", f"{mosquitto.host}:{mosquitto.port}",
         "--credentials", str(creds_path), "--meters", "2", "--interval", "1", "--link", "wifi",
         "--duration", "2.5", "--progress-interval", "1", "--summary-json", str(summary)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "connected 2/2" in done.stdout
    final = json.loads(summary.read_text())
    assert final["meters"] == 2
    assert final["readings_sent"] >= 2
    first, _second, third = creds
    assert twin.readings(first)
    assert twin.on(topics.status(first))[-1].payload == b"offline"
    assert not twin.on(topics.status(third))


def test_cli_rejects_a_bad_credentials_file(tmp_path) -> None:
    bad = tmp_path / "creds.json"
    bad.write_text("[]")
    done = subprocess.run([sys.executable, "-m", "meter_sim", "run", "--credentials", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "no 'meters' list" in done.stderr


def test_wrong_password_retries_with_backoff(mosquitto: Mosquitto) -> None:
    creds = provision(mosquitto, 1)
    meter_id = next(iter(creds))
    fleet = FleetThread(mosquitto.host, mosquitto.port, {meter_id: "wrong"}, reporting_interval_s=1)
    fleet.start(wait_connected=False)
    try:
        assert fleet.wait_for(lambda: fleet.fleet.meter(meter_id).connect_failures >= 2, timeout_s=10)
        fleet.report_now(meter_id)
        snap = fleet.meter(meter_id)
        assert not snap.connected
        assert snap.buffered >= 1  # kept until it can be sent
    finally:
        fleet.stop()
