"""`python -m gateway.connect` drives a gateway that has no connectors (as OpenFaaS CE's would be replaced)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.server import GatewayProcess
from metertwin.core import topics
from metertwin.core.auth import issue_token
from storage.embedded import Mosquitto
from tests.conftest import TEST_SIGNING_KEY
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def publish(broker: Mosquitto, topic: str, payload: dict[str, Any]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(broker.service_user, broker.service_password)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, json.dumps(payload), qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def test_connector_process_invokes_functions_through_an_http_only_gateway(
    env: dict[str, str], mosquitto: Mosquitto, meter_id: str, tmp_path: Path
) -> None:
    zone_env = {"EDGE_REDIS_URL": env["REDIS_URL"], "EDGE_MQTT_HOST": env["MQTT_HOST"],
                "EDGE_MQTT_PORT": env["MQTT_PORT"]}
    admin = {"Authorization": f"Bearer {issue_token('t', {'admin'}, key=TEST_SIGNING_KEY)}"}
    # --no-background: HTTP only, like an OpenFaaS gateway without metertwin's connectors.
    with GatewayProcess(ROOT / "stack.yml", "edge", secrets_dir=env["SECRETS_DIR"], env=zone_env,
                        args=["--no-background", "--log-level", "warning"],
                        log_path=tmp_path / "gateway.log") as gateway:
        resp = httpx.post(f"{gateway.url}/function/edge-registry/meters", json={"meter_id": meter_id},
                          headers=admin, timeout=10)
        assert resp.status_code == 201, resp.text

        def last_seq() -> int:
            twin = httpx.get(f"{gateway.url}/function/edge-read/meters/{meter_id}/twin", headers=admin, timeout=10)
            return int(twin.json()["metadata"]["last_seq"])

        log = (tmp_path / "connect.log").open("wb")
        connect = subprocess.Popen(
            [sys.executable, "-m", "gateway.connect", "--stack", str(ROOT / "stack.yml"), "--zone", "edge",
             "--gateway", gateway.url, "--secrets-dir", env["SECRETS_DIR"], "--instance", f"t-{meter_id}"],
            cwd=ROOT, env={**os.environ, **zone_env}, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            reading = {"seq": 1, "ts": time.time(), "import_kwh": 3.5, "export_kwh": 0.0, "power_w": 420.0,
                       "voltage_v": 230.0}

            def delivered() -> bool:
                # QoS1 to a shared subscription: republish until the connector's session exists.
                publish(mosquitto, topics.readings(meter_id), reading)
                return last_seq() == 1

            wait_until(delivered, 30, "the reading to reach the twin through gateway.connect")
        finally:
            connect.terminate()
            connect.wait(15)
            log.close()
        assert connect.returncode == 0, (tmp_path / "connect.log").read_text()[-2000:]
