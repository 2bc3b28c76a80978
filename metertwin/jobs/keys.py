"""Redis keys of the jobs capability.

Every key of one job carries the job's hash tag ``{job:<id>}``, so each Lua script of a job
(claim, finish, state change) touches one Redis Cluster slot. The zone-wide list of jobs and the
set of active ones are single keys of their own, written apart from the job's keys (the job's
record first, then the index: a crash in between leaves an unlisted job that nobody runs).
"""

from __future__ import annotations

from metertwin.core.keys import PREFIX

_BASE = f"{PREFIX}:job"

#: Sorted set: job id -> created at (epoch s); the ``GET /jobs`` listing, newest first.
JOBS = f"{_BASE}:index"
#: Set: ids of the jobs the runner still advances (snapshotting, running, paused, or draining).
ACTIVE = f"{_BASE}:active"
#: A finished job's keys live this long after it ends (the record stays listable meanwhile).
RETENTION_S = 30 * 86_400

STATUSES = ("queued", "in_progress", "succeeded", "failed", "rejected", "timed_out", "cancelled")


def _tag(job_id: str) -> str:
    return f"{_BASE}:{{job:{job_id}}}"


def job(job_id: str) -> str:
    """Hash: the job's spec (JSON), state, counters per status, rate bucket, snapshot cursor."""
    return f"{_tag(job_id)}:doc"


def executions(job_id: str) -> str:
    """Hash: meter id -> its execution (JSON: status, reason, command id, started/ended at)."""
    return f"{_tag(job_id)}:exec"


def by_status(job_id: str, status: str) -> str:
    """Sorted set (scores 0, ordered by meter id): the meters whose execution has ``status``."""
    return f"{_tag(job_id)}:st:{status}"


def deadlines(job_id: str) -> str:
    """Sorted set: in-progress meter id -> the time its execution times out."""
    return f"{_tag(job_id)}:due"

