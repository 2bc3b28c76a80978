"""Faults: persistence across kill -9, secrets off command lines, supervision, and the fault suite.

The suite (one supervised embedded stack, simulated meters reporting) kills each zone gateway
and the edge and fog Redis with SIGKILL, restarts Mosquitto, and pauses S3 during an archive
run; loadtest/faults.py holds the scenarios (``python -m loadtest.faults`` runs them bigger).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from embedded.stack import EmbeddedStack
from loadtest.faults import STACK_ENV, FaultRun, table
from metertwin.core import clients
from metertwin.core.auth import issue_token
from metertwin.core.settings import reset_settings
from metertwin.twin import keys
from metertwin.twin.state import twin_store
from storage.embedded import Mosquitto, RedisServer
from tests.conftest import TEST_SIGNING_KEY
from tests.invoke import call, load_handler


def test_redis_keeps_twins_and_registry_across_kill_9(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "redis")
    try:
        store = twin_store(redis.Redis.from_url(server.url, decode_responses=True))
        ids = [f"persist-{i}" for i in range(200)]
        for m in ids:
            assert store.create(m, "edge", {"kind": "household"})
            store.report_measurement(m, {"ts": 1_700_000_000.0, "import_kwh": 1.0, "power_w": 5.0}, 7)
        port = server.port
        server.kill()  # SIGKILL: no shutdown code, no final save
        server.start()  # the same code path the supervisor uses: same port, same data directory
        assert server.port == port
        r = redis.Redis.from_url(server.url, decode_responses=True)
        assert r.scard(keys.TWIN_INDEX) == len(ids)
        twin = twin_store(r).get(ids[-1])
        assert (twin.last_seq, twin.profile) == (7, {"kind": "household"})
        assert r.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert r.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    finally:
        server.stop()
    assert (tmp_path / "redis").is_dir()  # a caller's data directory is kept


def _cmdlines() -> list[bytes]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                out.append((proc / "cmdline").read_bytes())
            except OSError:
                continue
    return out


@pytest.fixture
def watch_cmdlines() -> Iterator[list[bytes]]:
    """Every command line seen while the test runs (sampled continuously)."""
    seen: list[bytes] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.extend(_cmdlines())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    yield seen
    stop.set()
    thread.join(5)


def test_no_password_on_a_command_line_and_the_dynsec_file_stays_0600(
    env: dict[str, str], watch_cmdlines: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with Mosquitto() as broker:
        assert oct(broker.dynsec_path.stat().st_mode & 0o777) == "0o600"
        monkeypatch.setenv("MQTT_PORT", str(broker.port))
        (Path(env["SECRETS_DIR"]) / "mqtt-password").write_text(broker.service_password)
        clients.close_all()
        reset_settings()
        registry = load_handler("registry")
        admin = issue_token("tester", {"admin"}, key=TEST_SIGNING_KEY)
        status, body = call(registry, "POST", "/meters/bulk", token=admin,
                            body={"meters": [{"meter_id": f"ps-{i}"} for i in range(20)]})
        assert status == 201, body
        # The plugin has rewritten its file for every command: still readable by its owner only.
        assert oct(broker.dynsec_path.stat().st_mode & 0o777) == "0o600"
        secrets = [broker.admin_password, broker.service_password, *(m["password"] for m in body["meters"])]
        clients.close_all()
    assert watch_cmdlines, "no command line sampled"
    leaked = [c for c in watch_cmdlines for s in secrets if s.encode() in c]
    assert not leaked, f"a password appeared in a process's command line: {leaked[:1]!r}"
    assert not any(b"mosquitto_ctrl" in c for c in watch_cmdlines)


@pytest.fixture(scope="module")
def stack() -> Iterator[EmbeddedStack]:
    with EmbeddedStack(extra_env=STACK_ENV) as s:
        yield s


def test_supervisor_restarts_a_dead_child(stack: EmbeddedStack) -> None:
    before = stack.restarts()["redis-cloud"]
    old_pid = stack.redis["cloud"].proc.pid if stack.redis["cloud"].proc else None
    stack.redis["cloud"].kill()
    stack.wait_restarted("redis-cloud", before + 1, timeout_s=30)
    assert stack.redis["cloud"].proc is not None
    assert stack.redis["cloud"].proc.pid != old_pid
    assert redis.Redis.from_url(stack.redis["cloud"].url).ping()


@pytest.mark.timeout(240)
def test_no_reading_lost_or_applied_twice_through_faults(stack: EmbeddedStack) -> None:
    run = FaultRun(stack, meters=10, interval_s=1.0, settle_s=2.0, catch_up_s=20.0, log=lambda _s: None)
    run.start()
    try:
        results = {r.fault: r for r in run.run()}
    finally:
        run.stop()
    print(table(list(results.values())))
    assert len(results) == 7
    for r in results.values():
        assert r.sent > 0, r
        assert (r.fault, r.lost, r.duplicated, r.edge_caught_up) == (r.fault, 0, 0, True), r
