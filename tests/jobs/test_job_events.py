"""A job's state and progress, and each twin's execution end, appear in the zone's event stream
(docs/stream.md: ``job`` events, ``{"job", "status", "counts", ...}`` and ``{"job", "status", "reason"?}``)."""

from __future__ import annotations

import json
from typing import Any

from metertwin.core.clients import get_redis
from metertwin.stream import events, keys
from tests.fleet.helpers import token
from tests.invoke import call
from tests.jobs.helpers import ack_all_in_progress, advance, grid, jobs, relay_job

KEY = keys.zone_events("edge")


def job_events(job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(meter, topic, data) of the job's events, oldest first."""
    out = []
    for entry_id, fields in get_redis().xrange(KEY):
        e = events.Event.from_entry(entry_id, fields)
        data = json.loads(e.data)
        if e.type == events.JOB and data.get("job") == job_id:
            out.append((e.meter, e.topic, data))
    return out


def changes(job_id: str) -> list[str]:
    return [d["change"] for meter, _t, d in job_events(job_id) if not meter]


def test_created_progress_executions_and_completed(env: dict[str, str], meter_id: str) -> None:
    ids = grid(meter_id, 4)
    job = relay_job({"filter": {}}, rate_per_s=1000, max_in_flight=100)
    assert changes(job["id"]) == ["created", "progress"]  # one progress event for the create's slice
    _m, topic, created = job_events(job["id"])[0]
    assert topic == f"job/{job['id']}/snapshotting"
    assert (created["status"], created["action"], created["counts"]) == ("snapshotting", "command", {})
    progress = job_events(job["id"])[1][2]
    assert (progress["status"], progress["total"], progress["counts"]["in_progress"]) == ("running", 4, 4)
    advance(job["id"])  # nothing changed: no event
    assert changes(job["id"]) == ["created", "progress"]
    ack_all_in_progress(job["id"])
    advance(job["id"])
    assert changes(job["id"]) == ["created", "progress", "completed"]
    done = job_events(job["id"])
    executions = [(m, t, d) for m, t, d in done if m]
    assert sorted(m for m, _t, _d in executions) == sorted(ids)
    assert {d["status"] for _m, _t, d in executions} == {"succeeded"}
    assert executions[0][1] == f"meters/{executions[0][0]}/job/succeeded"
    assert done[-1][2]["counts"]["succeeded"] == 4
    assert done[-1][1] == f"job/{job['id']}/completed"


def test_pause_resume_cancel_and_cancelled_executions(env: dict[str, str], meter_id: str) -> None:
    grid(meter_id, 5)
    job = relay_job({"filter": {}}, rate_per_s=1000, max_in_flight=2)
    for what in ("pause", "resume"):
        code, _ = call(jobs, "POST", f"/jobs/{job['id']}/{what}", token=token("admin"))
        assert code == 200
    code, _ = call(jobs, "POST", f"/jobs/{job['id']}/cancel", body={"reason": "wrong feeder"}, token=token("admin"))
    assert code == 200
    seen = job_events(job["id"])
    # the cancel's slice cancels the queued twins: its progress event counts them
    assert [d["change"] for m, _t, d in seen if not m] == ["created", "progress", "paused", "resumed", "cancelled",
                                                           "progress"]
    assert seen[-1][2]["counts"]["cancelled"] == 3
    cancel = next(d for m, _t, d in seen if not m and d["change"] == "cancelled")
    assert (cancel["status"], cancel["reason"], cancel["counts"]["in_progress"]) == ("cancelled", "wrong feeder", 2)
    cancelled = [d for m, _t, d in seen if m]
    assert len(cancelled) == 3
    assert all(d["status"] == "cancelled" and "cancelled before this twin ran" in d["reason"] for d in cancelled)


def test_abort_is_an_event(env: dict[str, str], meter_id: str) -> None:
    missing = [f"{meter_id}-x{i}" for i in range(4)]
    job = relay_job({"meters": missing}, rate_per_s=1000, max_in_flight=4,
                    abort={"failed_percent": 50, "min_executed": 2})
    assert job["state"] == "aborted"
    seen = job_events(job["id"])
    aborted = [d for m, _t, d in seen if not m and d["change"] == "aborted"]
    assert len(aborted) == 1
    assert "abort rule" in aborted[0]["reason"]
    assert aborted[0]["counts"]["failed"] == 4
    assert {d["status"] for m, _t, d in seen if m} == {"failed"}
