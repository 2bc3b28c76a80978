"""From ``make demo`` to one's own calls, with only what the demo prints and writes to ``.run/demo.env``."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _sourced(env_file: Path) -> dict[str, str]:
    """What a shell has after ``source`` of the file (the real test of 'sourceable')."""
    out = subprocess.run(["bash", "-c", f"set -a; source {env_file}; env -0"], capture_output=True, check=True,
                         env={"PATH": os.environ["PATH"]}).stdout.decode()
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_newcomer_uses_the_running_demo(tmp_path: Path) -> None:
    env_file = tmp_path / "demo.env"
    demo = subprocess.Popen([sys.executable, "-m", "embedded.demo", "--meters", "5", "--env-file", str(env_file)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(demo.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(lambda: any("stack running" in line for line in lines) or demo.poll() is not None, 300,
                   "the demo to finish its scenario")
        out = "".join(lines)
        assert demo.poll() is None, out[-3000:]
        assert f"source {env_file}" in out
        assert "time-of-use bill of demo-0000" in out
        assert "energy peak" in out and "energy offpeak" in out  # noqa: PT018 (one line of the bill each)
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        env = _sourced(env_file)
        password = Path(env["GATEWAY_PASSWORD_FILE"]).read_text().strip()
        assert password not in env_file.read_text(), "the file must say where the password is, not hold it"
        for key in ("EDGE_GATEWAY_URL", "FOG_GATEWAY_URL", "CLOUD_GATEWAY_URL", "MQTT_HOST", "MQTT_PORT",
                    "GATEWAY_USER", "ADMIN_TOKEN", "BILLING_TOKEN", "SECRETS_DIR", "LOGS_DIR"):
            assert env.get(key), key
        assert list(Path(env["LOGS_DIR"]).glob("gateway-*.log"))
        billing = {"Authorization": f"Bearer {env['BILLING_TOKEN']}"}
        with httpx.Client(timeout=30) as http:
            meters = http.get(f"{env['EDGE_GATEWAY_URL']}/function/edge-registry/meters", headers=billing).json()
            assert "demo-0000" in meters["meters"]
            now = int(time.time()) // 3600 * 3600
            profile = http.get(f"{env['FOG_GATEWAY_URL']}/function/fog-mdms-query/meters/demo-0001/load-profile",
                               headers=billing, params={"from": now - 30 * 86_400, "to": now - 86_400,
                                                        "interval": "1h"}).json()
            assert profile["count"] == 29 * 24
            assert profile["totals"]["quality"]["valid"] == 29 * 24  # history, hot and cold
            functions = http.get(f"{env['EDGE_GATEWAY_URL']}/system/functions",
                                 auth=(env["GATEWAY_USER"], password)).json()
            assert any(f["name"] == "edge-read" for f in functions)

            cli_env = {**os.environ, **env}
            consumer = subprocess.run([sys.executable, "-m", "metertwin.tokens", "issue", "--scope", "consumer",
                                       "--meter", "demo-0002"], cwd=ROOT, env=cli_env, capture_output=True,
                                      text=True, check=True).stdout.strip()
            own = http.get(f"{env['EDGE_GATEWAY_URL']}/function/edge-read/meters/demo-0002/reading",
                           headers={"Authorization": f"Bearer {consumer}"})
            assert own.status_code == 200, own.text
            subprocess.run([sys.executable, "-m", "metertwin.tokens", "revoke", env["BILLING_TOKEN"], "--reason",
                            "test over", "--redis-url", env["EDGE_REDIS_URL"], "--redis-url", env["FOG_REDIS_URL"],
                            "--redis-url", env["CLOUD_REDIS_URL"]], cwd=ROOT, env=cli_env, check=True,
                           capture_output=True)

            def refused() -> httpx.Response | None:
                r = http.get(f"{env['EDGE_GATEWAY_URL']}/function/edge-registry/meters", headers=billing)
                return r if r.status_code == 401 else None

            answer = wait_until(refused, 10, "the revoked billing token to be refused")
            assert "revoked: test over" in answer.json()["message"]
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
        code = demo.wait(timeout=60)
        reader.join(timeout=10)
    assert code == 0, "".join(lines)[-2000:]
    assert "stopped every process the demo started" in "".join(lines)
