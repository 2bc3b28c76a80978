"""Threshold rules on the aggregates (real Redis): hysteresis, minimum duration, one open alert, actions."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from metertwin.core.settings import reset_settings
from metertwin.grid import evaluate
from metertwin.mdms import hot_store
from tests.aggregates.helpers import aligned, drain, place, publish, reading, register, reset_grid, token
from tests.invoke import call, load_handler
from tests.mdms.mdms_fixtures import mdms_env

__all__ = ["mdms_env"]


@pytest.fixture(autouse=True)
def grid_env(mdms_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    monkeypatch.setenv("DESTINATION_ALLOWED_CIDRS", "127.0.0.1/32")
    reset_settings()
    reset_grid()
    yield mdms_env
    reset_grid()


class Meter:
    """One meter on T1 whose latest power the test sets by publishing readings."""

    def __init__(self, meter_id: str) -> None:
        self.id, self.seq, self.t0 = meter_id, 0, aligned(20)
        register(meter_id)
        place(meter_id, 1)

    def power(self, watts: float) -> None:
        self.seq += 1
        status, body = publish(self.id, reading(self.seq, self.t0 + self.seq * 60, 100 + self.seq, power=watts))
        assert status == 200, body
        drain()


def _rule(**over: Any) -> dict[str, Any]:
    body = {"name": "T overload", "level": "transformer", "metric": "net_w", "condition": "above",
            "threshold": 1000, "hysteresis": 200, "for_s": 300, **over}
    status, out = call(load_handler("grid"), "POST", "/rules", body=body, token=token("utility"))
    assert status == 201, out
    return dict(out)


def _eval(at: float) -> dict[str, Any]:
    return evaluate.evaluate(hot_store.get_hot_redis(), now_s=at)


def _alerts(**q: str) -> list[dict[str, Any]]:
    status, out = call(load_handler("grid"), "GET", "/alerts", token=token("utility"), query=q or None)
    assert status == 200, out
    return list(out["alerts"])


def test_minimum_duration_hysteresis_and_one_open_alert_per_subject(meter_id: str) -> None:
    m = Meter(meter_id)
    rule = _rule()
    m.power(1500)
    assert _eval(0)["opened"] == 0
    assert _eval(299)["opened"] == 0  # breached, but not yet for 300 s
    assert _eval(300)["opened"] == 1
    for at in (360, 420, 480):
        assert _eval(at)["opened"] == 0  # never a second alert while one is open
    m.power(900)  # inside the hysteresis band: the alert stays open
    out = _eval(540)
    assert (out["opened"], out["resolved"]) == (0, 0)
    assert [a["status"] for a in _alerts()] == ["open"]
    m.power(700)  # below threshold - hysteresis: resolved
    assert _eval(600)["resolved"] == 1
    m.power(1500)
    _eval(1000)
    m.power(900)
    _eval(1200)  # back in the band before for_s: the pending breach starts over
    m.power(1500)
    _eval(1250)
    assert _eval(1500)["opened"] == 0
    assert _eval(1550)["opened"] == 1
    alerts = _alerts()
    assert [(a["status"], a["subject"], a["rule_id"]) for a in alerts] == [
        ("open", "T1", rule["id"]), ("resolved", "T1", rule["id"])]
    assert alerts[0]["breached_since"] == 1250
    assert alerts[1]["resolved_value"] == 700.0


def test_acknowledged_alert_stays_the_one_open_alert(meter_id: str) -> None:
    m = Meter(meter_id)
    rule = _rule(for_s=0)
    m.power(5000)
    _eval(0)
    [alert] = _alerts(status="open")
    status, acked = call(load_handler("grid"), "POST", f"/rules/{rule['id']}/alerts/{alert['id']}/ack",
                         token=token("utility", sub="operator-7"))
    assert status == 200, acked
    assert (acked["status"], acked["acknowledged_by"]) == ("acknowledged", "operator-7")
    _eval(60)
    assert [a["status"] for a in _alerts()] == ["acknowledged"]
    assert _alerts(status="active")[0]["id"] == alert["id"]
    status, missing = call(load_handler("grid"), "POST", f"/rules/{rule['id']}/alerts/nope/ack", token=token("utility"))
    assert status == 404, missing


def test_webhook_and_job_actions_are_recorded_on_the_alert(meter_id: str) -> None:
    got: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        m = Meter(meter_id)
        _rule(for_s=0, actions=[{"type": "webhook", "url": f"http://127.0.0.1:{server.server_port}/hook"},
                                {"type": "job", "job": {"target": {"filter": {"transformer": "T1"}}}}])
        m.power(5000)
        _eval(0)
        m.power(0)
        _eval(60)
    finally:
        server.shutdown()
    assert [g["event"] for g in got] == ["alert_opened", "alert_resolved"]
    assert got[0]["alert"]["subject"] == "T1"
    [alert] = _alerts()
    assert [(a["type"], a["event"], a["status"]) for a in alert["actions"]] == [
        ("webhook", "opened", "sent"), ("job", "opened", "pending"), ("webhook", "resolved", "sent")]


def test_voltage_band_and_stale_meters_rules(meter_id: str) -> None:
    m = Meter(meter_id)
    m.power(100)  # 231 V
    _rule(name="band", level="feeder", metric="voltage_max_v", condition="outside", threshold=None, low=207,
          high=230, hysteresis=1, for_s=0)
    _rule(name="stale", level="feeder", metric="stale", condition="above", threshold=0, hysteresis=0, for_s=0)
    out = _eval(m.t0 + m.seq * 60 + 10)
    assert out["opened"] == 1  # voltage above the band; nothing stale yet
    out = _eval(m.t0 + m.seq * 60 + 7200)  # two hours later the meter is stale
    assert out["opened"] == 1
    assert sorted(a["rule"] for a in _alerts(status="open")) == ["band", "stale"]


@pytest.mark.parametrize(("change", "field"), [
    ({"level": "house"}, "level"),
    ({"metric": "load"}, "metric"),
    ({"threshold": None}, "threshold"),
    ({"hysteresis": -1}, "hysteresis"),
    ({"for_s": "soon"}, "for_s"),
    ({"condition": "outside", "low": 240, "high": 200}, "hysteresis"),
    ({"condition": "outside", "low": 200}, "high"),
    ({"actions": [{"type": "webhook"}]}, "actions.0.url"),
    ({"actions": [{"type": "webhook", "url": "http://169.254.169.254/x"}]}, "actions.0.url"),
    ({"actions": [{"type": "mqtt", "topic": "meters/x/down/cmd"}]}, "actions.0.topic"),
    ({"actions": [{"type": "job"}]}, "actions.0.job"),
    ({"colour": "red"}, "colour"),
])
def test_bad_rules_are_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    body = {"name": "r", "level": "transformer", "metric": "net_w", "condition": "above", "threshold": 1, **change}
    status, out = call(load_handler("grid"), "POST", "/rules", body=body, token=token("utility"))
    assert status == 400, out
    assert out["details"]["field"] == field, out


def test_mqtt_action_publishes_the_alert(meter_id: str, env: dict[str, str]) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from metertwin.core.settings import get_settings
    from tests.waiting import wait_until

    got: list[dict[str, Any]] = []
    topic = f"grid/alerts/{meter_id}"
    s = get_settings()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.username_pw_set(s.mqtt_username, (Path(env["SECRETS_DIR"]) / "mqtt-password").read_text())
    sub.on_message = lambda _c, _u, msg: got.append(json.loads(msg.payload))
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.connect(s.mqtt_host, s.mqtt_port, keepalive=30)
    sub.loop_start()
    try:
        sub.subscribe(topic, qos=1)
        assert subscribed.wait(10)
        m = Meter(meter_id)
        _rule(for_s=0, actions=[{"type": "mqtt", "topic": topic}])
        m.power(5000)
        _eval(0)
        wait_until(lambda: bool(got), timeout_s=10)
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert got[0]["event"] == "alert_opened"
    assert got[0]["alert"]["subject"] == "T1"
    [alert] = _alerts()
    assert [(a["type"], a["status"]) for a in alert["actions"]] == [("mqtt", "sent")]
