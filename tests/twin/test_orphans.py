"""Orphans after a loss: twins without accounts and accounts without twins (provision, delete, reconcile).

Each test gets a broker of its own: reconcile looks at every meter account in the
broker, and the session broker holds the accounts of every other test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from metertwin.core import clients
from metertwin.core.auth import issue_token
from metertwin.core.settings import reset_settings
from metertwin.twin.state import twin_store
from storage.embedded import Mosquitto
from tests.conftest import TEST_SIGNING_KEY
from tests.invoke import call, load_handler

registry = load_handler("registry")
ROOT = Path(__file__).resolve().parents[2]


def admin() -> str:
    return issue_token("tester", {"admin"}, key=TEST_SIGNING_KEY)


@pytest.fixture
def broker(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Mosquitto]:
    """A broker for this test alone; the environment's functions use it."""
    with Mosquitto() as own:
        monkeypatch.setenv("MQTT_PORT", str(own.port))
        (Path(env["SECRETS_DIR"]) / "mqtt-password").write_text(own.service_password)
        env.update(MQTT_PORT=str(own.port))
        clients.close_all()
        reset_settings()
        yield own
        clients.close_all()


def login(broker: Mosquitto, meter_id: str, password: str) -> bool:
    """A real MQTT CONNECT with the meter's credentials: True if the broker accepts it."""
    outcome: list[ReasonCode] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=meter_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(meter_id, password)
    client.on_connect = lambda _c, _u, _f, reason, _p: outcome.append(reason)
    try:
        client.connect(broker.host, broker.port, keepalive=5)
        while not outcome:
            client.loop(timeout=0.1)
    except ConnectionError:
        return False
    finally:
        client.disconnect()
    return not outcome[0].is_failure


def provision(meter_id: str) -> tuple[int, Any]:
    return call(registry, "POST", "/meters", body={"meter_id": meter_id}, token=admin())


def lose_the_twins(redis_url: str) -> None:
    """What a Redis without persistence did on restart: every twin and the index gone, accounts kept."""
    redis.Redis.from_url(redis_url).flushall()


def test_provisioning_over_an_orphaned_account_replaces_it(broker: Mosquitto, redis_url: str, meter_id: str) -> None:
    status, first = provision(meter_id)
    assert status == 201, first
    assert login(broker, meter_id, first["password"])
    lose_the_twins(redis_url)

    status, second = provision(meter_id)
    assert status == 201, second
    assert second["password"] != first["password"]
    assert login(broker, meter_id, second["password"])
    assert not login(broker, meter_id, first["password"])  # the old password no longer logs in


def test_delete_removes_an_orphaned_account(broker: Mosquitto, redis_url: str, meter_id: str) -> None:
    status, created = provision(meter_id)
    assert status == 201, created
    lose_the_twins(redis_url)

    status, body = call(registry, "DELETE", f"/meters/{meter_id}", token=admin())
    assert status == 200, body
    assert not login(broker, meter_id, created["password"])
    status, body = call(registry, "DELETE", f"/meters/{meter_id}", token=admin())
    assert status == 404, body  # neither a twin nor an account any more


def test_reconcile_reports_then_fixes_both_kinds_of_orphan(
    broker: Mosquitto, redis_url: str, meter_id: str
) -> None:
    kept, orphan_account, orphan_twin = f"{meter_id}-k", f"{meter_id}-a", f"{meter_id}-t"
    passwords = {}
    for m in (kept, orphan_account, orphan_twin):
        status, body = provision(m)
        assert status == 201, body
        passwords[m] = body["password"]
    # Lose one twin (Redis side) and one account (broker side).
    twin_store(redis.Redis.from_url(redis_url, decode_responses=True)).delete(orphan_account)
    broker.control([{"command": "deleteClient", "username": orphan_twin},
                    {"command": "deleteRole", "rolename": f"meter-{orphan_twin}"}])

    status, report = call(registry, "POST", "/reconcile", token=admin())
    assert status == 200, report
    assert report["twins_without_accounts"] == [orphan_twin]
    assert report["accounts_without_twins"] == [orphan_account]
    assert report["fixed"] is False
    assert login(broker, orphan_account, passwords[orphan_account])  # a report changes nothing

    status, report = call(registry, "POST", "/reconcile", query={"fix": "true"}, token=admin())
    assert status == 200, report
    assert report["removed"] == [orphan_account]
    assert [c["meter_id"] for c in report["created"]] == [orphan_twin]
    assert not login(broker, orphan_account, passwords[orphan_account])
    assert login(broker, orphan_twin, report["created"][0]["password"])
    assert login(broker, kept, passwords[kept])

    status, report = call(registry, "POST", "/reconcile", token=admin())
    assert (report["twins_without_accounts"], report["accounts_without_twins"]) == ([], [])
    status, body = call(registry, "POST", "/reconcile", query={"fix": "maybe"}, token=admin())
    assert status == 400, body
    status, body = call(registry, "POST", "/reconcile",
                        token=issue_token("u", {"utility"}, key=TEST_SIGNING_KEY))
    assert status == 403, body


def test_reconcile_cli(broker: Mosquitto, env: dict[str, str], redis_url: str, meter_id: str) -> None:
    status, body = provision(meter_id)
    assert status == 201, body
    lose_the_twins(redis_url)
    run_env = {**env, "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> tuple[int, dict[str, Any]]:
        done = subprocess.run([sys.executable, "-m", "metertwin.twin.reconcile", *args], cwd=ROOT, env=run_env,
                              capture_output=True, text=True, timeout=60)
        return done.returncode, json.loads(done.stdout or "{}") if done.returncode in (0, 1) else {"err": done.stderr}

    code, report = cli()
    assert code == 1, report
    assert report["accounts_without_twins"] == [meter_id]
    code, report = cli("--fix")
    assert code == 0, report
    assert report["removed"] == [meter_id]
    assert not login(broker, meter_id, body["password"])
