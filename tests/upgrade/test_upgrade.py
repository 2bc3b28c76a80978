"""Twin upgrades end to end: gateway process, v1 and v2 functions, upgrade manager, Redis, Mosquitto, meters.

One edge zone per module (``metertwin_upgrade.local.UpgradeZone``: the stack.yml entries of
docs/upgrade.md); each test provisions its own meters.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from meter_sim import FleetThread
from metertwin.upgrade import cli
from metertwin_upgrade.local import UpgradeZone
from storage.embedded import Mosquitto

_ids = itertools.count()
MANAGER = "edge-upgrade-manager"


@pytest.fixture(scope="module")
def zone(mosquitto: Mosquitto) -> Iterator[UpgradeZone]:
    with UpgradeZone(broker=mosquitto) as running:
        yield running


@pytest.fixture
def fleet_of(zone: UpgradeZone) -> Iterator[Callable[[int], tuple[list[str], FleetThread]]]:
    fleets: list[FleetThread] = []

    def make(n: int) -> tuple[list[str], FleetThread]:
        ids = [f"upg-{next(_ids)}-{i}" for i in range(n)]
        credentials = zone.provision(ids)
        assert zone.broker is not None
        fleet = FleetThread(broker_host=zone.broker.host, broker_port=zone.broker.port, credentials=credentials,
                            reporting_interval_s=1, link="lan", seed=11)
        fleets.append(fleet)
        fleet.start(timeout_s=30)
        return ids, fleet

    yield make
    for fleet in fleets:
        fleet.stop()


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout_s} s")


def manage(zone: UpgradeZone, method: str, path: str, body: dict[str, Any] | None = None,
           expect: int = 200) -> dict[str, Any]:
    resp = zone.call(MANAGER, method, path, token=zone.token("admin"), json=body)
    assert resp.status_code == expect, resp.text
    return dict(resp.json())


def drive(zone: UpgradeZone, op_id: str, until: tuple[str, ...], timeout_s: float = 60.0) -> dict[str, Any]:
    """Advance the operation (as the CLI's follow does) until its state is one of ``until``."""
    def step() -> dict[str, Any] | None:
        status = manage(zone, "POST", f"/operations/{op_id}/advance", {"budget_s": 1.0})
        return status if status["state"] in until else None

    return dict(wait_for(step, timeout_s, f"operation {op_id} in {until}"))


def binding(zone: UpgradeZone, meter: str) -> dict[str, Any]:
    return manage(zone, "GET", f"/meters/{meter}/binding")


def twin_last_seq(zone: UpgradeZone, meter: str) -> int:
    resp = zone.call("edge-read", "GET", f"/meters/{meter}/twin", token=zone.token("utility"))
    assert resp.status_code == 200, resp.text
    return int(resp.json()["metadata"]["last_seq"])


class Traffic(threading.Thread):
    """Commands and reads through the unversioned function names, all through the switch."""

    def __init__(self, zone: UpgradeZone, meters: list[str]) -> None:
        super().__init__(daemon=True)
        self.zone, self.meters = zone, meters
        self.stop_event = threading.Event()
        self.commands: dict[str, list[str]] = {m: [] for m in meters}
        self.read_codes: list[int] = []
        self.command_codes: list[int] = []
        self.schemas: dict[str, int | None] = {}

    def run(self) -> None:
        utility = self.zone.token("utility")
        for i in itertools.count():
            if self.stop_event.is_set():
                return
            meter = self.meters[i % len(self.meters)]
            sent = self.zone.call("edge-write", "POST", f"/meters/{meter}/commands", token=utility,
                                  json={"kind": "load_limit", "params": {"watts": 1000 + i}})
            self.command_codes.append(sent.status_code)
            if sent.status_code == 202:
                self.commands[meter].append(sent.json()["command"]["id"])
            read = self.zone.call("edge-read", "GET", f"/meters/{meter}/reading", token=utility,
                                  params={"max_age": "60"})
            self.read_codes.append(read.status_code)
            if read.status_code == 200:
                self.schemas[meter] = read.json().get("schema")
            self.stop_event.wait(0.05)  # pacing of the traffic, not a wait for a condition

    def finish(self) -> None:
        self.stop_event.set()
        self.join(10)


def test_upgrade_during_live_ingest_and_commands_loses_and_duplicates_nothing(
    zone: UpgradeZone, fleet_of: Callable[[int], tuple[list[str], FleetThread]]
) -> None:
    ids, fleet = fleet_of(6)
    wait_for(lambda: all(twin_last_seq(zone, m) >= 1 for m in ids), what="first readings")
    traffic = Traffic(zone, ids)
    traffic.start()
    try:
        op = manage(zone, "POST", "/operations", {
            "to": "v2", "select": {"meters": ids}, "canary": 2, "batch": 2, "drain_s": 1, "resend_after_s": 2,
            "auto_promote": True, "observe_s": 0.5, "min_calls": 1, "max_error_rate": 0.05,
            "max_p95_ratio": 100, "latency_slack_ms": 5000,
        }, expect=201)
        status = drive(zone, op["id"], ("completed", "rolling_back", "rolled_back", "paused"))
        assert status["state"] == "completed", status
        # Traffic keeps flowing on v2 for a while after the last switch.
        seq_after = {m: fleet.meter(m).seq for m in ids}
        wait_for(lambda: all(twin_last_seq(zone, m) > seq_after[m] + 1 for m in ids), what="readings on v2")
    finally:
        traffic.finish()
    status = manage(zone, "GET", f"/operations/{op['id']}")
    assert status["progress"]["done"] == 6
    assert status["readings"]["missing"] == 0, status["readings"]
    assert status["readings"]["applied_by_old"] + status["readings"]["applied_by_new"] > 0
    assert status["health"]["status"] in ("ok", "insufficient"), status["health"]
    assert set(traffic.read_codes) == {200}, "a read failed during the switch"
    assert set(traffic.command_codes) == {202}
    assert traffic.schemas == dict.fromkeys(ids, 2), "reads through edge-read reach v2 after the switch"
    utility = zone.token("utility")
    for meter in ids:
        # Every command acknowledged once: the meter applied each exactly once.
        def acked(m: str = meter) -> bool:
            listed = zone.call("edge-write", "GET", f"/meters/{m}/commands", token=utility,
                               params={"limit": "200"}).json()["commands"]
            mine = {c["id"]: c["status"] for c in listed}
            return all(mine.get(cid) == "acknowledged" for cid in traffic.commands[m])

        wait_for(acked, what=f"commands of {meter} acknowledged")
        stats = fleet.meter(meter)
        assert stats.binding == "v2"
        assert stats.commands_applied == len(traffic.commands[meter])
        assert stats.commands_duplicate == 0
        # Every reading since the switch applied by v2 exactly once: a gapless run of seqs.
        def caught_up(m: str = meter, target: int = stats.seq) -> bool:
            return twin_last_seq(zone, m) >= target

        wait_for(caught_up, what=f"readings of {meter}")
        history = zone.call("edge-read-v2", "GET", f"/meters/{meter}/readings", token=utility).json()
        seqs = [r["seq"] for r in history["readings"]]
        assert seqs == list(range(seqs[0], seqs[-1] + 1)), f"gap or duplicate in {seqs}"
        assert seqs[0] + history["applied"] == history["last_seq"]
        assert binding(zone, meter)["release"] == "v2"


def test_reads_reach_the_bound_version_and_rollback_restores_v1(
    zone: UpgradeZone, fleet_of: Callable[[int], tuple[list[str], FleetThread]]
) -> None:
    ids, fleet = fleet_of(3)
    wait_for(lambda: all(twin_last_seq(zone, m) >= 1 for m in ids), what="first readings")
    utility = zone.token("utility")
    op = manage(zone, "POST", "/operations", {"to": "v2", "select": {"meters": ids}, "drain_s": 0.5},
                expect=201)
    assert drive(zone, op["id"], ("completed",))["state"] == "completed"
    meter = ids[0]
    old_name = zone.call("edge-read", "GET", f"/meters/{meter}/reading", token=utility)
    assert old_name.status_code == 200
    assert old_name.headers["x-twin-binding"] == "v2"
    assert old_name.json()["schema"] == 2
    assert isinstance(old_name.json()["reading"]["import_wh"], int)
    twin = zone.call("edge-read", "GET", f"/meters/{meter}/twin", token=utility).json()
    assert (twin["release"], twin["schema"]) == ("v2", 2)
    history = zone.call("edge-read-v2", "GET", f"/meters/{meter}/readings", token=utility)
    assert history.status_code == 200
    assert history.json()["readings"]
    # Roll back the completed operation: v1 again, the v2 state destroyed.
    manage(zone, "POST", f"/operations/{op['id']}/rollback", {"reason": "drill"})
    status = drive(zone, op["id"], ("rolled_back",))
    assert status["progress"]["rolled_back"] + status["progress"]["rb_confirming"] == 3
    wait_for(lambda: drive(zone, op["id"], ("rolled_back",))["progress"]["rolled_back"] == 3,
             what="meters confirm the rebind to v1")
    for m in ids:
        assert binding(zone, m)["release"] == "v1"
        assert fleet.meter(m).binding == "v1"
    new_name = zone.call("edge-read-v2", "GET", f"/meters/{meter}/reading", token=utility)
    assert new_name.status_code == 200
    assert new_name.headers["x-twin-binding"] == "v1"
    assert "schema" not in new_name.json()
    seq = twin_last_seq(zone, meter)
    wait_for(lambda: twin_last_seq(zone, meter) > seq + 1, what="readings applied by v1 again")
    again = manage(zone, "POST", f"/operations/{op['id']}/rollback", expect=409)
    assert "already rolled_back" in again["message"]


def test_meter_that_misses_the_rebind_is_recovered(
    zone: UpgradeZone, fleet_of: Callable[[int], tuple[list[str], FleetThread]]
) -> None:
    ids, fleet = fleet_of(3)
    wait_for(lambda: all(twin_last_seq(zone, m) >= 1 for m in ids), what="first readings")
    offline = ids[0]
    fleet.go_offline(offline)
    wait_for(lambda: not fleet.meter(offline).connected, what="meter offline")
    op = manage(zone, "POST", "/operations", {
        "to": "v2", "select": {"meters": ids}, "drain_s": 0, "rebind_ttl_s": 1, "resend_after_s": 0.5,
        "max_attempts": 2,
    }, expect=201)

    def missed() -> bool:
        status = manage(zone, "POST", f"/operations/{op['id']}/advance", {"budget_s": 0.5})
        switch = binding(zone, offline).get("switch", {})
        # Past its expiry (1 s) the first rebind is gone: the meter has missed it.
        return bool(status["progress"]["done"] == 2 and switch.get("phase") == "rebinding"
                    and int(switch.get("attempts", 0)) >= 2 and time.time() - float(switch["created_at"]) > 2.5)

    wait_for(missed, what="the other meters done, the offline one unconfirmed")
    status = manage(zone, "GET", f"/operations/{op['id']}")
    assert status["state"] == "rolling_out"
    assert any("not confirmed the rebind" in b for b in status["blockers"]), status["blockers"]
    assert binding(zone, offline)["release"] == "v1"  # the old binding keeps serving it
    fleet.go_online(offline)
    status = drive(zone, op["id"], ("completed",), timeout_s=60)
    assert status["readings"]["missing"] == 0
    assert binding(zone, offline)["release"] == "v2"
    assert fleet.meter(offline).binding == "v2"
    seq = fleet.meter(offline).seq
    wait_for(lambda: twin_last_seq(zone, offline) >= seq, what="buffered readings applied")


def test_operator_errors_say_what_blocked(zone: UpgradeZone,
                                          fleet_of: Callable[[int], tuple[list[str], FleetThread]]) -> None:
    ids, _fleet = fleet_of(2)
    bad = manage(zone, "POST", "/operations", {"to": "v9", "select": {"meters": ids}}, expect=400)
    assert "release 'v9' is unknown" in bad["message"]
    both = manage(zone, "POST", "/operations", {"to": "v2", "select": {"meters": ids, "all": True}}, expect=400)
    assert "exactly one of" in both["message"]
    op = manage(zone, "POST", "/operations", {"to": "v2", "select": {"meters": ids}, "canary": 1,
                                             "resend_after_s": 60}, expect=201)
    second = manage(zone, "POST", "/operations", {"to": "v2", "select": {"all": True}}, expect=409)
    assert op["id"] in second["message"]
    paused = manage(zone, "POST", f"/operations/{op['id']}/pause", {"reason": "change freeze"})
    assert paused["state"] == "paused"
    assert any("change freeze" in b for b in paused["blockers"])
    not_observing = manage(zone, "POST", f"/operations/{op['id']}/promote", expect=409)
    assert "only an observing canary can be promoted" in not_observing["message"]
    manage(zone, "POST", f"/operations/{op['id']}/resume")
    drive(zone, op["id"], ("observing",))
    manage(zone, "POST", f"/operations/{op['id']}/rollback")
    drive(zone, op["id"], ("rolled_back",))
    unknown = manage(zone, "GET", "/operations/nope", expect=404)
    assert "nope" in unknown["message"]
    listed = manage(zone, "GET", "/operations")
    assert any(o["id"] == op["id"] for o in listed["operations"])
    releases = manage(zone, "GET", "/releases")
    assert {r["release"] for r in releases["releases"]} >= {"v1", "v2"}


def test_cli_starts_follows_promotes_and_reports_refusals(
    zone: UpgradeZone, fleet_of: Callable[[int], tuple[list[str], FleetThread]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids, fleet = fleet_of(4)
    key_file = zone.secrets_dir / "token-signing-key"
    base = ["--gateway", zone.url, "--signing-key-file", str(key_file)]
    assert cli.run([*base, "start", "--to", "v2", "--meters", ",".join(ids), "--canary", "1", "--drain-s", "0",
                    "--follow", "--interval-s", "0.1", "--timeout-s", "60"]) == 0
    out = capsys.readouterr().out
    assert "[observing] 1/4 switched" in out
    op_id = out.split()[1]
    # The manager's refusals: exit status 1 and its message.
    assert cli.run([*base, "resume", op_id]) == 1
    assert "is observing, not paused" in capsys.readouterr().err
    assert cli.run([*base, "promote", op_id, "--follow", "--interval-s", "0.1", "--timeout-s", "60"]) == 0
    out = capsys.readouterr().out
    assert "[completed] 4/4 switched (100.0%)" in out
    assert "missing 0" in out
    assert cli.run([*base, "--json", "binding", ids[0]]) == 0
    assert '"release": "v2"' in capsys.readouterr().out
    assert cli.run([*base, "list"]) == 0
    assert op_id in capsys.readouterr().out
    assert cli.run(["--gateway", zone.url, "--token", "not-a-jwt", "status", op_id]) == 1
    assert "bearer token is invalid" in capsys.readouterr().err
    assert all(fleet.meter(m).binding == "v2" for m in ids)
