"""End to end: meter readings over MQTT (QoS1) -> Mosquitto -> the fog gateway's MQTT connector ->
fog-mdms-ingest (topic annotation) -> Redis; then the query function through the gateway's HTTP API."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.server import GatewayProcess
from metertwin.mdms import keys
from storage.embedded import Mosquitto
from tests.mdms.mdms_fixtures import hot, mdms_env, reading, token

__all__ = ["mdms_env"]
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def fog_gateway(mdms_env: dict[str, str], tmp_path: Path) -> Iterator[GatewayProcess]:
    env = {k: v for k, v in mdms_env.items() if k != "SECRETS_DIR"}
    stack = {
        "version": "1.0",
        "provider": {"name": "openfaas", "gateway": "http://127.0.0.1:8080"},
        "functions": {
            "fog-mdms-ingest": {"lang": "python3-http", "handler": str(ROOT / "functions/mdms-ingest"),
                                "environment": env, "annotations": {"topic": "meters/+/up/reading"}},
            "fog-mdms-query": {"lang": "python3-http", "handler": str(ROOT / "functions/mdms-query"),
                               "environment": env},
        },
    }
    path = tmp_path / "stack.yml"
    path.write_text(json.dumps(stack))
    with GatewayProcess(path, "fog", secrets_dir=mdms_env["SECRETS_DIR"], env=env, start_timeout_s=60) as gw:
        yield gw


def _publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.username_pw_set(broker.service_user, broker.service_password)
    c.connect(broker.host, broker.port, keepalive=30)
    c.loop_start()
    try:
        for topic, body in messages:
            c.publish(topic, body, qos=1).wait_for_publish(timeout=10)
    finally:
        c.loop_stop()
        c.disconnect()


def _accepted(meter_id: str) -> int:
    return int(hot().hget(keys.mdms_counters(meter_id), "accepted") or 0)


def test_mqtt_readings_reach_the_hot_tier_once_and_are_queryable(
    fog_gateway: GatewayProcess, mosquitto: Mosquitto, meter_id: str
) -> None:
    topic = f"meters/{meter_id}/up/reading"
    t0 = time.time() - 3600
    # The connector subscribes asynchronously: probe until the first reading lands.
    deadline = time.monotonic() + 30
    while _accepted(meter_id) == 0:
        assert time.monotonic() < deadline, "the MQTT connector never delivered a reading"
        _publish(mosquitto, [(topic, json.dumps(reading(0, t0, 10.0)).encode())])
        poll = time.monotonic() + 1
        while _accepted(meter_id) == 0 and time.monotonic() < poll:
            time.sleep(0.02)
    readings = [json.dumps(reading(k, t0 + k * 60, 10.0 + k * 0.1)).encode() for k in range(1, 40)]
    # Every reading twice, as a QoS1 redelivery would: counted once.
    _publish(mosquitto, [(topic, body) for body in readings for _ in range(2)])
    _publish(mosquitto, [(topic, b"{broken")])
    deadline = time.monotonic() + 30
    while _accepted(meter_id) < 40 or hot().xlen(keys.MDMS_DEAD_LETTERS) < 1:
        assert time.monotonic() < deadline, (
            f"only {_accepted(meter_id)} of 40 readings arrived: {hot().hgetall(keys.mdms_counters(meter_id))}\n"
            f"{fog_gateway.log_text()[-3000:]}")
        time.sleep(0.05)
    counters = hot().hgetall(keys.mdms_counters(meter_id))
    assert counters["accepted"] == "40"
    assert int(counters["duplicates"]) >= 39  # the probe may have been redelivered as well
    resp = httpx.get(f"{fog_gateway.url}/function/fog-mdms-query/meters/{meter_id}/intervals",
                     params={"from": str(t0 - 1), "to": str(t0 + 3600)},
                     headers={"Authorization": f"Bearer {token('consumer', meter=meter_id)}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    rows = resp.json()["rows"]
    assert [r["seq"] for r in rows] == list(range(40))
    assert {(r["quality"], r["tier"]) for r in rows} == {("valid", "hot")}
    dl = httpx.get(f"{fog_gateway.url}/function/fog-mdms-ingest/dead-letters",
                   params={"meter_id": meter_id}, headers={"Authorization": f"Bearer {token('mdms')}"}, timeout=30)
    assert [d["rule"] for d in dl.json()["dead_letters"]] == ["json"]
