"""README "Locally: the gateway": ``python -m embedded.zone`` makes one zone callable on a fresh clone."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _exports(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


def test_one_zone_answers_with_the_printed_token_and_stops_everything(tmp_path: Path) -> None:
    env_file = tmp_path / "zone.env"
    proc = subprocess.Popen([sys.executable, "-m", "embedded.zone", "--zone", "edge", "--port", "0",
                             "--env-file", str(env_file)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until(lambda: env_file.exists() or proc.poll() is not None, timeout_s=60, what="the zone's env file")
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert env_file.stat().st_mode & 0o777 == 0o600
        values = _exports(env_file)
        url, token = values["GATEWAY_URL"], values["ADMIN_TOKEN"]
        listing = httpx.get(f"{url}/function/edge-registry/meters", headers={"Authorization": f"Bearer {token}"},
                            timeout=10)
        assert listing.status_code == 200, listing.text
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200
        assert ready.json()["ready"] is True
        password = Path(values["GATEWAY_PASSWORD_FILE"]).read_text()
        assert httpx.get(f"{url}/system/functions", auth=(values["GATEWAY_USER"], password),
                         timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
    assert not env_file.exists()
    try:  # the gateway (its own session) is gone too
        httpx.get(f"{url}/healthz", timeout=2)
    except httpx.TransportError:
        pass
    else:
        raise AssertionError(f"the gateway at {url} still answers")
    try:  # and nothing is left in the command's own process group
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError(f"processes of group {proc.pid} are still running")
