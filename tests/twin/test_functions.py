"""Twin functions called through the python3-http contract, against real Redis and Mosquitto."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from metertwin.core import topics
from metertwin.core.auth import issue_token
from storage.embedded import Mosquitto
from tests.conftest import TEST_SIGNING_KEY
from tests.invoke import call, load_handler
from tests.waiting import wait_until as wait_for

registry = load_handler("registry")
read = load_handler("read")
write = load_handler("write")
forward = load_handler("forward")
ingest = load_handler("ingest")


def token(*scopes: str, meter: str | None = None) -> str:
    return issue_token("tester", set(scopes), meter=meter, key=TEST_SIGNING_KEY)


ADMIN = "admin"




@pytest.fixture
def provisioned(env: dict[str, str], meter_id: str) -> dict[str, Any]:
    status, body = call(registry, "POST", "/meters", body={"meter_id": meter_id}, token=token(ADMIN))
    assert status == 201, body
    return body


class Observer:
    """A plain MQTT client with the service account, to see what reaches a meter's topics."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(broker.service_user, broker.service_password)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self.messages.append(msg)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def observe(mosquitto: Mosquitto) -> Iterator[Callable[[str], Observer]]:
    made: list[Observer] = []

    def make(topic: str) -> Observer:
        made.append(Observer(mosquitto, topic))
        return made[-1]

    yield make
    for obs in made:
        obs.close()


def reading(seq: int, ts: float | None = None, kwh: float = 10.0) -> dict[str, Any]:
    return {"seq": seq, "ts": ts or time.time(), "import_kwh": kwh, "export_kwh": 0.0, "power_w": 800.0,
            "voltage_v": 230.0}


def ingest_reading(meter_id: str, body: dict[str, Any] | bytes) -> tuple[int, Any]:
    return call(ingest, "POST", "/", body=body, token=token("service"),
                headers={"X-Topic": topics.readings(meter_id)})


# --- registry ---------------------------------------------------------------------------
def test_provision_returns_credentials_once_and_conflicts_after(provisioned: dict[str, Any], meter_id: str) -> None:
    assert provisioned["meter_id"] == meter_id
    assert provisioned["mqtt"]["username"] == meter_id
    assert len(provisioned["password"]) >= 16
    status, body = call(registry, "POST", "/meters", body={"meter_id": meter_id}, token=token(ADMIN))
    assert status == 409
    assert meter_id in body["message"]
    status, body = call(registry, "GET", f"/meters/{meter_id}", token=token("utility"))
    assert status == 200
    assert "password" not in body


def test_meter_credentials_confine_meter_to_its_topics(provisioned: dict[str, Any], mosquitto: Mosquitto,
                                                       observe: Callable[[str], Observer]) -> None:
    meter_id = provisioned["meter_id"]
    obs = observe("meters/#")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=meter_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(meter_id, provisioned["password"])
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    try:
        client.publish("meters/someone-else/up/reading", b"{}", qos=1).wait_for_publish(5)
        client.publish(topics.readings(meter_id), b"{}", qos=1).wait_for_publish(5)
        wait_for(lambda: any(m.topic == topics.readings(meter_id) for m in obs.messages))
        assert not any(m.topic.startswith("meters/someone-else") for m in obs.messages)
    finally:
        client.disconnect()
        client.loop_stop()


def test_bulk_provision_and_delete(env: dict[str, str]) -> None:
    ids = [f"bulk-{i}-{time.monotonic_ns()}" for i in range(25)]
    status, body = call(registry, "POST", "/meters/bulk", body={"meters": [{"meter_id": m} for m in ids]},
                        token=token(ADMIN))
    assert status == 201
    assert body["created"] == 25
    status, body = call(registry, "POST", "/meters/bulk-delete", body={"meter_ids": [*ids, "ghost"]},
                        token=token(ADMIN))
    assert status == 200
    assert sorted(body["removed"]) == sorted(ids)
    assert body["not_found"] == ["ghost"]


