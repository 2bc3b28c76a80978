"""Client of the edge zone's jobs function: bulk jobs over many twins (see docs/jobs.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from metertwin.client.transport import Api, paginate, route

Json = dict[str, Any]


@dataclass
class Jobs(Api):
    """``edge-jobs``: create a job (target, action, rollout), follow it, list its executions, control it."""

    function: str = "edge-jobs"

    @route("POST", "/jobs")
    def create(self, target: Json, action: Json, rollout: Json | None = None, *,
               description: str | None = None) -> Json:
        """``target``: ``{"filter": {...}}`` or ``{"meters": [...]}``; ``action``: ``{"type": ..., ...}``."""
        body: Json = {"target": target, "action": action, **({"rollout": rollout} if rollout else {}),
                      **({"description": description} if description else {})}
        return dict(self._call("POST", "/jobs", json=body))

    @route("GET", "/jobs")
    def list(self, *, limit: int | None = None) -> Json:
        return dict(self._call("GET", "/jobs", params={"limit": limit}))

    @route("GET", "/jobs/{job_id}")
    def get(self, job_id: str) -> Json:
        return dict(self._call("GET", f"/jobs/{job_id}"))

    @route("GET", "/jobs/{job_id}/executions")
    def executions(self, job_id: str, *, status: str | None = None, limit: int | None = None,
                   cursor: str | None = None) -> Json:
        """One page of per-twin executions (by meter id), optionally of one ``status``."""
        return dict(self._call("GET", f"/jobs/{job_id}/executions",
                               params={"status": status, "limit": limit, "cursor": cursor}))

    def iter_executions(self, job_id: str, *, status: str | None = None) -> Iterator[Any]:
        return paginate(lambda c: self.executions(job_id, status=status, cursor=c), "executions")

    @route("POST", "/jobs/{job_id}/pause")
    def pause(self, job_id: str, *, reason: str | None = None) -> Json:
        return dict(self._call("POST", f"/jobs/{job_id}/pause", json={"reason": reason} if reason else None))

    @route("POST", "/jobs/{job_id}/resume")
    def resume(self, job_id: str) -> Json:
        return dict(self._call("POST", f"/jobs/{job_id}/resume"))

    @route("POST", "/jobs/{job_id}/cancel")
    def cancel(self, job_id: str, *, reason: str | None = None) -> Json:
        return dict(self._call("POST", f"/jobs/{job_id}/cancel", json={"reason": reason} if reason else None))

    @route("POST", "/jobs/{job_id}/advance")
    def advance(self, job_id: str, *, budget_s: float = 1.0) -> Json:
        """One slice of the job now (what ``python -m metertwin.jobs follow`` does)."""
        return dict(self._call("POST", f"/jobs/{job_id}/advance", json={"budget_s": budget_s}))

    @route("POST", "/")
    def on_schedule(self) -> Json:
        """The cron connector's tick (``service`` with ``X-Connector: cron-connector``)."""
        return dict(self._call("POST", "/", json={}, headers={"X-Connector": "cron-connector"}))
