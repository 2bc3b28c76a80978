"""Jobs through a real gateway process: the CLI creates and follows, the cron connector runs the slices,
and a restarted gateway finishes a job the first one started (no twin twice)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.server import GatewayProcess
from metertwin.core.clients import get_redis
from metertwin.fleet.topology import topology_store
from metertwin.jobs import cli
from storage.embedded import Mosquitto
from tests.fixtures.gateway_support import write_basic_auth
from tests.jobs.helpers import grid
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _gateway(env: dict[str, str], redis_url: str, mosquitto: Mosquitto, log: Path) -> GatewayProcess:
    zone_env = {"EDGE_REDIS_URL": redis_url, "EDGE_MQTT_HOST": mosquitto.host,
                "EDGE_MQTT_PORT": str(mosquitto.port), "MQTT_USERNAME": mosquitto.service_user}
    return GatewayProcess(ROOT / "stack.yml", "edge", secrets_dir=write_basic_auth(env), env=zone_env,
                          args=["--log-level", "warning"], log_path=log)


def test_cli_and_cron_through_a_restarted_gateway(env: dict[str, str], redis_url: str, mosquitto: Mosquitto,
                                                  meter_id: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    ids = grid(meter_id, 8)
    key = str(Path(env["SECRETS_DIR"]) / "token-signing-key")
    with _gateway(env, redis_url, mosquitto, tmp_path / "one.log") as gw:
        base = ["--gateway", gw.url, "--signing-key-file", key]
        assert cli.run([*base, "create", "--filter", "feeder=f0", "--topology", '{"tariff": "tou"}',
                        "--rate", "3", "--max-in-flight", "1"]) == 0
        out = capsys.readouterr().out
        job_id = out.split()[1]
        assert "4 twins" in out
        assert cli.run([*base, "pause", job_id]) == 0
        assert "[paused]" in capsys.readouterr().out
        assert cli.run([*base, "pause", job_id]) == 1
        assert "is paused: it cannot pause" in capsys.readouterr().err
        assert cli.run([*base, "resume", job_id]) == 0
        assert cli.run([*base, "create", "--meters", "m-1", "--topology", '{"phase": "Z"}']) == 1
        assert "action.patch" in capsys.readouterr().err
    # the gateway is gone mid-job; a new one's cron connector finishes it
    with _gateway(env, redis_url, mosquitto, tmp_path / "two.log") as gw:
        base = ["--gateway", gw.url, "--signing-key-file", key]

        def done() -> bool:
            assert cli.run([*base, "--json", "show", job_id]) == 0
            return '"state": "completed"' in capsys.readouterr().out

        wait_until(done, 20, "the cron connector to finish the job")
        assert cli.run([*base, "follow", job_id]) == 0
        assert "100.0%  4/4  ok 4  [completed]" in capsys.readouterr().out
        assert cli.run([*base, "executions", job_id, "--status", "succeeded"]) == 0
        assert capsys.readouterr().out.count("succeeded") == 4
    store = topology_store(get_redis())
    for meter_id_ in ids[0::2]:
        changes = [c for c in store.history(meter_id_) if c.get("actor") == f"job:{job_id}"]
        assert len(changes) == 1, meter_id_  # once each, across the restart
    assert all(store.get(m).get("tariff") is None for m in ids[1::2])  # type: ignore[union-attr]
