"""Issue 10, items 3 and 4: EMS routes cannot point the platform at another meter or inside the network.

A consumer of meter A may not route A's EMS messages onto B's EMS topic, and a webhook must
pass the outbound destination policy when it is set and again when a message is sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion

from metertwin.core import topics
from metertwin.core.auth import issue_token
from metertwin.core.settings import reset_settings
from metertwin.twin import keys
from storage.embedded import Mosquitto
from tests.conftest import TEST_SIGNING_KEY
from tests.invoke import call, load_handler
from tests.waiting import wait_until

registry = load_handler("registry")
forward = load_handler("forward")


def token(*scopes: str, meter: str | None = None) -> str:
    return issue_token("tester", set(scopes), meter=meter, key=TEST_SIGNING_KEY)


@pytest.fixture
def provisioned(env: dict[str, str], meter_id: str) -> str:
    status, body = call(registry, "POST", "/meters", body={"meter_id": meter_id}, token=token("admin"))
    assert status == 201, body
    return meter_id


@pytest.fixture
def hook() -> Iterator[tuple[str, list[bytes]]]:
    """A real loopback webhook receiver."""
    got: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    server.shutdown()
    server.server_close()


def send_up(meter_id: str, message_id: str) -> dict[str, Any]:
    status, body = call(forward, "POST", "/", token=token("service"), headers={"X-Topic": topics.ems_up(meter_id)},
                        body={"id": message_id, "payload": {"pv_w": 1}, "ts": time.time()})
    assert status == 200, body
    return dict(body["message"])


def test_mqtt_route_is_confined_to_the_meters_own_namespace(provisioned: str, monkeypatch: pytest.MonkeyPatch) -> None:
    meter = provisioned
    consumer = token("consumer", meter=meter)
    path = f"/meters/{meter}/ems/route"
    for target in ("ems/other-meter/inbox", f"ems/{meter}x/inbox", "ems", "home/ems", f"x/ems/{meter}/inbox"):
        status, body = call(forward, "PUT", path, token=consumer, body={"kind": "mqtt", "target": target})
        assert status == 400, target
        assert target in body["message"]
        assert "namespace" in body["message"]
    allowed: tuple[str | None, ...] = (f"ems/{meter}/inbox", f"ems/{meter}/heat-pump/commands", None)
    for maybe in allowed:
        status, body = call(forward, "PUT", path, token=consumer, body={"kind": "mqtt", "target": maybe})
        assert status == 200, (maybe, body)
    assert body["target"] == topics.ems_inbox(meter)
    # An operator-approved topic outside the namespace.
    monkeypatch.setenv("EMS_MQTT_APPROVED_TOPICS", "utility/ems-gateway/#, audit/ems")
    reset_settings()
    for target in ("utility/ems-gateway/in", "audit/ems"):
        assert call(forward, "PUT", path, token=consumer, body={"kind": "mqtt", "target": target})[0] == 200
    assert call(forward, "PUT", path, token=consumer, body={"kind": "mqtt", "target": "audit/ems/x"})[0] == 400


def test_route_stored_before_the_rule_is_refused_at_send_time(provisioned: str, redis_url: str) -> None:
    meter = provisioned
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.hset(keys.ems_route(meter), mapping={"kind": "mqtt", "target": "ems/victim/inbox"})
    entry = send_up(meter, "old-1")
    assert entry["status"] == "failed"
    assert "ems/victim/inbox" in entry["reason"]
    r.hset(keys.ems_route(meter), mapping={"kind": "webhook", "target": "http://169.254.169.254/latest/meta-data/"})
    entry = send_up(meter, "old-2")
    assert entry["status"] == "failed"
    assert "169.254.169.254" in entry["reason"]
    r.close()


def test_webhook_must_pass_the_destination_policy(provisioned: str, hook: tuple[str, list[bytes]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    meter = provisioned
    url, received = hook
    consumer = token("consumer", meter=meter)
    path = f"/meters/{meter}/ems/route"
    for target in (url, url.replace("127.0.0.1", "localhost"), "http://169.254.169.254/latest/meta-data/",
                   "http://10.0.0.5/hook", "http://[::1]/hook"):
        status, body = call(forward, "PUT", path, token=consumer, body={"kind": "webhook", "target": target})
        assert status == 400, target
        assert body["error"] == "destination_refused"
        assert target in body["message"]
    monkeypatch.setenv("DESTINATION_ALLOWED_CIDRS", "127.0.0.1/32")
    reset_settings()
    status, body = call(forward, "PUT", path, token=consumer, body={"kind": "webhook", "target": url})
    assert status == 200, body
    assert send_up(meter, "w-1")["status"] == "delivered"
    assert len(received) == 1
    # The allow-list is withdrawn: the stored route is refused when the next message is sent.
    monkeypatch.delenv("DESTINATION_ALLOWED_CIDRS")
    reset_settings()
    entry = send_up(meter, "w-2")
    assert entry["status"] == "failed"
    assert url in entry["reason"]
    assert len(received) == 1


def test_target_the_broker_refuses_is_refused_and_the_session_keeps_publishing(
        provisioned: str, redis_url: str, mosquitto: Mosquitto) -> None:
    """A topic with U+0000 (or another character Mosquitto refuses) made the broker disconnect the
    service session, which re-sent it at every reconnect: every later publish of the process failed."""
    meter = provisioned
    consumer = token("consumer", meter=meter)
    path = f"/meters/{meter}/ems/route"
    for bad in ("\x00", "a\x01b", "\x7f", "\x85", "\ufffe", "\ufdd0", "\U0010ffff"):
        target = f"ems/{meter}/{bad}"
        status, body = call(forward, "PUT", path, token=consumer, body={"kind": "mqtt", "target": target})
        assert status == 400, (target, body)
        assert "refuse" in body["message"]
    got: list[str] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.username_pw_set(mosquitto.service_user, mosquitto.service_password)
    sub.on_message = lambda _c, _u, msg: got.append(msg.topic)
    sub.on_connect = lambda c, *_a: c.subscribe(f"ems/{meter}/#", qos=1)
    sub.connect(mosquitto.host, mosquitto.port)
    sub.loop_start()
    try:
        wait_until(sub.is_connected, what="subscriber connected")
        # A route stored before the rule is refused when sent, and never reaches the broker.
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        r.hset(keys.ems_route(meter), mapping={"kind": "mqtt", "target": f"ems/{meter}/\x00"})
        entry = send_up(meter, "nul-1")
        assert entry["status"] == "failed"
        assert "U+0000" in entry["reason"]
        r.hset(keys.ems_route(meter), mapping={"kind": "mqtt", "target": topics.ems_inbox(meter)})
        r.close()
        assert send_up(meter, "ok-1")["status"] == "delivered"
        wait_until(lambda: topics.ems_inbox(meter) in got, what="message on the meter's EMS inbox")
    finally:
        sub.loop_stop()
        sub.disconnect()
