"""The bridge -> gateway -> dr-event path over real HTTP, and the ``python -m dr_bridge`` CLI.

The zone gateway (``python -m gateway``) runs as a subprocess with a stack holding only
``edge-dr-event``; the bridge reaches it through its default :class:`HttpInvoker`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dr_bridge import Bridge, BridgeConfig, HttpInvoker
from dr_bridge.__main__ import read_meters, resolve_shard
from dr_bridge.demo import UtilityVtn, run_demo, wait_until
from dr_bridge.shard import shard_of
from gateway.server import GatewayProcess
from metertwin.core.auth import issue_token
from tests.conftest import TEST_SIGNING_KEY
from tests.dr.test_dr_event import CommandObserver, commands_seen, dr_env, make_twin

__all__ = ["commands_seen", "dr_env"]

ROOT = Path(__file__).resolve().parents[2]

STACK = """\
version: 1.0
provider:
  name: openfaas
  gateway: http://127.0.0.1:8080
functions:
  edge-dr-event:
    lang: python3-http
    handler: {handler}
    environment:
      ZONE: edge
      REDIS_URL: {redis_url}
      MQTT_HOST: {mqtt_host}
      MQTT_PORT: "{mqtt_port}"
      MQTT_USERNAME: {mqtt_user}
      DR_ACK_TIMEOUT_S: "0.4"
    secrets: [token-signing-key, mqtt-password]
"""


@pytest.fixture
def gateway(dr_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    stack = tmp_path / "stack.yml"
    stack.write_text(STACK.format(handler=ROOT / "functions" / "dr-event", redis_url=dr_env["REDIS_URL"],
                                  mqtt_host=dr_env["MQTT_HOST"], mqtt_port=dr_env["MQTT_PORT"],
                                  mqtt_user=dr_env["MQTT_USERNAME"]))
    (Path(dr_env["SECRETS_DIR"]) / "gateway-basic-auth-password").write_text("gw-pass")
    args = ["--no-background", "--log-level", "warning"]
    with GatewayProcess(stack, "edge", secrets_dir=dr_env["SECRETS_DIR"], args=args,
                        log_path=tmp_path / "gateway.log") as gateway:
        yield gateway.url


@pytest.fixture
async def vtn(dr_env: dict[str, str]) -> AsyncIterator[UtilityVtn]:
    server = UtilityVtn(poll_s=1.0, sampling_s=1.0)
    await server.start()
    yield server
    await server.stop()


SERVICE = issue_token("dr-bridge", {"service"}, key=TEST_SIGNING_KEY)


async def test_event_through_the_gateway(gateway: str, vtn: UtilityVtn, commands_seen: CommandObserver,
                                         meter_id: str) -> None:
    make_twin(meter_id)
    bridge = Bridge([meter_id], BridgeConfig(vtn_url=vtn.url, due_poll_s=0.1, telemetry_refresh_s=0.5),
                    HttpInvoker(gateway, SERVICE))
    await bridge.start()
    try:
        event_id = vtn.issue([meter_id], intervals=[(1.5, 2.0, 3)])
        await wait_until(lambda: vtn.answers_for(event_id), 10)
        assert vtn.answers_for(event_id)[meter_id].opt_type == "optIn"
        await wait_until(lambda: commands_seen.commands(meter_id), 10)
        assert commands_seen.commands(meter_id)[0][1]["params"] == {"watts": 1000.0}
        await wait_until(lambda: commands_seen.commands(meter_id)[-1][1]["params"] == {"watts": None}, 10)
        assert bridge.stats.invoke_errors == 0
        await wait_until(lambda: any(r.report_name == "TELEMETRY_USAGE" and r.value == 2000.0 for r in vtn.reports),
                         10)
    finally:
        await bridge.stop()
    # a wrong token is refused by the function, and the VEN answers optOut 469 for a new event
    bad = Bridge([meter_id], BridgeConfig(vtn_url=vtn.url), HttpInvoker(gateway, "not-a-token"))
    await bad.start()
    try:
        second = vtn.issue([meter_id], intervals=[(60.0, 5.0, 1)])
        await wait_until(lambda: vtn.answers_for(second), 10)
        answer = vtn.answers_for(second)[meter_id]
        assert (answer.opt_type, answer.response_code) == ("optOut", 469)
    finally:
        await bad.stop()


async def test_demo_helper_summarises_opt_ins(gateway: str, meter_id: str) -> None:
    meters = [meter_id, meter_id + "-2"]
    for m in meters:
        make_twin(m, power_w=1600.0)
    summary = await run_demo(gateway, meters, token=SERVICE, lead_s=1.5, duration_s=3.0, timeout_s=20)
    assert summary["twins"] == 2
    assert summary["registered"] == 2
    assert summary["opt_in"] == 2
    assert summary["baseline_w"] == 3200.0
    # no simulated meter applies the limit here: the load measured during the event is unchanged
    assert summary["reduction_w"] == 0.0
    assert set(summary["per_meter"]) == set(meters)


def test_cli_shards_and_meters_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [f"m-{i:04d}" for i in range(400)]
    path = tmp_path / "meters.txt"
    path.write_text("# fleet\n" + "\n".join(ids) + "\n\n")
    parts = [read_meters(str(path), i, 4) for i in range(4)]
    assert sorted(m for p in parts for m in p) == ids
    assert all(60 < len(p) < 140 for p in parts)
    assert all(shard_of(m, 4) == i for i, p in enumerate(parts) for m in p)
    monkeypatch.setenv("HOSTNAME", "dr-bridge-3")
    assert resolve_shard("ordinal/4") == (3, 4)
    with pytest.raises(ValueError, match="i/n"):
        resolve_shard("x")
    with pytest.raises(ValueError, match="0 <= i < n"):
        resolve_shard("4/4")
    out = subprocess.run([sys.executable, "-m", "dr_bridge", "--vtn-url", "http://x", "--gateway", "http://y",
                          "--meters-file", str(path), "--shard", "9/2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "9/2" in out.stderr


def test_deploy_manifest_shards_match_replicas() -> None:
    import yaml

    docs = list(yaml.safe_load_all((ROOT / "deploy" / "dr-bridge.yml").read_text()))
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    shard = next(a for a in args if a.startswith("--shard="))
    assert shard == f"--shard=ordinal/{sts['spec']['replicas']}"
    assert sts["spec"]["serviceName"] == next(d for d in docs if d["kind"] == "Service")["metadata"]["name"]
    assert any(a.startswith("--vtn-fingerprint=") for a in args)
