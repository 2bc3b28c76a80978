"""End to end with simulated meters: VTN -> bridge -> gateway (dr-event, ingest, write) -> meter_sim meters.

The meters (``meter_sim``, own MQTT credentials) report every second; the gateway's MQTT
connector feeds readings to ``edge-ingest`` (the twin's measurement) and command acks to
``edge-write``. The demo helper issues a SIMPLE level-3 event and measures the load the
meters actually shed against their baseline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dr_bridge.demo import run_demo
from gateway.server import GatewayProcess
from meter_sim import FleetThread
from metertwin.core.auth import issue_token
from metertwin.core.clients import get_redis
from metertwin.dr.store import DrStore
from metertwin.dr.views import telemetry
from storage.embedded import Mosquitto
from tests.conftest import TEST_SIGNING_KEY
from tests.dr.test_dr_event import dr_env
from tests.invoke import call, load_handler

__all__ = ["dr_env"]

ROOT = Path(__file__).resolve().parents[2]
registry = load_handler("registry")

STACK = """\
version: 1.0
provider: {{name: openfaas, gateway: "http://127.0.0.1:8080"}}
x-env: &env
  ZONE: edge
  REDIS_URL: "{redis_url}"
  MQTT_HOST: "{host}"
  MQTT_PORT: "{port}"
  MQTT_USERNAME: "{user}"
  DR_ACK_TIMEOUT_S: "3"
functions:
  edge-dr-event:
    lang: python3-http
    handler: {root}/functions/dr-event
    environment: *env
    secrets: [token-signing-key, mqtt-password]
  edge-ingest:
    lang: python3-http
    handler: {root}/functions/ingest
    environment: *env
    secrets: [token-signing-key, mqtt-password]
    annotations: {{topic: "meters/+/up/reading"}}
  edge-write:
    lang: python3-http
    handler: {root}/functions/write
    environment: *env
    secrets: [token-signing-key, mqtt-password]
    annotations: {{topic: "meters/+/up/ack"}}
"""


@pytest.fixture
def zone_gateway(dr_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    stack = tmp_path / "stack.yml"
    stack.write_text(STACK.format(root=ROOT, redis_url=dr_env["REDIS_URL"], host=dr_env["MQTT_HOST"],
                                  port=dr_env["MQTT_PORT"], user=dr_env["MQTT_USERNAME"]))
    (Path(dr_env["SECRETS_DIR"]) / "gateway-basic-auth-password").write_text("gw-pass")
    with GatewayProcess(stack, "edge", secrets_dir=dr_env["SECRETS_DIR"], args=["--log-level", "warning"],
                        log_path=tmp_path / "gateway.log") as gateway:
        yield gateway.url


async def test_simulated_meters_shed_load_during_the_event(zone_gateway: str, mosquitto: Mosquitto) -> None:
    admin = issue_token("tester", {"admin"}, key=TEST_SIGNING_KEY)
    meters = [f"dr-sim-{i}-{os.urandom(3).hex()}" for i in range(3)]
    credentials = {}
    for m in meters:
        status, body = call(registry, "POST", "/meters", body={"meter_id": m}, token=admin)
        assert status == 201, body
        credentials[m] = body["password"]
    fleet = FleetThread(mosquitto.host, mosquitto.port, credentials, reporting_interval_s=1.0, prosumer_share=0.0,
                        seed=7).start(timeout_s=30)
    try:
        store = DrStore(get_redis())
        deadline = time.monotonic() + 20
        while not all(telemetry(store, meters)[m] and telemetry(store, meters)[m]["power_w"] for m in meters):
            assert time.monotonic() < deadline, "no readings reached the twins"
            time.sleep(0.2)
        service = issue_token("dr-bridge", {"service"}, key=TEST_SIGNING_KEY)
        summary = await run_demo(zone_gateway, meters, token=service, level=3, lead_s=2.0, duration_s=6.0,
                                 timeout_s=30)
    finally:
        fleet.stop()
    print("DR demo summary:", {k: v for k, v in summary.items() if k != "per_meter"})
    assert summary["opt_in"] == 3
    assert summary["baseline_w"] > 0
    # level 3 sheds all flexible load (half the measured load by default): the meters clip to it
    assert 25 <= summary["reduction_pct"] <= 75, summary
    for m in meters:
        record = store.event(m, summary["event_id"])
        states = [h["state"] for h in record["exec"]["history"]]
        assert "applied" in states, states  # the meter acknowledged the shed