def test_registry_rejects_bad_input(env: dict[str, str]) -> None:
    admin = token(ADMIN)
    status, body = call(registry, "POST", "/meters", body=b"{not json", token=admin)
    assert (status, body["error"]) == (400, "invalid_input")
    status, body = call(registry, "POST", "/meters", body={"meter_id": "bad/id"}, token=admin)
    assert status == 400
    assert "meter_id" in body["message"]
    status, body = call(registry, "POST", "/meters", body={"meter_id": "ok", "profile": {"pv_kwp": "lots"}},
                        token=admin)
    assert status == 400
    assert "profile.pv_kwp" in body["message"]
    status, body = call(registry, "POST", "/meters/bulk", body={"meters": [{"meter_id": "a"}, {"meter_id": "a"}]},
                        token=admin)
    assert status == 400
    assert "'a' appears twice" in body["message"]
    status, body = call(registry, "POST", "/meters", body=b"x" * 2_000_000, token=admin)
    assert (status, body["error"]) == (413, "payload_too_large")


# --- access control ---------------------------------------------------------------------
def test_missing_and_bad_tokens_get_401(provisioned: dict[str, Any], meter_id: str) -> None:
    status, body = call(read, "GET", f"/meters/{meter_id}/reading")
    assert (status, body["error"]) == (401, "unauthorized")
    status, body = call(read, "GET", f"/meters/{meter_id}/reading", headers={"Authorization": "Bearer nonsense"})
    assert status == 401
    forged = issue_token("x", {"admin"}, key="another-signing-key-of-enough-length-32")
    status, _ = call(read, "GET", f"/meters/{meter_id}/reading", token=forged)
    assert status == 401
    expired = issue_token("x", {"admin"}, ttl_s=-10, key=TEST_SIGNING_KEY)
    status, body = call(read, "GET", f"/meters/{meter_id}/reading", token=expired)
    assert status == 401
    assert "expired" in body["message"]


def test_consumer_reaches_only_its_own_meter(provisioned: dict[str, Any], meter_id: str) -> None:
    ingest_reading(meter_id, reading(1))
    mine = token("consumer", meter=meter_id)
    status, _ = call(read, "GET", f"/meters/{meter_id}/reading", token=mine)
    assert status == 200
    status, body = call(read, "GET", "/meters/other-meter/reading", token=mine)
    assert status == 403
    assert "other-meter" in body["message"]
    status, _ = call(write, "POST", f"/meters/{meter_id}/commands", token=mine,
                     body={"kind": "relay", "params": {"state": "open"}})
    assert status == 403
    status, _ = call(registry, "POST", "/meters", body={"meter_id": "x1"}, token=token("billing"))
    assert status == 403


# --- ingest + read from cache ----------------------------------------------------------
def test_ingest_then_cached_read(provisioned: dict[str, Any], meter_id: str) -> None:
    status, body = ingest_reading(meter_id, reading(1, kwh=12.5))
    assert (status, body["result"]) == (200, "applied")
    status, body = ingest_reading(meter_id, reading(1, kwh=12.5))
    assert (status, body["result"]) == (200, "duplicate")
    status, body = call(read, "GET", f"/meters/{meter_id}/reading", token=token("mdms"), query={"max_age": "60"})
    assert status == 200
    assert body["source"] == "cache"
    assert body["reading"]["import_kwh"] == 12.5
    assert body["age_s"] < 60
    assert body["elapsed_ms"] >= 0


def test_ingest_rejects_bad_messages(provisioned: dict[str, Any], meter_id: str) -> None:
    status, body = ingest_reading(meter_id, b"\xff\xfe")
    assert status == 400
    status, body = ingest_reading(meter_id, {**reading(1), "power_w": "high"})
    assert status == 400
    assert "power_w" in body["message"]
    status, body = ingest_reading(meter_id, {**reading(1), "import_kwh": -1})
    assert status == 400
    assert "import_kwh" in body["message"]
    status, body = ingest_reading("ghost-meter", reading(1))
    assert (status, body["error"]) == (404, "unknown_meter")
    status, body = call(ingest, "POST", "/", body=reading(1), token=token("service"), headers={"X-Topic": "x/y"})
    assert status == 400
    status, _ = call(ingest, "POST", "/", body=reading(1), token=token("utility"),
                     headers={"X-Topic": topics.readings(meter_id)})
    assert status == 403


def test_read_times_out_with_stale_value(provisioned: dict[str, Any], meter_id: str) -> None:
    ingest_reading(meter_id, reading(1, ts=time.time() - 3600, kwh=3.0))
    status, body = call(read, "GET", f"/meters/{meter_id}/reading", token=token("utility"),
                        query={"max_age": "60", "timeout": "0.3"})
    assert status == 504
    assert body["error"] == "meter_timeout"
    assert meter_id in body["message"]
    assert body["details"] == {"meter_id": meter_id, "timeout_s": 0.3}
    assert body["stale"]["stale"] is True
    assert body["stale"]["reading"]["import_kwh"] == 3.0


