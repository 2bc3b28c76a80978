"""Topology at provisioning and with PATCH: versions, If-Match, audit, validation, the tree."""

from __future__ import annotations

from typing import Any

import redis

from metertwin.fleet import keys
from metertwin.fleet.topology import index_keys, topology_store
from tests.fleet.helpers import fleet, provision, registry, token
from tests.invoke import call

TOPO = {"region": "north", "substation": "s1", "feeder": "f1", "transformer": "t1", "phase": "B",
        "location": {"lat": 51.5, "lon": -0.12}, "tariff": "tou-1", "customer_class": "residential",
        "groups": ["pilot", "dr-east"], "tags": {"vendor": "acme"}}


def _get(meter_id: str) -> tuple[int, Any, dict[str, str]]:
    resp = fleet.handle(*_event("GET", f"/meters/{meter_id}/topology", token("mdms")))
    return resp["statusCode"], resp["body"], resp.get("headers", {})


def _event(method: str, path: str, tok: str, headers: dict[str, str] | None = None) -> tuple[Any, Any]:
    from starlette.datastructures import Headers

    from tests.invoke import Context, Event

    return Event(b"", Headers({"Authorization": f"Bearer {tok}", **(headers or {})}), method, path=path), Context()


def test_profile_topology_at_provisioning(env: dict[str, str], meter_id: str) -> None:
    provision([{"meter_id": meter_id, "profile": {"kind": "prosumer", "pv_kwp": 4.0, **TOPO}}])
    status, body = call(registry, "GET", f"/meters/{meter_id}", token=token("admin"))
    assert status == 200, body
    assert body["profile"] == {"kind": "prosumer", "pv_kwp": 4.0}  # topology is not copied into the profile
    assert body["topology"] == {**TOPO, "groups": ["dr-east", "pilot"], "zone": "edge"}
    status, doc, headers = _get(meter_id)
    assert status == 200
    assert doc["version"] == 1
    assert headers["ETag"] == '"1"'
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    for key in index_keys(doc["topology"]):
        assert meter_id in topology_store(r).index_members(key), key
    assert meter_id in topology_store(r).index_members(keys.index("group", "pilot"))
    assert meter_id in topology_store(r).index_members(keys.index("tag", "vendor=acme"))


def test_provisioning_without_topology_still_makes_a_fleet_record(env: dict[str, str], meter_id: str) -> None:
    provision([{"meter_id": meter_id}])
    status, doc, _ = _get(meter_id)
    assert (status, doc["version"], doc["topology"]) == (200, 1, {"zone": "edge"})


def test_bad_topology_names_field_and_value(env: dict[str, str], meter_id: str) -> None:
    status, body = call(registry, "POST", "/meters", token=token("admin"),
                        body={"meter_id": meter_id, "profile": {"phase": "D"}})
    assert status == 400, body
    assert "profile.phase" in body["message"], body
    assert '"D"' in body["message"], body
    status, body = call(registry, "POST", "/meters", token=token("admin"),
                        body={"meter_id": meter_id, "profile": {"groups": ["ok", "{slot}"]}})
    assert status == 400, body
    assert "'{slot}'" in body["message"], body
    provision([{"meter_id": meter_id}])
    for patch, needle in (({"feeder": "f 1!"}, "'f 1!'"), ({"location": {"lat": 91, "lon": 0}}, "location.lat"),
                          ({"tags": {"bad key": "x"}}, "'bad key'"), ({"colour": "red"}, "colour")):
        status, body = call(fleet, "PATCH", f"/meters/{meter_id}/topology", body=patch, token=token("utility"))
        assert status == 400, (patch, body)
        assert needle in body["message"], (patch, body)


def test_patch_is_versioned_merged_and_audited(env: dict[str, str], meter_id: str) -> None:
    provision([{"meter_id": meter_id, "profile": TOPO}])
    path = f"/meters/{meter_id}/topology"
    status, body = call(fleet, "PATCH", path, body={"transformer": "t2"}, token=token("utility"),
                        headers={"If-Match": '"7"'})
    assert status == 412, body
    assert body["details"]["current_version"] == 1, body
    status, body = call(fleet, "PATCH", path, token=token("utility"), headers={"If-Match": '"1"'},
                        body={"transformer": "t2", "tariff": None, "tags": {"vendor": None, "kind": "smart2"}})
    assert status == 200, body
    assert body["version"] == 2, body
    topo = body["topology"]
    assert topo["transformer"] == "t2"
    assert "tariff" not in topo
    assert topo["tags"] == {"kind": "smart2"}
    # the same patch again changes nothing: same version, no audit entry
    status, again = call(fleet, "PATCH", path, body={"transformer": "t2"}, token=token("utility"))
    assert (status, again["version"]) == (200, 2)
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    assert meter_id not in topology_store(r).index_members(keys.index("transformer", "t1"))
    assert meter_id in topology_store(r).index_members(keys.index("transformer", "t2"))
    assert not r.exists(keys.index("tariff", "tou-1"))
    status, hist = call(fleet, "GET", f"{path}/history", token=token("admin"))
    assert status == 200
    changes = hist["changes"]
    assert [c["new"]["v"] for c in changes] == [2, 1]
    assert changes[0]["actor"] == "tester"
    assert changes[0]["old"]["transformer"] == "t1"
    assert changes[1]["old"] is None
    status, _ = call(fleet, "PATCH", path, body={"feeder": "f9"}, token=token("billing"))
    assert status == 403


def test_tree_one_parent_per_node_while_meters_hang_below(env: dict[str, str], meter_id: str) -> None:
    a, b = f"{meter_id}-a", f"{meter_id}-b"
    provision([{"meter_id": a, "profile": {"feeder": "f1", "transformer": "t1"}},
               {"meter_id": b, "profile": {"feeder": "f1", "transformer": "t1"}}])
    status, body = call(fleet, "PATCH", f"/meters/{a}/topology", body={"feeder": "f2"}, token=token("utility"))
    assert status == 409, body
    assert "transformer 't1' belongs to feeder 'f1'" in body["message"], body
    # moving a meter to another transformer is an ordinary update
    status, body = call(fleet, "PATCH", f"/meters/{a}/topology", body={"transformer": "t7", "feeder": "f2"},
                        token=token("utility"))
    assert status == 200, body
    # the last meter below t1 may take it to another feeder
    status, body = call(fleet, "PATCH", f"/meters/{b}/topology", body={"feeder": "f3"}, token=token("utility"))
    assert status == 200, body
    status, body = call(registry, "POST", "/meters", token=token("admin"),
                        body={"meter_id": f"{meter_id}-c", "profile": {"feeder": "f1", "transformer": "t7"}})
    assert status == 409, body
    assert "belongs to feeder 'f2'" in body["message"], body
    status, _ = call(registry, "GET", f"/meters/{meter_id}-c", token=token("admin"))
    assert status == 404  # the twin of a refused topology is rolled back


def test_unknown_twin_and_removal(env: dict[str, str], meter_id: str) -> None:
    status, body = call(fleet, "PATCH", f"/meters/{meter_id}/topology", body={"feeder": "f1"}, token=token("admin"))
    assert status == 404, body
    status, body = _get(meter_id)[:2]
    assert status == 404
    provision([{"meter_id": meter_id, "profile": TOPO}])
    status, _ = call(registry, "DELETE", f"/meters/{meter_id}", token=token("admin"))
    assert status == 200
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    assert topology_store(r).get(meter_id) is None
    assert not r.exists(keys.index("feeder", "f1"))
    assert meter_id not in topology_store(r).all_meters()
