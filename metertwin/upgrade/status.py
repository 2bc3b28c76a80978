"""What an operator sees of an operation: progress, readings, blockers, and the canary's health.

The health verdict compares the gateway's metrics now with the snapshot taken when the
canary began (:mod:`metertwin.upgrade.health`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from metertwin.core.errors import MeterTwinError, NotFound
from metertwin.core.settings import get_settings
from metertwin.upgrade import keys, twin_v2
from metertwin.upgrade.binding import binding_settings
from metertwin.upgrade.health import FunctionStats, Verdict, canary_functions, judge, parse_metrics
from metertwin.upgrade.spec import MAX_FAILURE_DETAILS, TERMINAL, Operation
from metertwin.upgrade.store import OperationStore

log = logging.getLogger("metertwin.upgrade")


#: At most this many canary twins are asked what the new release applied to them.
CANARY_SAMPLE = 1000


class OperationStatus(OperationStore):
    """Status documents of operations, and the canary's health."""

    def list_ops(self, limit: int = 50) -> list[dict[str, Any]]:
        ids = self._call(lambda: self.r.zrevrange(keys.UPGRADE_OPS, 0, max(0, limit - 1)))
        out = []
        for op_id in ids:
            try:
                out.append(self.status(op_id, health=False))
            except NotFound:
                continue
        return out

    def status(self, op_id: str, *, health: bool = True) -> dict[str, Any]:
        """Everything an operator wants to see: state, progress, readings, blockers, health."""
        op = self.get(op_id)
        counts = self.counts(op_id)
        selected = int(op.num("selected"))
        finished = counts["done"] + counts["skipped"] + counts["failed"]
        started = op.num("started_at") or op.num("created_at")
        elapsed = max(1e-9, (op.num("completed_at") or time.time()) - started)
        rate = counts["done"] / elapsed if counts["done"] else 0.0
        remaining = max(0, selected - finished)
        body: dict[str, Any] = {
            "id": op.id, "state": op.state, "from": op.spec.source, "to": op.spec.to,
            "spec": op.spec.model_dump(by_alias=True, exclude_none=True),
            "created_at": op.num("created_at"), "updated_at": op.num("updated_at"),
            "completed_at": op.num("completed_at") or None,
            "progress": {
                "selected": selected, "canary": int(op.num("canary_size")), "admitted": int(op.num("admitted")),
                **counts, "percent_done": round(100.0 * finished / selected, 2) if selected else 0.0,
                "rate_per_s": round(rate, 2), "eta_s": round(remaining / rate, 1) if rate else None,
                "unconfirmed": int(op.num("unconfirmed")),
            },
            "readings": {
                "applied_by_old": int(op.num("readings_old")), "applied_by_new": int(op.num("readings_new")),
                "missing": int(op.num("readings_missing")),
            },
            "blockers": self.blockers(op, counts),
        }
        if op.raw.get("reason"):
            body["reason"] = op.raw["reason"]
        if op.raw.get("resume_to"):
            body["resume_to"] = op.raw["resume_to"]
        failures = self._call(lambda: self.r.hgetall(keys.upgrade_op_set(op_id, "failures")))
        if failures:
            body["failures"] = dict(sorted(failures.items())[:MAX_FAILURE_DETAILS])
        if health and op.raw.get("metrics_snapshot"):
            try:
                body["health"] = self.health(op).to_dict()
            except MeterTwinError as exc:
                body["health"] = {"status": "unknown", "reasons": [exc.message]}
        return body

    def blockers(self, op: Operation, counts: dict[str, int]) -> list[str]:
        """Why the operation is not moving on, in words an operator can act on."""
        out: list[str] = []
        state = op.state
        if state == "paused":
            out.append(f"paused ({op.raw.get('reason') or 'by the operator'}); resume to continue "
                       f"({op.raw.get('resume_to')})")
        if state == "observing":
            out.append(f"canary of {int(op.num('canary_size'))} meters done: promote to continue, or roll back"
                       + (f" ({self._auto_promote_wait(op)})" if op.spec.auto_promote else ""))
        unconfirmed = int(op.num("unconfirmed"))
        if unconfirmed and state not in TERMINAL:
            out.append(f"{unconfirmed} meters have not confirmed the rebind after {op.spec.max_attempts} attempts: "
                       f"still served by {op.spec.source}, re-sent with backoff")
        if counts["failed"]:
            out.append(f"{counts['failed']} meters failed (see failures); they stay on their release")
        if counts["rb_confirming"]:
            out.append(f"{counts['rb_confirming']} rolled-back meters have not confirmed the rebind to "
                       f"{op.spec.source} yet (they are served by {op.spec.source} already)")
        if state in ("canary", "rolling_out") and counts["rebinding"] and not unconfirmed:
            out.append(f"{counts['rebinding']} meters: waiting for their rebind ack")
        return out

    @staticmethod
    def _auto_promote_wait(op: Operation) -> str:
        """What an auto-promoting canary waits for: the observation time, or the last health verdict."""
        if time.time() - op.num("observe_since") < op.spec.observe_s or not op.raw.get("health_status"):
            return f"auto-promote after the health check, once observed for {op.spec.observe_s:g} s"
        why = op.raw.get("health_reasons") or "no reason given"
        return f"auto-promote waiting: health {op.raw['health_status']}: {why}"

    def _snapshot_metrics(self, op: Operation) -> None:
        url = self.metrics_url(op)
        if url is None:
            return
        try:
            stats = parse_metrics(self._fetch_metrics(url))
        except MeterTwinError as exc:
            log.warning("no metrics snapshot for operation %s: %s", op.id, exc.message)
            return
        snap = {name: s.to_dict() for name, s in stats.items()}
        self._set(op.id, metrics_snapshot=json.dumps(snap), metrics_url=url)

    def metrics_url(self, op: Operation) -> str | None:
        if op.spec.metrics_url:
            return op.spec.metrics_url
        if op.raw.get("metrics_url"):
            return op.raw["metrics_url"]
        base = binding_settings().gateway_url
        return f"{base}/metrics" if base else None

    def health(self, op: Operation) -> Verdict:
        """The canary's verdict: the new release's functions against the old one's, since the canary began."""
        url = self.metrics_url(op)
        if url is None:
            return Verdict("insufficient", ["no metrics source: set GATEWAY_URL or metrics_url"], {}, {})
        before = {name: FunctionStats.from_dict(d) for name, d in json.loads(op.raw.get("metrics_snapshot")
                                                                             or "{}").items()}
        now = parse_metrics(self._fetch_metrics(url))
        fns = canary_functions(op.spec.source, op.spec.to, get_settings().zone)
        # The twins' own calls when no app reads them: what v2 applied to the switched canary twins
        # (a sample of at most CANARY_SAMPLE, so the count is a lower bound on a large canary).
        applied = 0
        if op.spec.to == "v2":
            applied = self._call(lambda: twin_v2.readings_applied(self.r, self._members(op.id, "done", CANARY_SAMPLE)))
        return judge(before, now, fns.candidate, fns.baseline, op.spec.thresholds(), fns.internal, applied=applied)