def test_read_rejects_bad_query(provisioned: dict[str, Any], meter_id: str) -> None:
    status, body = call(read, "GET", f"/meters/{meter_id}/reading", token=token("utility"),
                        query={"max_age": "soon"})
    assert status == 400
    assert "max_age='soon'" in body["message"]
    status, body = call(read, "GET", f"/meters/{meter_id}/reading", token=token("utility"), query={"timeout": "99"})
    assert status == 400
    status, body = call(read, "GET", "/meters/nobody/reading", token=token("utility"))
    assert (status, body["error"]) == (404, "unknown_meter")
    status, body = call(read, "DELETE", f"/meters/{meter_id}/reading", token=token("utility"))
    assert status == 405


# --- write ------------------------------------------------------------------------------
def test_command_is_delivered_to_the_meter_topic(provisioned: dict[str, Any], meter_id: str,
                                                 observe: Callable[[str], Observer]) -> None:
    obs = observe(topics.commands(meter_id))
    status, body = call(write, "POST", f"/meters/{meter_id}/commands", token=token("utility"),
                        body={"kind": "relay", "params": {"state": "open"}, "expiry_s": 60})
    assert status == 202
    command = body["command"]
    assert command["status"] == "delivered"
    msg = wait_for(lambda: obs.messages)[0]
    sent = json.loads(msg.payload)
    assert sent["id"] == command["id"]
    assert sent["params"] == {"state": "open"}
    assert 0 < msg.properties.MessageExpiryInterval <= 60


def test_ack_moves_command_to_acknowledged_and_updates_reported(provisioned: dict[str, Any], meter_id: str) -> None:
    _, body = call(write, "PATCH", f"/meters/{meter_id}/desired", token=token("utility"),
                   body={"relay": "open"}, headers={"If-Match": '"1"'})
    command_id = body["command"]["id"]
    _, twin = call(read, "GET", f"/meters/{meter_id}/twin", token=token("utility"))
    assert twin["state"]["delta"] == {"relay": "open"}
    ack = {"id": command_id, "status": "applied", "reported": {"relay": "open"}, "ts": time.time()}
    status, body = call(write, "POST", "/", body=ack, token=token("service"),
                        headers={"X-Topic": topics.command_acks(meter_id)})
    assert (status, body["status"]) == (200, "acknowledged")
    _, got = call(write, "GET", f"/meters/{meter_id}/commands/{command_id}", token=token("utility"))
    assert got["command"]["status"] == "acknowledged"
    _, twin = call(read, "GET", f"/meters/{meter_id}/twin", token=token("utility"))
    assert twin["state"]["delta"] == {}
    assert twin["state"]["reported"]["relay"] == "open"


def test_rejected_ack(provisioned: dict[str, Any], meter_id: str) -> None:
    _, body = call(write, "POST", f"/meters/{meter_id}/commands", token=token("utility"),
                   body={"kind": "load_limit", "params": {"watts": 2000}})
    command_id = body["command"]["id"]
    ack = {"id": command_id, "status": "rejected", "reason": "limit below base load", "ts": time.time()}
    call(write, "POST", "/", body=ack, token=token("service"), headers={"X-Topic": topics.command_acks(meter_id)})
    _, got = call(write, "GET", f"/meters/{meter_id}/commands/{command_id}", token=token("utility"))
    assert got["command"]["status"] == "rejected"
    assert got["command"]["reason"] == "limit below base load"


def test_unanswered_command_expires(provisioned: dict[str, Any], meter_id: str) -> None:
    _, body = call(write, "POST", f"/meters/{meter_id}/commands", token=token("utility"),
                   body={"kind": "reporting_interval", "params": {"seconds": 60}, "expiry_s": 1})
    command_id = body["command"]["id"]

    def status() -> str:
        _, got = call(write, "GET", f"/meters/{meter_id}/commands/{command_id}", token=token("utility"))
        return str(got["command"]["status"])

    wait_for(lambda: status() == "expired", timeout_s=5)
    status_code, swept = call(write, "POST", "/", token=token("service"), headers={"X-Connector": "cron-connector"})
    assert status_code == 200
    assert swept["expired"] == 0  # already expired on read; the sweep finds nothing left


