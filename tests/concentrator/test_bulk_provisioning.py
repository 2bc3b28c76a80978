"""Provisioning at scale (``POST /concentrators/{id}/twins``) against the real Mosquitto and Redis: thousands
of twins behind concentrators with one role rewrite per call, no broker account per meter; the ACL
confines the concentrator to them; a repeated call repairs, a twin elsewhere is a conflict."""

from __future__ import annotations

import uuid

from metertwin.core import topics
from metertwin.core.clients import get_redis
from metertwin.fleet.topology import topology_store
from metertwin.twin import keys
from metertwin.twin.dynsec import concentrator_role
from storage.embedded import Mosquitto
from tests.concentrator.support import Device, batch, connector_call, ingest, provision, reading, registry, token
from tests.invoke import call


def _new_dcu() -> tuple[str, dict[str, str]]:
    dcu = f"dcu-{uuid.uuid4().hex[:8]}"
    status, created = call(registry, "POST", "/concentrators", body={"concentrator_id": dcu}, token=token("admin"))
    assert status == 201, created
    return dcu, created


def _twins(dcu: str, meters: list[dict[str, object]]) -> tuple[int, dict[str, object]]:
    status, body = call(registry, "POST", f"/concentrators/{dcu}/twins", body={"meters": meters},
                        token=token("admin"))
    return status, body


def test_thousands_of_twins_behind_concentrators_in_one_call_each(env: dict[str, str], mosquitto: Mosquitto) -> None:
    tag = uuid.uuid4().hex[:6]
    dcus = [_new_dcu() for _ in range(2)]
    per = 2000
    for k, (dcu, _creds) in enumerate(dcus):
        meters: list[dict[str, object]] = [{"meter_id": f"bp-{tag}-{k}-{i:05d}"} for i in range(per)]
        meters[0]["profile"] = {"kind": "prosumer", "pv_kwp": 5.0, "feeder": f"f-{tag}"}
        status, body = _twins(dcu, meters)
        assert status == 201, body
        assert (body["created"], body["existing"], body["conflicts"]) == (per, 0, [])
    r = get_redis()
    first = f"bp-{tag}-0-00000"
    assert r.hget(keys.twin(first), keys.ROUTE_FIELD) == dcus[0][0]
    assert r.sismember(keys.TWIN_INDEX, f"bp-{tag}-1-01999")
    assert r.scard(keys.concentrator_meters(dcus[1][0])) == per
    doc = topology_store(r).get(first)
    assert doc is not None
    assert doc["feeder"] == f"f-{tag}"
    # One role per concentrator holds its relays; no meter got an account of its own.
    role = mosquitto.control([{"command": "getRole", "rolename": concentrator_role(dcus[0][0])}])[0]
    relays = [a["topic"] for a in role["data"]["role"]["acls"] if a["topic"].startswith("meters/")]
    assert len(relays) == per
    clients = mosquitto.control([{"command": "listClients", "count": 100_000}])[0]["data"]["clients"]
    assert first not in clients
    # The broker lets the concentrator publish for its meters only; its batch is applied.
    dcu0, creds0 = dcus[0]
    device = Device(mosquitto, creds0["username"], creds0["password"])
    try:
        assert not device.publish(topics.command_acks(first), b"{}").is_failure
        assert device.publish(topics.command_acks(f"bp-{tag}-1-00000"), b"{}").is_failure  # the other's
    finally:
        device.close()
    status, body = connector_call(ingest, topics.concentrator_readings(dcu0),
                                  batch(*({"meter_id": f"bp-{tag}-0-{i:05d}", **reading(1)} for i in range(100))))
    assert status == 200, body
    assert body["applied"] == 100, body


def test_a_repeated_call_repairs_and_a_twin_elsewhere_is_a_conflict(env: dict[str, str], mosquitto: Mosquitto) -> None:
    tag = uuid.uuid4().hex[:6]
    dcu, _ = _new_dcu()
    direct = f"bp-{tag}-direct"
    provision([direct])
    ids = [f"bp-{tag}-{i}" for i in range(3)]
    status, body = _twins(dcu, [{"meter_id": m} for m in ids[:2]])
    assert status == 201, body
    assert body["created"] == 2
    get_redis().srem(keys.TWIN_INDEX, ids[0])  # as if the first call died before indexing
    status, body = _twins(dcu, [{"meter_id": m} for m in [*ids, direct]])
    assert status == 201, body
    assert (body["created"], body["existing"]) == (1, 2)
    assert [c["meter_id"] for c in body["conflicts"]] == [direct]
    assert "direct" in body["conflicts"][0]["error"]
    assert get_redis().sismember(keys.TWIN_INDEX, ids[0])
    assert get_redis().hget(keys.twin(direct), keys.ROUTE_FIELD) is None


def test_bad_requests_name_the_bad_value(env: dict[str, str], mosquitto: Mosquitto) -> None:
    dcu, _ = _new_dcu()
    status, body = _twins(dcu, [{"meter_id": "a1"}, {"meter_id": "a1"}])
    assert status == 400, body
    assert "'a1'" in body["message"]
    status, body = _twins("no-such-dcu", [{"meter_id": "a2"}])
    assert status == 404, body
    assert "no-such-dcu" in body["message"]
    status, body = _twins(dcu, [{"meter_id": "bad id!"}])
    assert status == 400, body
