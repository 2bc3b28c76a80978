"""``/readyz`` of a real gateway process: the zone's Redis, broker and S3, reachable or not, within a timeout."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from gateway.server import GatewayProcess
from storage.embedded import Mosquitto, MotoS3, RedisServer

ROOT = Path(__file__).resolve().parents[2]


def _fog_env(redis_url: str, mosquitto: Mosquitto, s3_url: str) -> dict[str, str]:
    return {"FOG_REDIS_URL": redis_url, "FOG_MQTT_HOST": mosquitto.host, "FOG_MQTT_PORT": str(mosquitto.port),
            "S3_ENDPOINT_URL": s3_url}


def _checks(resp: httpx.Response) -> dict[str, dict[str, object]]:
    return {c["name"]: c for c in resp.json()["checks"]}


def test_ready_then_503_naming_redis_once_it_is_down(env: dict[str, str], mosquitto: Mosquitto,
                                                     s3_server: MotoS3) -> None:
    redis = RedisServer()
    try:
        with GatewayProcess(ROOT / "stack.yml", "fog", secrets_dir=env["SECRETS_DIR"],
                            env=_fog_env(redis.url, mosquitto, s3_server.url), args=["--no-background"]) as gw:
            ready = httpx.get(f"{gw.url}/readyz", timeout=10)
            assert ready.status_code == 200, ready.text
            checks = _checks(ready)
            assert set(checks) == {"redis", "mqtt", "s3"}
            assert all(c["reachable"] for c in checks.values())
            assert checks["redis"]["target"] == f"127.0.0.1:{redis.port}"
            assert httpx.get(f"{gw.url}/healthz", timeout=10).status_code == 200
            redis.stop()
            down = httpx.get(f"{gw.url}/readyz", timeout=10)
            assert down.status_code == 503
            checks = _checks(down)
            assert checks["redis"]["reachable"] is False
            assert checks["redis"]["error"]
            assert checks["mqtt"]["reachable"] is True
            assert checks["s3"]["reachable"] is True
            assert httpx.get(f"{gw.url}/healthz", timeout=10).status_code == 200  # alive, not ready
    finally:
        redis.stop()


def test_a_silent_service_is_unreachable_within_the_timeout(env: dict[str, str], mosquitto: Mosquitto,
                                                            s3_server: MotoS3) -> None:
    # Accepts connections (the kernel's backlog) but never answers: only a timeout ends the probe.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        zone_env = _fog_env(f"redis://127.0.0.1:{port}/0", mosquitto, f"http://127.0.0.1:{port}")
        with GatewayProcess(ROOT / "stack.yml", "fog", secrets_dir=env["SECRETS_DIR"], env=zone_env,
                            args=["--no-background", "--ready-timeout", "0.5"]) as gw:
            started = time.monotonic()
            resp = httpx.get(f"{gw.url}/readyz", timeout=10)
            elapsed = time.monotonic() - started
    assert resp.status_code == 503
    checks = _checks(resp)
    assert (checks["redis"]["reachable"], checks["s3"]["reachable"], checks["mqtt"]["reachable"]) == (
        False, False, True)
    assert elapsed < 3.0  # probes run concurrently, each bounded by --ready-timeout
