"""The twin capabilities end to end: gateway process -> functions -> Redis/Mosquitto -> simulated meters.

One embedded edge zone per module (starting it is the slow part); each test provisions
its own meters, so no state is shared between tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from embedded.stack import EmbeddedStack
from meter_sim import FleetThread
from tests.waiting import wait_until as wait_for

_ids = itertools.count()


@pytest.fixture(scope="module")
def stack() -> Iterator[EmbeddedStack]:
    with EmbeddedStack(zones=("edge",), with_s3=False) as running:
        yield running


@pytest.fixture
def meters(stack: EmbeddedStack, request: pytest.FixtureRequest) -> Iterator[tuple[list[str], FleetThread]]:
    """Three fresh twins with a running simulated meter each (LAN link, 1 s reports)."""
    ids = [f"e2e-{next(_ids)}-{i}" for i in range(3)]
    credentials = stack.provision(ids)
    assert stack.broker is not None
    fleet = FleetThread(broker_host=stack.broker.host, broker_port=stack.broker.port, credentials=credentials,
                        reporting_interval_s=1, link="lan", seed=7)
    fleet.start(timeout_s=30)
    yield ids, fleet
    fleet.stop()




def twin(stack: EmbeddedStack, meter: str) -> dict[str, Any]:
    resp = stack.call("edge", "edge-read", "GET", f"/meters/{meter}/twin", token=stack.token("utility"))
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def command_status(stack: EmbeddedStack, meter: str, command_id: str) -> str:
    resp = stack.call("edge", "edge-write", "GET", f"/meters/{meter}/commands/{command_id}",
                      token=stack.token("utility"))
    return str(resp.json()["command"]["status"])


def test_readings_flow_over_mqtt_into_the_twin(stack: EmbeddedStack, meters: tuple[list[str], FleetThread]) -> None:
    ids, fleet = meters
    wait_for(lambda: all(twin(stack, m)["metadata"]["last_seq"] >= 2 for m in ids))
    doc = twin(stack, ids[0])
    sent = fleet.meter(ids[0])
    assert doc["metadata"]["last_seq"] <= sent.seq
    assert doc["state"]["reported"]["online"] is True
    assert doc["state"]["reported"]["measurement"]["import_kwh"] >= 0


def test_read_from_cache_then_from_meter(stack: EmbeddedStack, meters: tuple[list[str], FleetThread]) -> None:
    ids, fleet = meters
    meter = ids[0]
    wait_for(lambda: twin(stack, meter)["metadata"]["last_seq"] >= 1)
    utility = stack.token("utility")
    cached = stack.call("edge", "edge-read", "GET", f"/meters/{meter}/reading", token=utility,
                        params={"max_age": "60"})
    assert cached.json()["source"] == "cache"
    assert cached.headers["x-twin-source"] == "cache"
    answered_before = fleet.meter(meter).reads_answered
    live = stack.call("edge", "edge-read", "GET", f"/meters/{meter}/reading", token=utility,
                      params={"live": "true", "timeout": "5"})
    assert live.status_code == 200, live.text
    assert live.json()["source"] == "meter"
    wait_for(lambda: fleet.meter(meter).reads_answered == answered_before + 1)
    # max_age=0 forces the meter path too; the answer refreshed the cache.
    stale_ok = stack.call("edge", "edge-read", "GET", f"/meters/{meter}/reading", token=utility,
                          params={"max_age": "0", "timeout": "5"})
    assert stale_ok.json()["source"] == "meter"


def test_read_of_an_offline_meter_times_out_with_the_stale_value(
    stack: EmbeddedStack, meters: tuple[list[str], FleetThread]
) -> None:
    ids, fleet = meters
    meter = ids[1]
    wait_for(lambda: twin(stack, meter)["metadata"]["last_seq"] >= 1)
    fleet.go_offline(meter, 30)
    resp = stack.call("edge", "edge-read", "GET", f"/meters/{meter}/reading", token=stack.token("utility"),
                      params={"live": "true", "timeout": "0.5"})
    assert resp.status_code == 504
    body = resp.json()
    assert body["details"] == {"meter_id": meter, "timeout_s": 0.5}
    assert body["stale"]["stale"] is True
    fleet.go_online(meter)


def test_commands_are_acknowledged_by_the_meter(
    stack: EmbeddedStack, meters: tuple[list[str], FleetThread]
) -> None:
    ids, fleet = meters
    meter = ids[0]
    utility = stack.token("utility")
    ok = stack.call("edge", "edge-write", "POST", f"/meters/{meter}/commands", token=utility,
                    json={"kind": "relay", "params": {"state": "open"}})
    assert ok.status_code == 202
    ok_id = ok.json()["command"]["id"]
    wait_for(lambda: command_status(stack, meter, ok_id) == "acknowledged")
    assert fleet.meter(meter).commands_applied >= 1
    wait_for(lambda: twin(stack, meter)["state"]["reported"].get("relay") == "open")
    tariff = stack.call("edge", "edge-write", "POST", f"/meters/{meter}/commands", token=utility,
                        json={"kind": "tariff", "params": {"tariff_id": "tou-7", "periods": [
                            {"name": "peak", "start": "17:00", "price": 0.42}]}})
    tariff_id = tariff.json()["command"]["id"]
    wait_for(lambda: command_status(stack, meter, tariff_id) == "acknowledged")
    wait_for(lambda: twin(stack, meter)["state"]["reported"].get("tariff_id") == "tou-7")


def test_desired_state_reaches_the_meter_and_the_delta_clears(
    stack: EmbeddedStack, meters: tuple[list[str], FleetThread]
) -> None:
    ids, _fleet = meters
    meter = ids[2]
    utility = stack.token("utility")
    version = twin(stack, meter)["version"]
    resp = stack.call("edge", "edge-write", "PATCH", f"/meters/{meter}/desired", token=utility,
                      json={"load_limit_w": 2500.0}, headers={"If-Match": f'"{version}"'})
    assert resp.status_code == 202, resp.text
    wait_for(lambda: twin(stack, meter)["state"]["delta"] == {})
    assert twin(stack, meter)["state"]["reported"]["load_limit_w"] == 2500.0
    stale = stack.call("edge", "edge-write", "PATCH", f"/meters/{meter}/desired", token=utility,
                       json={"load_limit_w": 100.0}, headers={"If-Match": f'"{version}"'})
    assert stale.status_code == 412


def test_command_to_an_offline_meter_is_applied_on_reconnect(
    stack: EmbeddedStack, meters: tuple[list[str], FleetThread]
) -> None:
    ids, fleet = meters
    meter = ids[1]
    fleet.go_offline(meter, 60)
    wait_for(lambda: not fleet.meter(meter).connected)
    resp = stack.call("edge", "edge-write", "POST", f"/meters/{meter}/commands", token=stack.token("utility"),
                      json={"kind": "reporting_interval", "params": {"seconds": 30}, "expiry_s": 120})
    command_id = resp.json()["command"]["id"]
    assert command_status(stack, meter, command_id) == "delivered"
    seq_before = fleet.meter(meter).seq
    fleet.go_online(meter)
    wait_for(lambda: command_status(stack, meter, command_id) == "acknowledged")
    # Readings measured while offline arrive too: the twin's last sequence catches up.
    wait_for(lambda: twin(stack, meter)["metadata"]["last_seq"] >= seq_before)


def test_command_to_a_meter_that_stays_offline_expires(
    stack: EmbeddedStack, meters: tuple[list[str], FleetThread]
) -> None:
    ids, fleet = meters
    meter = ids[2]
    fleet.go_offline(meter, 60)
    wait_for(lambda: not fleet.meter(meter).connected)
    resp = stack.call("edge", "edge-write", "POST", f"/meters/{meter}/commands", token=stack.token("utility"),
                      json={"kind": "relay", "params": {"state": "closed"}, "expiry_s": 1})
    command_id = resp.json()["command"]["id"]
    wait_for(lambda: command_status(stack, meter, command_id) == "expired", timeout_s=5)
    fleet.go_online(meter)
    # The broker dropped the expired message: the meter never applies it.
    wait_for(lambda: fleet.meter(meter).connected)
    assert command_status(stack, meter, command_id) == "expired"


def test_forward_both_ways(stack: EmbeddedStack, meters: tuple[list[str], FleetThread]) -> None:
    ids, fleet = meters
    meter = ids[0]
    ems = stack.token("ems", meter=meter)
    route = stack.call("edge", "edge-forward", "PUT", f"/meters/{meter}/ems/route", token=ems, json={"kind": "mqtt"})
    assert route.status_code == 200
    down = stack.call("edge", "edge-forward", "POST", f"/meters/{meter}/ems/messages", token=ems,
                      json={"payload": {"set": "eco"}})
    assert down.status_code == 202
    wait_for(lambda: fleet.ems_inbox(meter))
    message_id = fleet.send_ems(meter, {"pv_w": 900})

    def delivered() -> bool:
        log = stack.call("edge", "edge-forward", "GET", f"/meters/{meter}/ems/messages", token=ems).json()
        return any(m["id"] == message_id and m["status"] == "delivered" for m in log["messages"])

    wait_for(delivered)


def test_gateway_rejects_oversized_bodies_before_the_function(stack: EmbeddedStack) -> None:
    resp = stack.call("edge", "edge-registry", "POST", "/meters", token=stack.token("admin"),
                      content=b"x" * 2_000_000, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413
    assert "2000000" in resp.json()["message"]
