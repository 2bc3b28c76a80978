"""Serving helpers: a gateway in a thread on a free port, and the CLI process with a graceful stop."""

from __future__ import annotations

import httpx

from gateway.server import GatewayProcess, run_in_thread
from tests.fixtures.gateway_support import PASSWORD, STACK, saved_environ, write_basic_auth


def test_run_in_thread_serves_and_stops(env: dict[str, str]) -> None:
    secrets = write_basic_auth(env)
    with saved_environ(), run_in_thread(STACK, "fog", secrets_dir=secrets) as gw:
        resp = httpx.get(f"{gw.url}/function/fog-echo/x", timeout=5)
        assert resp.status_code == 200
        assert resp.json()["path"] == "/x"
        listing = httpx.get(f"{gw.url}/system/functions", auth=("admin", PASSWORD), timeout=5).json()
        assert [f["name"] for f in listing] == ["fog-echo"]
    assert not gw.server.started or gw.server.should_exit


def test_cli_process_stops_gracefully(env: dict[str, str]) -> None:
    secrets = write_basic_auth(env)
    gw = GatewayProcess(STACK, "edge", secrets_dir=secrets, args=["--log-level", "info"])
    try:
        assert httpx.get(f"{gw.url}/function/edge-echo/text", timeout=5).text == "plain text"
    finally:
        code = gw.stop()
    # uvicorn re-raises the SIGTERM it caught once shutdown is complete.
    assert code in (0, -15), gw.log_text()
    assert "stopped: in-flight calls drained, clients closed" in gw.log_text()