def test_sweeper_expires_commands_nobody_looked_at(provisioned: dict[str, Any], meter_id: str) -> None:
    call(write, "POST", f"/meters/{meter_id}/commands", token=token("utility"),
         body={"kind": "relay", "params": {"state": "closed"}, "expiry_s": 1})
    time.sleep(1.1)  # the expiry itself is what is under test
    _, swept = call(write, "POST", "/", token=token("service"), headers={"X-Connector": "cron-connector"})
    assert swept["expired"] == 1
    _, got = call(write, "GET", f"/meters/{meter_id}/commands", token=token("utility"))
    assert [c["status"] for c in got["commands"]] == ["expired"]


def test_if_match_conflict_is_412(provisioned: dict[str, Any], meter_id: str) -> None:
    status, body = call(write, "PATCH", f"/meters/{meter_id}/desired", token=token("utility"),
                        body={"load_limit_w": 3000}, headers={"If-Match": '"1"'})
    assert status == 202
    status, body = call(write, "PATCH", f"/meters/{meter_id}/desired", token=token("utility"),
                        body={"load_limit_w": 2000}, headers={"If-Match": '"1"'})
    assert status == 412
    assert body["error"] == "version_mismatch"
    assert body["details"]["current_version"] == 2


def test_write_rejects_bad_input(provisioned: dict[str, Any], meter_id: str) -> None:
    utility = token("utility")
    cases: list[tuple[Any, str]] = [
        ({"kind": "teleport", "params": {}}, "'teleport' is unknown"),
        ({"kind": "relay", "params": {"state": "ajar"}}, "state"),
        ({"kind": "reporting_interval", "params": {"seconds": 0}}, "seconds"),
        ({"kind": "relay", "params": {"state": "open"}, "expiry_s": 10**9}, "expiry_s"),
        ({"kind": "relay", "params": ["open"]}, "params"),
        ({"kind": "desired", "params": {"fields": {"colour": "red"}}}, "colour"),
    ]
    for body, needle in cases:
        status, out = call(write, "POST", f"/meters/{meter_id}/commands", token=utility, body=body)
        assert status == 400, (body, out)
        assert needle in out["message"], (needle, out)
    status, out = call(write, "PATCH", f"/meters/{meter_id}/desired", token=utility, body={"relay": "open"},
                       headers={"If-Match": "abc"})
    assert status == 400
    assert "'abc'" in out["message"]
    status, out = call(write, "POST", "/meters/ghost/commands", token=utility,
                       body={"kind": "relay", "params": {"state": "open"}})
    assert status == 404
    status, out = call(write, "GET", f"/meters/{meter_id}/commands/nope", token=utility)
    assert status == 404


# --- forward ----------------------------------------------------------------------------
def test_ems_to_meter_is_published_untouched(provisioned: dict[str, Any], meter_id: str,
                                             observe: Callable[[str], Observer]) -> None:
    obs = observe(topics.ems_down(meter_id))
    ems = token("ems", meter=meter_id)
    status, body = call(forward, "POST", f"/meters/{meter_id}/ems/messages", token=ems,
                        body={"id": "e1", "payload": {"heat_pump": "boost", "n": [1, 2]}})
    assert status == 202
    assert body["message"]["status"] == "delivered"
    sent = json.loads(wait_for(lambda: obs.messages)[0].payload)
    assert sent["payload"] == {"heat_pump": "boost", "n": [1, 2]}


def test_meter_to_ems_over_mqtt_route(provisioned: dict[str, Any], meter_id: str,
                                      observe: Callable[[str], Observer]) -> None:
    ems = token("ems", meter=meter_id)
    status, route = call(forward, "PUT", f"/meters/{meter_id}/ems/route", token=ems, body={"kind": "mqtt"})
    assert status == 200
    obs = observe(route["target"])
    message = {"id": "u1", "payload": {"pv_w": 1200}, "ts": time.time()}
    status, body = call(forward, "POST", "/", body=message, token=token("service"),
                        headers={"X-Topic": topics.ems_up(meter_id)})
    assert (status, body["message"]["status"]) == (200, "delivered")
    assert json.loads(wait_for(lambda: obs.messages)[0].payload)["payload"] == {"pv_w": 1200}
    _, log = call(forward, "GET", f"/meters/{meter_id}/ems/messages", token=ems)
    assert [(m["direction"], m["id"], m["status"]) for m in log["messages"]] == [("meter->ems", "u1", "delivered")]


