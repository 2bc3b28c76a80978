"""The ``upgrade`` action: the job hands its target set to the upgrade manager (one operation).

There is no second implementation of an upgrade: the job starts one operation of
:class:`metertwin.upgrade.operations.UpgradeManager` whose selection is the job's snapshot, whose
pacing is the job's rollout (``rate_per_s`` -> ``rebind_rate_per_s``, ``max_in_flight``), and whose
``note`` is ``job:<id>`` (after a crash between starting it and recording its id, the job finds
its operation again by that note instead of starting a second one). While the operation runs,
its twins are in progress; each slice advances it a little (its own cron does, too). When it ends,
each twin is ``succeeded`` if it is bound to the target release, else ``failed`` with the
operation's state. Pause, resume, promote and roll back the operation itself with
``python -m metertwin_upgrade``; the job's ``timeout_s`` does not apply (the operation has its own).
If another upgrade operation is active, the job's twins stay queued and the job says why; if the
manager refuses the operation itself (e.g. an unknown release), the job is cancelled with its message.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from metertwin.core.clients import StrRedis
from metertwin.core.errors import Conflict, MeterTwinError
from metertwin.jobs import keys, scripts
from metertwin.upgrade.binding import bound_release
from metertwin.upgrade.operations import OperationSpec, UpgradeManager

if TYPE_CHECKING:
    from metertwin.jobs.service import JobService

TERMINAL = ("completed", "rolled_back")
HANDOVER_BATCH = 5_000


class UpgradeStep:
    def __init__(self, client: StrRedis) -> None:
        self.r = client
        self._manager: UpgradeManager | None = None

    @property
    def manager(self) -> UpgradeManager:
        if self._manager is None:
            self._manager = UpgradeManager(self.r)
        return self._manager

    def step(self, jobs: JobService, job_id: str, action: dict[str, Any], state: str) -> str:
        op_id = jobs._do(lambda: self.r.hget(keys.job(job_id), "upgrade_op"))
        if not op_id:
            if state != "running":
                return state
            op_id = self._start(jobs, job_id, action)
            if not op_id:  # waiting, or cancelled by the manager's refusal
                return str(jobs._do(lambda: self.r.hget(keys.job(job_id), "state")))
        while True:  # hand every queued twin over (idempotent: claims move each twin once)
            claimed = jobs._do(lambda: jobs._claim(keys=scripts.job_keys(job_id),
                                                   args=[repr(time.time()), HANDOVER_BATCH, "all"]))
            if claimed:
                jobs.attach_many(job_id, [(m, op_id) for m in claimed])
            if len(claimed) < HANDOVER_BATCH:
                break
        status = self.manager.advance(op_id, budget_s=0.5)
        if status["state"] not in TERMINAL:
            return state
        to = self.manager.get(op_id).spec.to
        while True:
            ids = jobs._do(lambda: self.r.zrange(keys.by_status(job_id, "in_progress"), 0, HANDOVER_BATCH - 1))
            if not ids:
                return state
            done = []
            for meter_id in ids:
                try:
                    bound = bound_release(self.r, meter_id)
                except MeterTwinError as exc:
                    done.append((meter_id, "failed", exc.message))
                    continue
                done.append((meter_id, "succeeded", f"bound to {to}") if bound == to else
                            (meter_id, "failed", f"upgrade operation {op_id} {status['state']}; twin bound to {bound}"))
            state = jobs.finish(job_id, done)

    def _start(self, jobs: JobService, job_id: str, action: dict[str, Any]) -> str | None:
        doc = jobs._do(lambda: self.r.hmget(keys.job(job_id), ("rate", "max_in_flight")))
        ids = jobs._do(lambda: self.r.zrange(keys.by_status(job_id, "queued"), 0, -1))
        if not ids:
            return None
        note = f"job:{job_id}"
        spec = OperationSpec.model_validate({
            **action["upgrade"], "select": {"meters": ids}, "rebind_rate_per_s": float(doc[0]),
            "max_in_flight": int(doc[1]), "note": note})
        try:
            op_id = str(self.manager.start(spec)["id"])
        except Conflict as exc:
            other = str(exc.details.get("blocking_op") or "")
            if not other or self.manager.get(other).spec.note != note:
                self._wait(jobs, job_id, exc.message)
                return None
            op_id = other
        except MeterTwinError as exc:  # refused for good (e.g. no such release): the job ends, nothing ran
            why = f"the upgrade manager refused: {exc.message}"
            changed, to = jobs._do(lambda: jobs._state(keys=[keys.job(job_id)],
                                                       args=["cancel", repr(time.time()), why]))
            if changed:
                jobs.state_changed(job_id, str(to), "cancelled", why)
            return None
        jobs._do(lambda: self.r.hset(keys.job(job_id), mapping={"upgrade_op": op_id, "reason": ""}))
        return op_id

    def _wait(self, jobs: JobService, job_id: str, why: str) -> None:
        jobs._do(lambda: self.r.hset(keys.job(job_id), "reason", f"waiting: {why}"))
