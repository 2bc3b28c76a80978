"""Jobs: create (snapshot the target set), advance in bounded slices, pause, resume, cancel, read.

**Target set.** A job's twins are fixed when it is created: the filter's matches are copied,
page by page in meter-id order, into the job's ``queued`` set (a crash mid-copy resumes from the
last page's cursor). A twin that matches the filter only after the job was created is *out*; a
twin that stops matching is still *in*. That makes a job auditable (its executions are the list
of what it was meant to do) and its counts exact.

**Runner.** Functions are stateless, so a job advances in slices (:meth:`JobService.advance`):
the create call runs a first one, the cron connector (``POST /`` of ``edge-jobs``, every second)
advances every active job, and ``POST /jobs/{id}/advance`` lets the CLI drive one. A slice reads
back the outcome of the twins in progress, then claims queued twins in one Lua script that keeps
the rate (token bucket, one second of burst) and ``max_in_flight``, and acts on them. Slices may
overlap: each twin is claimed once, atomically, before anything is done to it, so no twin runs
twice — also after a crash mid-slice (see :mod:`metertwin.jobs.actions`).
"""

from __future__ import annotations

import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import redis

from metertwin.core.clients import StrRedis
from metertwin.core.errors import BackendUnavailable, Conflict, InvalidInput, NotFound
from metertwin.fleet.search import fleet_search
from metertwin.jobs import actions, keys, scripts
from metertwin.jobs.spec import MAX_TARGETS, JobSpec
from metertwin.jobs.upgrade import UpgradeStep
from metertwin.stream import events

#: Twins acted on at once within a slice by the per-twin actions (a command goes to a claim's twins as one batch).
WORKERS = 16
SNAPSHOT_PAGE = 5_000
CLAIM_BATCH = 200
CHECK_BATCH = 2_000
CANCEL_BATCH = 5_000
ACTIVE_STATES = ("snapshotting", "running", "paused")
FINAL_STATES = ("completed", "cancelled", "aborted")


class InjectedCrash(BaseException):
    """Raised at a crash point (tests): like a process dying, nothing after it runs."""


