"""Shared helpers of the jobs tests: the edge-jobs handler, a grid of twins, acks through edge-write."""

from __future__ import annotations

import time
from typing import Any

from metertwin.core.clients import get_redis
from metertwin.jobs.service import job_service
from tests.fleet.helpers import provision, token
from tests.invoke import call, load_handler

jobs = load_handler("jobs")
write = load_handler("write")


def grid(prefix: str, n: int, feeders: int = 2) -> list[str]:
    """Provision n twins over ``feeders`` feeders (f0, f1, ...); returns their ids."""
    meters = [{"meter_id": f"{prefix}-{i:04d}",
               "profile": {"feeder": f"f{i % feeders}", "transformer": f"f{i % feeders}t{(i // feeders) % 2}"}}
              for i in range(n)]
    provision(meters)
    return [m["meter_id"] for m in meters]


def create(body: dict[str, Any], *scopes: str) -> tuple[int, Any]:
    return call(jobs, "POST", "/jobs", body=body, token=token(*(scopes or ("utility",))))


def relay_job(target: dict[str, Any], **rollout: Any) -> dict[str, Any]:
    status, body = create({"target": target, "action": {"type": "command", "kind": "relay",
                                                         "params": {"state": "open"}}, "rollout": rollout})
    assert status == 201, body
    return dict(body)


def execs(job_id: str, status: str | None = None) -> list[dict[str, Any]]:
    """Every execution (following the cursor), optionally of one status."""
    out: list[dict[str, Any]] = []
    cursor = ""
    while True:
        query = {"limit": "7", **({"cursor": cursor} if cursor else {}), **({"status": status} if status else {})}
        code, body = call(jobs, "GET", f"/jobs/{job_id}/executions", token=token("billing"), query=query)
        assert code == 200, body
        out += body["executions"]
        if not body["next_cursor"]:
            return out
        cursor = body["next_cursor"]


def ack(meter_id: str, command_id: str, status: str = "applied", reason: str | None = None) -> None:
    """The meter's ack, as the MQTT connector delivers it to edge-write."""
    body = {"id": command_id, "status": status, "ts": time.time(), **({"reason": reason} if reason else {})}
    code, answer = call(write, "POST", "/", body=body, token=token("service"),
                        headers={"X-Topic": f"meters/{meter_id}/up/ack"})
    assert code == 200, answer


def ack_all_in_progress(job_id: str, status: str = "applied") -> int:
    done = 0
    for e in execs(job_id, "in_progress"):
        if e["ref"]:
            ack(e["meter_id"], e["ref"], status)
            done += 1
    return done


def advance(job_id: str) -> dict[str, Any]:
    return job_service(get_redis()).advance(job_id, 2.0)
