"""End to end through the fog gateway: readings over MQTT (QoS 1, the gateway's async lane) into
fog-mdms-ingest, a place pushed to fog-grid, the drain, the feeder's aggregates and load as CSV,
and a rule that fires on the overloaded transformer."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.server import GatewayProcess
from storage.embedded import Mosquitto
from tests.aggregates.helpers import INTERVAL_S, aligned, reading, register, reset_grid, token
from tests.mdms.mdms_fixtures import mdms_env
from tests.mdms.test_mdms_e2e import _accepted, _publish

__all__ = ["mdms_env"]
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def fog_gateway(mdms_env: dict[str, str], tmp_path: Path) -> Iterator[GatewayProcess]:
    reset_grid()
    env = {k: v for k, v in mdms_env.items() if k != "SECRETS_DIR"}
    stack = {
        "version": "1.0",
        "provider": {"name": "openfaas", "gateway": "http://127.0.0.1:8080"},
        "functions": {
            "fog-mdms-ingest": {"lang": "python3-http", "handler": str(ROOT / "functions/mdms-ingest"),
                                "environment": env, "annotations": {"topic": "meters/+/up/reading"}},
            "fog-grid": {"lang": "python3-http", "handler": str(ROOT / "functions/grid"), "environment": env},
        },
    }
    path = tmp_path / "stack.yml"
    path.write_text(json.dumps(stack))
    with GatewayProcess(path, "fog", secrets_dir=mdms_env["SECRETS_DIR"], env=env, start_timeout_s=60) as gw:
        yield gw


def test_readings_over_mqtt_aggregate_up_the_tree_and_fire_a_rule(
    fog_gateway: GatewayProcess, mosquitto: Mosquitto, meter_id: str
) -> None:
    base = f"{fog_gateway.url}/function/fog-grid"

    def call(method: str, path: str, tok: str, **kw: object) -> httpx.Response:
        return httpx.request(method, base + path, headers={"Authorization": f"Bearer {tok}"}, timeout=30,
                             **kw)  # type: ignore[arg-type]

    register(meter_id)
    resp = call("PUT", f"/meters/{meter_id}/place", token("utility"),
                json={"transformer": "T-e2e", "feeder": "F-e2e", "substation": "S1", "region": "R1", "v": 1})
    assert resp.status_code == 200, resp.text
    topic = f"meters/{meter_id}/up/reading"
    t0 = aligned(6)
    deadline = time.monotonic() + 30
    while _accepted(meter_id) == 0:  # the connector subscribes asynchronously
        assert time.monotonic() < deadline, fog_gateway.log_text()[-3000:]
        _publish(mosquitto, [(topic, json.dumps(reading(0, t0, 10.0, power=9000)).encode())])
        poll = time.monotonic() + 1
        while _accepted(meter_id) == 0 and time.monotonic() < poll:
            time.sleep(0.02)
    bodies = [json.dumps(reading(k, t0 + k * INTERVAL_S, 10.0 + k * 0.5, power=9000)).encode() for k in range(1, 5)]
    _publish(mosquitto, [(topic, b) for b in bodies for _ in range(2)])  # each twice (QoS 1 redelivery)
    deadline = time.monotonic() + 30
    while _accepted(meter_id) < 5:
        assert time.monotonic() < deadline, fog_gateway.log_text()[-3000:]
        time.sleep(0.05)
    assert call("POST", "/drain", token("utility")).status_code == 200
    feeder = call("GET", "/feeders/F-e2e", token("mdms")).json()
    assert (feeder["import_w"], feeder["meters"]) == (9000.0, 1)
    csv_resp = httpx.get(base + "/feeders/F-e2e/load", params={"from": str(t0), "to": str(t0 + 5 * INTERVAL_S)},
                         headers={"Authorization": f"Bearer {token('utility')}", "Accept": "text/csv"}, timeout=30)
    assert csv_resp.headers["content-type"].startswith("text/csv"), csv_resp.text
    lines = csv_resp.text.strip().splitlines()
    assert lines[0].startswith("start,end,import_kwh")
    assert [float(line.split(",")[2]) for line in lines[1:]] == [0.5] * 4  # duplicates counted once
    rule = call("POST", "/rules", token("utility"), json={
        "name": "overload", "level": "transformer", "metric": "net_w", "condition": "above",
        "thresholds": {"T-e2e": 5000}, "hysteresis": 500, "for_s": 0})
    assert rule.status_code == 201, rule.text
    assert call("POST", "/rules/evaluate", token("utility")).json()["opened"] == 1
    assert call("POST", "/rules/evaluate", token("utility")).json()["opened"] == 0
    alerts = call("GET", "/alerts", token("mdms"), params={"status": "open"}).json()["alerts"]
    assert [(a["subject"], a["threshold"]) for a in alerts] == [("T-e2e", 5000.0)]
