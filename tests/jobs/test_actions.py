"""Each kind of job action through its owner's path, the upgrade hand-over, and the cron slice."""

from __future__ import annotations

import time
from collections.abc import Callable

from metertwin.core.clients import get_redis
from metertwin.dr.store import DrStore
from metertwin.fleet.topology import topology_store
from metertwin.jobs import keys as jobs_keys
from metertwin.jobs.service import job_service
from metertwin.twin.state import twin_store
from tests.fleet.helpers import token
from tests.invoke import call
from tests.jobs.helpers import ack_all_in_progress, advance, create, execs, grid, jobs
from tests.upgrade.upgrade_fixtures import Meters, bound, manager, meters, twins

__all__ = ["meters", "twins"]  # fixtures: imported for pytest


def test_desired_patch_records_the_twin_and_waits_for_the_ack(env: dict[str, str], meter_id: str) -> None:
    ids = grid(meter_id, 3)
    code, job = create({"target": {"meters": ids}, "action": {"type": "desired", "fields": {"load_limit_w": 3000}},
                        "rollout": {"rate_per_s": 100}})
    assert code == 201, job
    assert job["progress"]["in_progress"] == 3
    assert all(twin_store(get_redis()).get(m).desired["load_limit_w"][0] == 3000 for m in ids)
    ack_all_in_progress(job["id"])
    assert advance(job["id"])["progress"]["succeeded"] == 3


def test_topology_patch_moves_a_feeder_and_conflicts_are_rejected(env: dict[str, str], meter_id: str) -> None:
    ids = grid(meter_id, 4)
    code, job = create({"target": {"filter": {"feeder": "f1"}},
                        "action": {"type": "topology", "patch": {"groups": ["pilot"], "tariff": "tou"}},
                        "rollout": {"rate_per_s": 100}})
    assert code == 201, job
    assert job["state"] == "completed"
    assert job["progress"]["succeeded"] == 2
    assert topology_store(get_redis()).get(ids[1])["groups"] == ["pilot"]
    # a transformer that belongs to another feeder: the topology refuses, the execution is rejected
    code, job = create({"target": {"meters": [ids[0]]}, "action": {"type": "topology",
                                                                    "patch": {"transformer": "f1t0"}}})
    assert job["progress"]["rejected"] == 1
    assert "f1" in execs(job["id"], "rejected")[0]["reason"]


def test_dr_preferences_are_set(env: dict[str, str], meter_id: str) -> None:
    ids = grid(meter_id, 2)
    code, job = create({"target": {"meters": ids}, "action": {"type": "dr_preferences",
                                                              "preferences": {"opt_out": True}}}, "admin")
    assert code == 201, job
    assert job["progress"]["succeeded"] == 2
    assert all(DrStore(get_redis()).preferences(m).opt_out for m in ids)


def test_upgrade_is_handed_to_the_upgrade_manager(twins: Callable[[int], list[str]], meters: Meters) -> None:
    ids = twins(4)
    service = job_service(get_redis())
    service.upgrades._manager = manager(meters)  # the test's meters answer the rebinds
    code, job = create({"target": {"meters": ids}, "action": {"type": "upgrade", "upgrade": {
        "to": "v2", "drain_s": 0, "resend_after_s": 0.1}}, "rollout": {"rate_per_s": 100}})
    assert code == 201, job
    op_id = job["upgrade_operation"]
    assert service.upgrades.manager.get(op_id).spec.select.meters == sorted(ids)
    deadline = time.time() + 20
    while (state := advance(job["id"]))["state"] != "completed":
        assert time.time() < deadline, state
    assert state["progress"]["succeeded"] == 4
    assert all(bound(m) == "v2" for m in ids)
    assert {e["ref"] for e in execs(job["id"])} == {op_id}


def test_an_upgrade_the_manager_refuses_cancels_the_job(env: dict[str, str], meter_id: str) -> None:
    ids = grid(meter_id, 2)
    code, job = create({"target": {"meters": ids}, "action": {"type": "upgrade", "upgrade": {"to": "v9"}}})
    assert code == 201, job
    assert job["state"] == "cancelled"
    assert "v9" in job["reason"]
    assert job["progress"]["cancelled"] == 2


def test_cron_slice_advances_every_active_job(env: dict[str, str], meter_id: str) -> None:
    ids = grid(meter_id, 6)
    r = get_redis()
    code, job = create({"target": {"meters": ids}, "action": {"type": "topology", "patch": {"tariff": "flat"}},
                        "rollout": {"rate_per_s": 0.001}})  # the create slice does one twin
    assert job["progress"]["succeeded"] == 1
    r.hset(jobs_keys.job(job["id"]), mapping={"rate": "1000", "tokens": "1000"})
    code, answer = call(jobs, "POST", "/", token=token("service"), headers={"X-Connector": "cron-connector"})
    assert code == 200, answer
    assert answer["jobs"][job["id"]] == "completed"
    code, answer = call(jobs, "POST", "/", token=token("service"))
    assert code == 400
    assert "X-Connector" in answer["message"]
