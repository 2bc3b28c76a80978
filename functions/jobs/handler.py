"""Bulk jobs (``metertwin.jobs``): one action on many twins, paced, tracked per twin, resumable.

Routes (after ``/function/<zone>-jobs``):

* ``POST /jobs`` ``{"target": {"filter": {...}} | {"meters": [...]}, "action": {"type": ...},
  "rollout": {"rate_per_s", "max_in_flight", "timeout_s", "abort": {"failed_percent", "min_executed"}},
  "description"?}`` — 201 with the job (its target set snapshotted, a first slice run).
  Utility, admin and service tokens.
* ``GET /jobs?limit=``, ``GET /jobs/{job_id}`` — state and progress counts (also billing, mdms).
* ``GET /jobs/{job_id}/executions?status=&limit=&cursor=`` — per-twin status and reason, by meter id.
* ``POST /jobs/{job_id}/pause|resume|cancel`` ``{"reason"?}``; ``POST /jobs/{job_id}/advance``
  ``{"budget_s"?}`` — one slice now (the CLI's ``follow``).
* ``POST /`` from the cron connector — one slice of every active job.
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from metertwin.core.clients import get_redis
from metertwin.core.errors import InvalidInput
from metertwin.core.http import METER_ID_RE, Context, Event, Request, Response, Router, json_response, query_float
from metertwin.jobs.service import job_service
from metertwin.jobs.spec import JobSpec

router = Router()
CREATORS = {"utility", "admin", "service"}
READERS = CREATORS | {"billing", "mdms"}

OPENAPI_PATHS: dict[str, Any] = {
    "/jobs": {"post": {"summary": "Create a bulk job: target (filter or meters), action, rollout"},
              "get": {"summary": "Jobs, newest first, with progress counts"}},
    "/jobs/{job_id}": {"get": {"summary": "A job's state and progress counts"}},
    "/jobs/{job_id}/executions": {"get": {
        "summary": "Per-twin executions (status, reason), by meter id, with a cursor",
        "parameters": [{"name": "status", "in": "query", "schema": {"type": "string"}},
                       {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                       {"name": "cursor", "in": "query", "schema": {"type": "string"}}]}},
    **{f"/jobs/{{job_id}}/{what}": {"post": {"summary": f"{what.capitalize()} the job"}}
       for what in ("pause", "resume", "cancel", "advance")},
}


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=300)


class Advance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budget_s: float = Field(default=1.0, gt=0, le=25, allow_inf_nan=False)


def _optional(req: Request, model: type[BaseModel]) -> Any:
    return req.json(model) if req.event.body.strip() else model()


def _actor(req: Request) -> str:
    return req.principal.subject if req.principal else "connector"


@router.post("/jobs", scopes=CREATORS)
def create(req: Request) -> Response:
    spec = req.json(JobSpec)
    return json_response(job_service(get_redis()).create(spec, actor=_actor(req)), 201)


@router.get("/jobs", scopes=READERS)
def list_jobs(req: Request) -> Response:
    limit = int(query_float(req.query, "limit", 50, lo=1, hi=500))
    return json_response({"jobs": job_service(get_redis()).list_jobs(limit)})


@router.get("/jobs/{job_id}", scopes=READERS)
def get_job(req: Request) -> Response:
    return json_response(job_service(get_redis()).status(req.params["job_id"]))


@router.get("/jobs/{job_id}/executions", scopes=READERS)
def executions(req: Request) -> Response:
    cursor = req.query.get("cursor") or ""
    if cursor and not METER_ID_RE.match(cursor):
        raise InvalidInput(f"query parameter cursor={cursor[:80]!r} is not a meter id (a page's next_cursor)",
                           field="cursor")
    limit = int(query_float(req.query, "limit", 100, lo=1, hi=1000))
    return json_response(job_service(get_redis()).executions(
        req.params["job_id"], status=req.query.get("status") or None, limit=limit, cursor=cursor))


@router.post("/jobs/{job_id}/pause", scopes=CREATORS)
def pause(req: Request) -> Response:
    return json_response(job_service(get_redis()).control(req.params["job_id"], "pause", _optional(req, Reason).reason))


@router.post("/jobs/{job_id}/resume", scopes=CREATORS)
def resume(req: Request) -> Response:
    return json_response(job_service(get_redis()).control(req.params["job_id"], "resume"))


@router.post("/jobs/{job_id}/cancel", scopes=CREATORS)
def cancel(req: Request) -> Response:
    return json_response(job_service(get_redis()).control(req.params["job_id"], "cancel",
                                                          _optional(req, Reason).reason))


@router.post("/jobs/{job_id}/advance", scopes=CREATORS)
def advance(req: Request) -> Response:
    return json_response(job_service(get_redis()).advance(req.params["job_id"], _optional(req, Advance).budget_s))


@router.post("/", scopes={"service"})
def connector(req: Request) -> Response:
    if req.header("X-Connector") != "cron-connector":
        raise InvalidInput("POST / is for the cron connector: expected X-Connector: cron-connector",
                           field="X-Connector")
    return json_response(job_service(get_redis()).advance_all())


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
