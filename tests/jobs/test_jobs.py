"""Bulk jobs against real Redis and Mosquitto: targets, pacing, acks, abort, control, crash and resume."""

from __future__ import annotations

import time

import pytest

from metertwin.core.clients import get_redis
from metertwin.jobs import keys as jobs_keys
from metertwin.jobs.service import InjectedCrash, JobService
from metertwin.twin import keys as twin_keys
from tests.fleet.helpers import token
from tests.invoke import call
from tests.jobs.helpers import ack, ack_all_in_progress, advance, create, execs, grid, jobs, relay_job


def test_filter_target_is_snapshotted_and_acks_complete_executions(env: dict[str, str], meter_id: str) -> None:
    ids = grid(meter_id, 12)
    job = relay_job({"filter": {"feeder": "f0"}}, rate_per_s=1000, max_in_flight=100)
    expect = sorted(ids[0::2])
    assert job["progress"]["total"] == 6
    # a twin that matches only after the job started is out
    grid(f"{meter_id}-late", 2, feeders=1)
    assert sorted(e["meter_id"] for e in execs(job["id"])) == expect
    assert job["progress"]["in_progress"] == 6
    assert job["state"] == "running"
    assert ack_all_in_progress(job["id"]) == 6
    done = advance(job["id"])
    assert done["state"] == "completed"
    assert done["progress"]["succeeded"] == 6
    assert done["finished_at"]
    assert {e["status"] for e in execs(job["id"])} == {"succeeded"}
    code, listed = call(jobs, "GET", "/jobs", token=token("mdms"))
    assert code == 200
    assert job["id"] in [j["id"] for j in listed["jobs"]]


def test_list_target_unknown_twin_fails_and_reject_is_recorded(env: dict[str, str], meter_id: str) -> None:
    ids = grid(meter_id, 3)
    job = relay_job({"meters": [*ids, f"{meter_id}-nope", ids[0]]}, rate_per_s=1000)
    assert job["progress"]["total"] == 4  # duplicates once
    failed = execs(job["id"], "failed")
    assert [e["meter_id"] for e in failed] == [f"{meter_id}-nope"]
    assert "no twin" in failed[0]["reason"]
    first, *rest = execs(job["id"], "in_progress")
    ack(first["meter_id"], first["ref"], "rejected", "relay stuck")
    for e in rest:
        ack(e["meter_id"], e["ref"])
    done = advance(job["id"])
    assert (done["progress"]["succeeded"], done["progress"]["rejected"], done["progress"]["failed"]) == (2, 1, 1)
    assert "relay stuck" in execs(job["id"], "rejected")[0]["reason"]


def test_max_in_flight_and_rate_are_kept(env: dict[str, str], meter_id: str) -> None:
    grid(meter_id, 20)
    job = relay_job({"filter": {}}, rate_per_s=1000, max_in_flight=3)
    for _ in range(3):
        state = advance(job["id"])
        assert state["progress"]["in_progress"] == 3
        assert state["progress"]["queued"] == 17
    ack_all_in_progress(job["id"])
    state = advance(job["id"])
    assert (state["progress"]["succeeded"], state["progress"]["in_progress"]) == (3, 3)
    # rate: never more claims than one token to start plus rate x elapsed
    started = time.time()
    slow = relay_job({"filter": {"feeder": "f1"}}, rate_per_s=2, max_in_flight=100)
    for _ in range(5):
        state = advance(slow["id"])
    claimed = state["progress"]["total"] - state["progress"]["queued"]
    assert 2 <= claimed <= 2 + 2 * (time.time() - started)  # one second of burst, then the rate


def test_abort_rule_cancels_the_rest(env: dict[str, str], meter_id: str) -> None:
    ids = grid(f"{meter_id}-z", 4)  # after the missing ones in meter-id order
    missing = [f"{meter_id}-x{i}" for i in range(6)]
    job = relay_job({"meters": missing + ids}, rate_per_s=1000, max_in_flight=4,
                    abort={"failed_percent": 50, "min_executed": 3})
    assert job["state"] == "aborted"
    assert "abort rule" in job["reason"]
    p = job["progress"]
    assert p["failed"] == 4
    assert p["cancelled"] == 6
    assert p["queued"] == 0
    assert p["in_progress"] == 0
    assert "aborted" in execs(job["id"], "cancelled")[0]["reason"]


