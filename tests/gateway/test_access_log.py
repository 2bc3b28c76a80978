"""Access log: one structured line per call from the real gateway process (repo stack, real Redis and Mosquitto)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from gateway.server import GatewayProcess
from metertwin.core.auth import issue_token
from storage.embedded import Mosquitto
from tests.conftest import TEST_SIGNING_KEY
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _zone_env(env: dict[str, str], mosquitto: Mosquitto) -> dict[str, str]:
    return {"EDGE_REDIS_URL": env["REDIS_URL"], "EDGE_MQTT_HOST": mosquitto.host,
            "EDGE_MQTT_PORT": str(mosquitto.port), "EDGE_GATEWAY_URL": ""}


def _lines(gw: GatewayProcess, count: int) -> list[str]:
    def enough() -> list[str] | None:
        found = [line for line in gw.log_text().splitlines() if line.startswith(('{"time"', "time="))]
        return found if len(found) >= count else None

    return wait_until(enough, timeout_s=10, what=f"{count} access lines")


def test_json_line_per_call_with_route_status_and_verified_caller(env: dict[str, str], mosquitto: Mosquitto) -> None:
    admin = issue_token("ops-alice", {"admin"}, key=TEST_SIGNING_KEY)
    consumer = issue_token("household-7", {"consumer"}, meter="m-own", key=TEST_SIGNING_KEY)
    with GatewayProcess(ROOT / "stack.yml", "edge", secrets_dir=env["SECRETS_DIR"], env=_zone_env(env, mosquitto),
                        args=["--no-background"]) as gw:
        base = f"{gw.url}/function"
        assert httpx.get(f"{base}/edge-registry/meters", headers={"Authorization": f"Bearer {admin}"},
                         timeout=10).status_code == 200
        assert httpx.get(f"{base}/edge-read/meters/m-1/reading", timeout=10).status_code == 401
        assert httpx.get(f"{base}/edge-read/meters/m-other/reading", timeout=10,
                         headers={"Authorization": f"Bearer {consumer}"}).status_code == 403
        assert httpx.get(f"{base}/edge-read/meters/m-own/nothing-here", timeout=10,
                         headers={"Authorization": f"Bearer {consumer}"}).status_code == 404
        assert httpx.get(f"{base}/edge-nope/x", timeout=10).status_code == 404
        lines = _lines(gw, 5)
        text = gw.log_text()
    records = [json.loads(line) for line in lines]
    ok, unauth, forbidden, no_route, no_fn = records[:5]
    assert {"time", "zone", "function", "method", "route", "path", "status", "duration_ms", "subject", "scope",
            "call_id"} <= set(ok)
    assert (ok["function"], ok["route"], ok["status"], ok["subject"], ok["scope"], ok["level"]) == (
        "edge-registry", "/meters", 200, "ops-alice", "admin", "info")
    assert ok["time"].endswith("Z")
    assert ok["duration_ms"] > 0
    assert (unauth["route"], unauth["path"], unauth["status"], unauth["subject"], unauth["level"]) == (
        "/meters/{meter_id}/reading", "/meters/m-1/reading", 401, None, "warning")
    # A 403 comes after the token was verified: the caller is known.
    assert (forbidden["status"], forbidden["subject"], forbidden["scope"]) == (403, "household-7", "consumer")
    assert (no_route["status"], no_route["route"]) == (404, "-")
    assert (no_fn["function"], no_fn["status"]) == ("edge-nope", 404)
    for token in (admin, consumer):
        assert token not in text
        assert token.split(".")[1] not in text


def test_text_format_and_warning_threshold_keep_only_failures(env: dict[str, str], mosquitto: Mosquitto) -> None:
    admin = issue_token("ops alice", {"admin"}, key=TEST_SIGNING_KEY)
    with GatewayProcess(ROOT / "stack.yml", "edge", secrets_dir=env["SECRETS_DIR"], env=_zone_env(env, mosquitto),
                        args=["--no-background", "--access-log-format", "text",
                              "--access-log-level", "warning"]) as gw:
        base = f"{gw.url}/function"
        assert httpx.get(f"{base}/edge-registry/meters", headers={"Authorization": f"Bearer {admin}"},
                         timeout=10).status_code == 200
        assert httpx.get(f"{base}/edge-read/meters/m-1/reading", timeout=10).status_code == 401
        assert httpx.delete(f"{base}/edge-registry/meters/m-1", headers={"Authorization": f"Bearer {admin}"},
                            timeout=10).status_code == 404
        lines = _lines(gw, 2)
    assert len(lines) == 2, lines  # the 200 is below the threshold
    assert "function=edge-read" in lines[0]
    assert "status=401" in lines[0]
    assert "route=/meters/{meter_id}/reading" in lines[0]
    assert 'subject="ops alice"' in lines[1]
    assert "status=404" in lines[1]
    assert "method=DELETE" in lines[1]