class JobService:
    """The jobs of one zone's Redis."""

    def __init__(self, client: StrRedis) -> None:
        self.r = client
        self._snapshot = client.register_script(scripts.SNAPSHOT)
        self._claim = client.register_script(scripts.CLAIM)
        self._finish = client.register_script(scripts.FINISH)
        self._attach = client.register_script(scripts.ATTACH)
        self._state = client.register_script(scripts.STATE)
        self._finalize = client.register_script(scripts.FINALIZE)
        self.upgrades = UpgradeStep(client)
        #: Tests: raise :class:`InjectedCrash` after acting on this many twins in one slice.
        self.crash_after: int | None = None

    # ------------------------------------------------------------------ create
    def create(self, spec: JobSpec, *, actor: str, budget_s: float = 1.0) -> dict[str, Any]:
        action = spec.action.checked()
        query = spec.target.query() if spec.target.filter is not None else None
        if query is not None:
            first = fleet_search(self.r).run(replace(query, limit=1))
            if first.count > MAX_TARGETS:
                raise InvalidInput(f"target.filter matches {first.count} twins, more than the {MAX_TARGETS} a job "
                                   "may target: narrow the filter", field="target.filter")
        job_id = secrets.token_hex(8)
        now = time.time()
        ro = spec.rollout
        record = {
            "id": job_id, "spec": spec.model_dump_json(), "action": json.dumps(action), "actor": actor,
            "state": "snapshotting", "created_at": repr(now), "updated_at": repr(now), "rate": repr(ro.rate_per_s),
            "max_in_flight": str(ro.max_in_flight), "timeout_s": str(ro.timeout_s),
            "tokens": repr(max(1.0, ro.rate_per_s)),  # the bucket starts full: one second of rate
            "filled_at": repr(now), "total": "0", "snap_cursor": "",
            "abort_percent": repr(ro.abort.failed_percent) if ro.abort else "",
            "abort_min": str(ro.abort.min_executed) if ro.abort else "",
            **{f"n_{s}": "0" for s in keys.STATUSES},
        }
        self._do(lambda: self.r.hset(keys.job(job_id), mapping=record))
        self._do(lambda: self.r.zadd(keys.JOBS, {job_id: now}))
        pipe = self.r.pipeline(transaction=False)
        pipe.sadd(keys.ACTIVE, job_id)
        events.queue(self.r, pipe, events.job_event(job_id, "snapshotting", {}, change="created",
                                                    action=action["type"], actor=actor))
        self._do(pipe.execute)
        self._copy_targets(job_id, spec)
        self.advance(job_id, budget_s)
        return self.status(job_id)

    def _copy_targets(self, job_id: str, spec: JobSpec) -> None:
        """Copy the target set into ``queued`` from the stored cursor on (resumable), then run."""
        raw = self._do(lambda: self.r.hmget(keys.job(job_id), ("state", "snap_cursor")))
        if raw[0] != "snapshotting":
            return
        cursor = raw[1] or ""
        jk = scripts.job_keys(job_id)
        if spec.target.meters is not None:
            ids = sorted(set(spec.target.meters))
            start = next((i for i, m in enumerate(ids) if m > cursor), len(ids)) if cursor else 0
            for i in range(start, len(ids), SNAPSHOT_PAGE):
                page = ids[i:i + SNAPSHOT_PAGE]
                self._do(lambda p=page: self._snapshot(keys=jk, args=[p[-1], *p]))
        else:
            query = spec.target.query()
            search = fleet_search(self.r)
            page_size = MAX_TARGETS if query.live else SNAPSHOT_PAGE
            while True:
                found = search.run(replace(query, cursor=cursor, limit=page_size))
                got = [m["meter_id"] for m in found.meters]
                if got:
                    self._do(lambda p=got: self._snapshot(keys=jk, args=[p[-1], *p]))
                if not found.next_cursor:
                    break
                cursor = found.next_cursor
        self._do(lambda: self._state(keys=[keys.job(job_id)], args=["running", repr(time.time()), ""]))

    # ------------------------------------------------------------------ run
    def advance_all(self, budget_s: float = 0.8) -> dict[str, Any]:
        """The cron entry point: one slice of every active job."""
        ids = sorted(self._do(lambda: self.r.smembers(keys.ACTIVE)))
        share = budget_s / max(1, len(ids))
        out = {}
        for job_id in ids:
            try:
                out[job_id] = self.advance(job_id, share)["state"]
            except NotFound:
                self._do(lambda j=job_id: self.r.srem(keys.ACTIVE, j))
        return {"jobs": out}

    def advance(self, job_id: str, budget_s: float = 1.0) -> dict[str, Any]:
        """One bounded slice: outcomes of the twins in progress, then new claims while the rate allows."""
        deadline = time.monotonic() + budget_s
        doc = self._doc(job_id)
        if doc.get("finished_at"):
            return self.status(job_id)
        before = _counts(doc)
        slice_events: list[events.Event] = []
        spec = JobSpec.model_validate_json(doc["spec"])
        action = json.loads(doc["action"])
        if doc["state"] == "snapshotting":
            self._copy_targets(job_id, spec)
        state = self._check(job_id, action, slice_events)
        if action["type"] == "upgrade":
            state = self.upgrades.step(self, job_id, action, state)
        acted = 0
        while state == "running" and action["type"] != "upgrade" and time.monotonic() < deadline:
            claimed = self._do(lambda: self._claim(keys=scripts.job_keys(job_id), args=[repr(time.time()),
                                                                                         CLAIM_BATCH]))
            if not claimed:
                break
            timeout_s = int(doc["timeout_s"])
            if self.crash_after is not None and acted + len(claimed) > self.crash_after:
                for meter_id in claimed[:max(0, self.crash_after - acted)]:  # sent, not yet recorded
                    actions.run(self.r, action, job_id, meter_id, timeout_s)
                raise InjectedCrash(f"crash after {self.crash_after} twins")
            done = self._act(job_id, action, claimed, timeout_s)
            acted += len(claimed)
            state = self.finish(job_id, done, out=slice_events)
        if state in ("cancelled", "aborted"):
            self._cancel_queued(job_id, state, slice_events)
        ended, final, now_ended = self._do(lambda: self._finalize(keys=scripts.job_keys(job_id),
                                                                  args=[repr(time.time()), keys.RETENTION_S]))
        if ended:
            self._do(lambda: self.r.srem(keys.ACTIVE, job_id))
        status = self.status(job_id)
        counts = {s: int(status["progress"][s]) for s in keys.STATUSES}
        if now_ended and final == "completed":
            slice_events.append(events.job_event(job_id, "completed", counts, change="completed",
                                                 total=status["progress"]["total"]))
        elif counts != before:  # at most one progress event per slice, not per twin
            slice_events.append(events.job_event(job_id, str(final), counts, change="progress",
                                                 total=status["progress"]["total"]))
        events.emit(self.r, *slice_events)
        return status

    def _act(self, job_id: str, action: dict[str, Any], claimed: list[str], timeout_s: int
             ) -> list[tuple[str, str, str]]:
        """Act on the claimed twins (a command: one batch; other actions ``WORKERS`` at a time);
        records the commands sent and returns the twins already finished."""
        outcomes = actions.run_many(self.r, action, job_id, claimed, timeout_s, lambda f, ms: list(_pool().map(f, ms)))
        sent = [(m, o.ref) for m, o in zip(claimed, outcomes, strict=True) if o.status == "in_progress"]
        if sent:
            self.attach_many(job_id, sent)
        return [(m, o.status, o.reason) for m, o in zip(claimed, outcomes, strict=True) if o.status != "in_progress"]

    def _check(self, job_id: str, action: dict[str, Any], out: list[events.Event]) -> str:
        """Outcomes of the twins in progress; returns the job's state after them."""
        now = time.time()
        due = self._do(lambda: self.r.zrange(keys.deadlines(job_id), 0, CHECK_BATCH - 1, withscores=True))
        state = str(self._do(lambda: self.r.hget(keys.job(job_id), "state")))
        if not due or action["type"] == "upgrade":
            return state
        deadlines = {m: float(s) for m, s in due}
        execs = self._do(lambda: self.r.hmget(keys.executions(job_id), list(deadlines)))
        pending = [(m, _json(e).get("c")) for m, e in zip(deadlines, execs, strict=True)]
        if action["type"] in actions.COMMANDING:
            finished, found = actions.command_outcomes(self.r, job_id, pending, now, deadlines)
            if found:
                self.attach_many(job_id, found)
        else:  # an immediate action still in progress: the runner stopped between acting and recording
            finished = [(m, "timed_out", "outcome unknown: the runner stopped while acting on this twin; not "
                         "run again (a twin never runs twice)") for m, _ in pending if now >= deadlines[m]]
        return self.finish(job_id, finished, out=out) if finished else state

    def attach_many(self, job_id: str, refs: list[tuple[str, str]]) -> None:
        """Keep each ``(meter, command or operation id)`` on its in-progress execution."""
        self._do(lambda: self._attach(keys=scripts.job_keys(job_id), args=[x for pair in refs for x in pair]))

    def finish(self, job_id: str, done: list[tuple[str, str, str]], *, source: str = "in_progress",
               out: list[events.Event] | None = None) -> str:
        """Record final statuses (from ``source``); applies the abort rule; returns the job's state.

        The stream events (one ``job`` event per twin that moved, and the job's when this aborted
        it) go to ``out`` when given (the slice emits them at its end, in one round trip), else
        are emitted at once."""
        args: list[Any] = [repr(time.time()), source]
        for meter_id, status, reason in done:
            args += [meter_id, status, reason]
        reply = self._do(lambda: self._finish(keys=scripts.job_keys(job_id), args=args))
        state, aborted = str(reply[1]), int(reply[2])
        found = [events.job_execution(job_id, *done[int(i)]) for i in reply[3:]]
        if aborted:
            doc = self._do(lambda: self.r.hgetall(keys.job(job_id)))
            found.append(events.job_event(job_id, "aborted", _counts(doc), change="aborted",
                                          reason=doc.get("reason", "")))
        if out is None:
            events.emit(self.r, *found)
        else:
            out.extend(found)
        return state

    def _cancel_queued(self, job_id: str, state: str, out: list[events.Event]) -> None:
        reason = f"job {state} before this twin ran"
        while True:
            ids = self._do(lambda: self.r.zrange(keys.by_status(job_id, "queued"), 0, CANCEL_BATCH - 1))
            if not ids:
                return
            self.finish(job_id, [(m, "cancelled", reason) for m in ids], source="queued", out=out)
            events.emit(self.r, *out)  # per batch: a large cancel never holds every event in memory
            out.clear()

    # ------------------------------------------------------------------ control
    def control(self, job_id: str, what: str, reason: str | None = None) -> dict[str, Any]:
        """``pause``, ``resume`` or ``cancel``; a Conflict when the job's state does not allow it."""
        self._doc(job_id)
        changed, state = self._do(lambda: self._state(keys=[keys.job(job_id)],
                                                      args=[what, repr(time.time()), reason or ""]))
        if not changed:
            raise Conflict(f"job {job_id} is {state}: it cannot {what}", job_id=job_id, state=state)
        self.state_changed(job_id, str(state), {"pause": "paused", "resume": "resumed", "cancel": "cancelled"}[what],
                           reason)
        return self.advance(job_id, 0.2) if what != "pause" else self.status(job_id)

    def state_changed(self, job_id: str, state: str, change: str, reason: str | None = None) -> None:
        """Emit the job's event of a state change (``paused``, ``resumed``, ``cancelled``), with its counts."""
        doc = self._do(lambda: self.r.hgetall(keys.job(job_id)))
        events.emit(self.r, events.job_event(job_id, state, _counts(doc), change=change,
                                             **({"reason": reason} if reason else {})))

    # ------------------------------------------------------------------ read
    def _doc(self, job_id: str) -> dict[str, str]:
        doc: dict[str, str] = self._do(lambda: self.r.hgetall(keys.job(job_id)))
        if not doc:
            raise NotFound(f"job {job_id!r} not found", job_id=job_id)
        return doc

    def status(self, job_id: str) -> dict[str, Any]:
        doc = self._doc(job_id)
        counts = {s: int(doc.get(f"n_{s}") or 0) for s in keys.STATUSES}
        total = int(doc.get("total") or 0)
        finished = sum(counts[s] for s in ("succeeded", "failed", "rejected", "timed_out", "cancelled"))
        out: dict[str, Any] = {
            "id": job_id, "state": doc["state"], "actor": doc.get("actor"), "spec": json.loads(doc["spec"]),
            "created_at": float(doc["created_at"]), "updated_at": float(doc["updated_at"]),
            "finished_at": float(doc["finished_at"]) if doc.get("finished_at") else None,
            "progress": {"total": total, **counts, "finished": finished,
                         "percent_done": round(100.0 * finished / total, 2) if total else 0.0},
            "reason": doc.get("reason") or None,
        }
        if doc.get("upgrade_op"):
            out["upgrade_operation"] = doc["upgrade_op"]
        return out

    def list_jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        ids = self._do(lambda: self.r.zrevrange(keys.JOBS, 0, limit - 1))
        out = []
        for job_id in ids:
            try:
                out.append(self.status(job_id))
            except NotFound:
                continue  # aged out
        return out

    def executions(self, job_id: str, *, status: str | None = None, limit: int = 100,
                   cursor: str = "") -> dict[str, Any]:
        """Executions ordered by meter id, optionally of one status, ``limit`` after ``cursor``."""
        self._doc(job_id)
        if status is not None and status not in keys.STATUSES:
            raise InvalidInput(f"query parameter status={status!r} is not one of {list(keys.STATUSES)}",
                               field="status")
        start = f"({cursor}" if cursor else "-"
        sets = [status] if status else list(keys.STATUSES)
        ids: list[str] = []
        for s in sets:  # every meter is in exactly one status set: merge them in id order
            ids += self._do(lambda s=s: self.r.zrange(keys.by_status(job_id, s), start, "+", bylex=True,
                                                      offset=0, num=limit + 1))
        ids = sorted(ids)[:limit + 1]
        more = len(ids) > limit
        ids = ids[:limit]
        raw = self._do(lambda: self.r.hmget(keys.executions(job_id), ids)) if ids else []
        items = [_public(m, _json(e)) for m, e in zip(ids, raw, strict=True)]
        return {"job_id": job_id, "executions": items, "next_cursor": ids[-1] if more else None}

    @staticmethod
    def _do(fn: Any) -> Any:
        try:
            return fn()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable for jobs: {exc}") from exc


def _counts(doc: dict[str, str]) -> dict[str, int]:
    return {s: int(doc.get(f"n_{s}") or 0) for s in keys.STATUSES}


def _json(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {"s": None, "r": "stored execution does not parse"}
    return value if isinstance(value, dict) else {}


def _public(meter_id: str, e: dict[str, Any]) -> dict[str, Any]:
    return {"meter_id": meter_id, "status": e.get("s"), "reason": e.get("r"), "ref": e.get("c"),
            "started_at": e.get("t0"), "ended_at": e.get("t1")}


_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="job-action")
    return _executor


_services: dict[int, JobService] = {}


def job_service(client: StrRedis) -> JobService:
    """The :class:`JobService` of ``client``, built once (it registers its Lua scripts)."""
    s = _services.get(id(client))
    if s is None or s.r is not client:
        s = _services[id(client)] = JobService(client)
    return s