def test_pause_resume_cancel(env: dict[str, str], meter_id: str) -> None:
    grid(meter_id, 10)
    job = relay_job({"filter": {}}, rate_per_s=1000, max_in_flight=2)
    code, paused = call(jobs, "POST", f"/jobs/{job['id']}/pause", token=token("admin"))
    assert code == 200
    assert paused["state"] == "paused"
    ack_all_in_progress(job["id"])
    state = advance(job["id"])
    assert (state["progress"]["succeeded"], state["progress"]["in_progress"]) == (2, 0)  # acks still count
    code, again = call(jobs, "POST", f"/jobs/{job['id']}/pause", token=token("admin"))
    assert code == 409
    assert "paused" in again["message"]
    code, resumed = call(jobs, "POST", f"/jobs/{job['id']}/resume", token=token("utility"))
    assert code == 200
    assert resumed["progress"]["in_progress"] == 2
    code, cancelled = call(jobs, "POST", f"/jobs/{job['id']}/cancel", body={"reason": "wrong feeder"},
                           token=token("utility"))
    assert code == 200
    assert cancelled["progress"]["cancelled"] == 6
    assert cancelled["state"] == "cancelled"
    ack_all_in_progress(job["id"])
    final = advance(job["id"])
    assert final["finished_at"]
    assert final["progress"]["succeeded"] == 4


def test_crash_mid_slice_then_resume_runs_no_twin_twice(env: dict[str, str], meter_id: str) -> None:
    ids = grid(meter_id, 10)
    job = relay_job({"filter": {}}, rate_per_s=0.001, max_in_flight=100, timeout_s=1)  # create claims 1
    ack_all_in_progress(job["id"])
    r = get_redis()
    r.hset(jobs_keys.job(job["id"]), mapping={"rate": "1000", "tokens": "1000"})
    crashing = JobService(r)
    crashing.crash_after = 4
    with pytest.raises(InjectedCrash):
        crashing.advance(job["id"], 2.0)
    fresh = JobService(r)  # the restarted gateway's function
    deadline = time.time() + 10
    while (state := fresh.advance(job["id"], 1.0))["progress"]["in_progress"]:
        ack_all_in_progress(job["id"])
        assert time.time() < deadline, state
    p = state["progress"]
    assert p["total"] == 10
    assert p["succeeded"] + p["timed_out"] == 10
    assert state["state"] == "completed"
    for meter_id_ in ids:  # every twin was sent at most one command
        assert r.zcard(twin_keys.command_log(meter_id_)) <= 1, meter_id_
    sent = sum(r.zcard(twin_keys.command_log(m)) for m in ids)
    assert sent == p["succeeded"]
    for e in execs(job["id"], "timed_out"):
        assert "never runs twice" in e["reason"]


@pytest.mark.parametrize(("body", "named"), [
    ({"target": {"filter": {"feeder": "bad!"}}, "action": {"type": "command", "kind": "relay",
                                                          "params": {"state": "open"}}}, "feeder"),
    ({"target": {"meters": ["m-1"]}, "action": {"type": "command", "kind": "relay",
                                                "params": {"state": "ajar"}}}, "ajar"),
    ({"target": {"meters": ["m-1"]}, "action": {"type": "command", "kind": "warp", "params": {}}}, "warp"),
    ({"target": {"meters": ["m-1"]}, "action": {"type": "desired", "fields": {"relay": "open"}},
      "rollout": {"rate_per_s": -1}}, "rate_per_s"),
    ({"target": {"meters": ["m-1"], "filter": {}}, "action": {"type": "topology", "patch": {"feeder": "f"}}},
     "exactly one"),
    ({"target": {"meters": ["m-1"]}, "action": {"type": "topology", "patch": {"phase": "Z"}}}, "phase"),
    ({"target": {"meters": ["m-1"]}, "action": {"type": "upgrade", "upgrade": {"to": "v2", "select": {}}}},
     "action.upgrade.select"),
    ({"target": {"filter": {"colour": "red"}}, "action": {"type": "dr_preferences", "preferences": {}}}, "colour"),
])
def test_bad_input_is_a_400_naming_it(env: dict[str, str], body: dict[str, object], named: str) -> None:
    code, answer = create(body)
    assert code == 400, answer
    assert named in answer["message"], answer


def test_scopes(env: dict[str, str], meter_id: str) -> None:
    body = {"target": {"meters": [meter_id]}, "action": {"type": "topology", "patch": {"feeder": "f9"}}}
    for scope in ("billing", "mdms"):
        assert create(body, scope)[0] == 403
    code, _ = call(jobs, "POST", "/jobs", body=body, token=token("consumer", meter=meter_id))
    assert code == 403
    assert call(jobs, "GET", "/jobs", token=token("consumer", meter=meter_id))[0] == 403
    assert create(body, "service")[0] == 201