def test_meter_to_ems_without_route_is_recorded_undeliverable(provisioned: dict[str, Any], meter_id: str) -> None:
    message = {"id": "u2", "payload": {}, "ts": time.time()}
    status, body = call(forward, "POST", "/", body=message, token=token("service"),
                        headers={"X-Topic": topics.ems_up(meter_id)})
    assert status == 200
    assert body["message"]["status"] == "undeliverable"


def test_failed_webhook_is_recorded(provisioned: dict[str, Any], meter_id: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from metertwin.core.settings import reset_settings
    from storage.embedded import free_port

    monkeypatch.setenv("DESTINATION_ALLOWED_CIDRS", "127.0.0.1/32")  # loopback webhooks are refused by default
    reset_settings()
    ems = token("ems", meter=meter_id)
    url = f"http://127.0.0.1:{free_port()}/hook"
    call(forward, "PUT", f"/meters/{meter_id}/ems/route", token=ems, body={"kind": "webhook", "target": url})
    message = {"id": "u3", "payload": {"x": 1}, "ts": time.time()}
    _, body = call(forward, "POST", "/", body=message, token=token("service"),
                   headers={"X-Topic": topics.ems_up(meter_id)})
    assert body["message"]["status"] == "failed"
    assert url in body["message"]["reason"]


def test_forward_rejects_bad_routes(provisioned: dict[str, Any], meter_id: str) -> None:
    ems = token("ems", meter=meter_id)
    for route, needle in [({"kind": "mqtt", "target": "meters/other/down/cmd"}, "outside meters/"),
                          ({"kind": "mqtt", "target": "ems/#"}, "plain topic"),
                          ({"kind": "webhook", "target": "ftp://x"}, "http(s)"),
                          ({"kind": "pigeon"}, "kind")]:
        status, body = call(forward, "PUT", f"/meters/{meter_id}/ems/route", token=ems, body=route)
        assert status == 400, route
        assert needle in body["message"]
    status, body = call(forward, "POST", f"/meters/{meter_id}/ems/messages", token=ems,
                        body={"payload": {"blob": "x" * 70_000}})
    assert status == 413


# --- the read function's async lane (the local gateway's event-loop path) -------------
async def read_async(meter_id: str, token_: str | None, query: dict[str, str]) -> Any:
    from starlette.datastructures import Headers, QueryParams

    from tests.invoke import Context, Event

    headers = Headers({"Authorization": f"Bearer {token_}"} if token_ else {})
    return await read.handle_async(Event(b"", headers, "GET", QueryParams(query), f"/meters/{meter_id}/reading"),
                                   Context())


async def test_async_lane_answers_cache_hits_exactly_like_handle(provisioned: dict[str, Any], meter_id: str) -> None:
    ingest_reading(meter_id, reading(1, kwh=7.0))
    utility = token("utility")
    answer = await read_async(meter_id, utility, {"max_age": "60"})
    status, body = call(read, "GET", f"/meters/{meter_id}/reading", token=utility, query={"max_age": "60"})
    assert answer["statusCode"] == status == 200
    assert {k: v for k, v in answer["body"].items() if k not in ("age_s", "elapsed_ms")} == \
        {k: v for k, v in body.items() if k not in ("age_s", "elapsed_ms")}


async def test_async_lane_leaves_meter_requests_and_other_routes_to_handle(
    provisioned: dict[str, Any], meter_id: str
) -> None:
    utility = token("utility")
    assert await read_async(meter_id, utility, {"max_age": "60"}) is NotImplemented  # nothing cached yet
    ingest_reading(meter_id, reading(1, ts=time.time() - 120))
    assert await read_async(meter_id, utility, {"max_age": "60"}) is NotImplemented  # too old
    assert await read_async(meter_id, utility, {"live": "true"}) is NotImplemented


async def test_async_lane_applies_the_same_auth_and_validation(provisioned: dict[str, Any], meter_id: str) -> None:
    assert (await read_async(meter_id, None, {}))["statusCode"] == 401
    other = token("consumer", meter="someone-else")
    assert (await read_async(meter_id, other, {}))["statusCode"] == 403
    assert (await read_async(meter_id, token("utility"), {"max_age": "x"}))["statusCode"] == 400
    assert (await read_async("ghost", token("utility"), {}))["statusCode"] == 404
