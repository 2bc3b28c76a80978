"""Rule evaluation: hysteresis, minimum duration, alerts (one open per rule and subject), actions.

``evaluate`` runs on the cron tick (``POST /`` from the cron connector, or ``POST /rules/evaluate``),
one run at a time (a lock), judging at most ``GRID_EVAL_MAX_SUBJECTS`` (rule, node) pairs per call;
a larger set continues where the last call stopped (``EVAL_CURSOR``), so each pair is judged
every few ticks instead of every tick. The state of each pair (since when it is breached, its
open alert) changes in one Lua script in the rule's slot: a subject never has two open alerts,
however evaluations and acknowledgements interleave.

Each alert that opens, is acknowledged or clears is an ``alert`` event on the zone's stream
(``raised``, ``acknowledged``, ``cleared``: :func:`metertwin.stream.events.alert_event`), queued in
the pipeline of the write that follows the change (the actions' outcomes; the acknowledgement's
read-back), or alone when there is none; never twice for one change (only the script that moved
the alert emits).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from typing import Any

import httpx
import redis

from metertwin.core import auth, clients
from metertwin.core.destinations import guarded_client, policy_from_settings, post
from metertwin.core.errors import BackendUnavailable, InvalidInput, MeterTwinError, NotFound
from metertwin.grid import keys, load
from metertwin.grid.rules import RuleStore, threshold_for
from metertwin.grid.settings import get_grid_settings
from metertwin.stream import events

log = logging.getLogger("metertwin.grid")

#: The ``alert`` event's state for each change of an alert.
EVENT_STATE = {"opened": "raised", "resolved": "cleared", "acknowledged": "acknowledged"}

# KEYS: states alerts order ; ARGV: subject, now, verdict ('breach'|'clear'|'band'), for_s, alert JSON, value, max
STEP = r"""
local states, alerts, order = KEYS[1], KEYS[2], KEYS[3]
local subject, now, verdict, for_s = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local raw = redis.call('HGET', states, subject)
local st = raw and cjson.decode(raw) or {}
local out = {'none'}
if verdict == 'breach' then
  if not st.since then st.since = now end
  if not st.open and now - st.since >= for_s then
    local a = cjson.decode(ARGV[5])
    a.status = 'open'; a.opened_at = now; a.value = tonumber(ARGV[6]); a.breached_since = st.since
    redis.call('HSET', alerts, a.id, cjson.encode(a))
    redis.call('ZADD', order, now, a.id)
    st.open = a.id
    out = {'opened', a.id}
    -- cap: drop the oldest closed alerts
    local excess = redis.call('ZCARD', order) - tonumber(ARGV[7])
    if excess > 0 then
      for _, id in ipairs(redis.call('ZRANGE', order, 0, excess * 2 + 10)) do
        if excess <= 0 then break end
        local old = redis.call('HGET', alerts, id)
        if not old or cjson.decode(old).status == 'resolved' then
          redis.call('HDEL', alerts, id); redis.call('ZREM', order, id); excess = excess - 1
        end
      end
    end
  end
elseif verdict == 'clear' then
  st.since = nil
  if st.open then
    local old = redis.call('HGET', alerts, st.open)
    if old then
      local a = cjson.decode(old)
      a.status = 'resolved'; a.resolved_at = now; a.resolved_value = tonumber(ARGV[6])
      redis.call('HSET', alerts, st.open, cjson.encode(a))
    end
    out = {'resolved', st.open}
    st.open = nil
  end
else
  if not st.open then st.since = nil end
end
if st.since or st.open then redis.call('HSET', states, subject, cjson.encode(st))
else redis.call('HDEL', states, subject) end
return out
"""

# KEYS: alerts ; ARGV: id, field, JSON value  (one field of an alert, atomically)
ANNOTATE = r"""
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local a = cjson.decode(raw)
a[ARGV[2]] = cjson.decode(ARGV[3])
if ARGV[2] == 'acknowledged_by' then
  if a.status ~= 'open' then return -1 end
  a.status = 'acknowledged'; a.acknowledged_at = tonumber(ARGV[4])
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(a))
return 1
"""


ANNOTATE_SHA = hashlib.sha1(ANNOTATE.encode()).hexdigest()  # Redis names scripts by SHA-1


_loaded: set[int] = set()


def _annotate_piped(client: Any, key: str, args: list[str], *extra: Any) -> tuple[list[Any], bool]:
    """ANNOTATE on ``key`` by EVALSHA in one pipeline with ``extra`` (callables queueing more commands on
    it); returns the pipeline's results and whether the script had to run alone afterwards. The script
    is loaded once per client; if Redis lost it since (SCRIPT FLUSH, restart), the pipeline fails with
    NOSCRIPT, the script is loaded and run alone, and the rest is not sent again (an alert event queued
    there may then be missing; it is logged)."""
    if id(client) not in _loaded:
        client.script_load(ANNOTATE)
        _loaded.add(id(client))
    pipe = client.pipeline(transaction=False)
    pipe.evalsha(ANNOTATE_SHA, 1, key, *args)
    for queue in extra:
        queue(pipe)
    try:
        return list(pipe.execute()), False
    except redis.exceptions.NoScriptError:
        log.warning("grid: ANNOTATE was not loaded in Redis; run alone (an alert event may be missing)")
        _loaded.discard(id(client))
        return [client.register_script(ANNOTATE)(keys=[key], args=args)] + [None] * len(extra), True


def verdict(rule: dict[str, Any], node: str, value: float) -> str:
    """``breach``, ``clear`` or ``band`` (between: nothing changes) for one value."""
    h = float(rule.get("hysteresis", 0))
    if rule["condition"] == "outside":
        lo, hi = float(rule["low"]), float(rule["high"])
        if value < lo or value > hi:
            return "breach"
        return "clear" if lo + h <= value <= hi - h else "band"
    t = threshold_for(rule, node)
    if t is None:
        return "band"
    if rule["condition"] == "above":
        return "breach" if value > t else ("clear" if value < t - h else "band")
    return "breach" if value < t else ("clear" if value > t + h else "band")


def metric(summary: dict[str, Any], name: str) -> float | None:
    if name == "stale_ratio":
        return summary["stale"] / summary["meters"] if summary["meters"] else None
    value = summary.get(name)
    return None if value is None else float(value)


def _subjects(client: Any, rules: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    out = []
    for rule in rules:
        nodes = [rule["subject"]] if rule.get("subject") else sorted(client.zrange(keys.nodes(rule["level"]), 0, -1))
        out += [(rule, node) for node in nodes]
    return out


def evaluate(client: Any, now_s: float | None = None) -> dict[str, Any]:
    """Judge the rules' subjects (bounded); open, resolve and notify. Returns counts."""
    s = get_grid_settings()
    now = time.time() if now_s is None else now_s
    if not client.set(keys.EVAL_LOCK, "1", nx=True, ex=keys.LOCK_TTL_S):
        return {"skipped": "another evaluation holds the lock"}
    try:
        rules = [r for r in RuleStore(client).all() if r.get("enabled", True)]
        pairs = _subjects(client, rules)
        start = int(client.get(keys.EVAL_CURSOR) or 0) % max(1, len(pairs))
        todo = (pairs[start:] + pairs[:start])[:s.eval_max_subjects]
        client.set(keys.EVAL_CURSOR, (start + len(todo)) % max(1, len(pairs)))
        step = client.register_script(STEP)
        summaries: dict[tuple[str, str], dict[str, Any] | None] = {}
        counts = {"rules": len(rules), "subjects": len(pairs), "judged": 0, "opened": 0, "resolved": 0}
        for rule, node in todo:
            key = (rule["level"], node)
            if key not in summaries:
                try:
                    summaries[key] = load.summary(client, rule["level"], node, now_s=now)
                except NotFound:
                    summaries[key] = None
            summary = summaries[key]
            value = metric(summary, rule["metric"]) if summary else None
            if value is None:
                continue
            counts["judged"] += 1
            alert = {"id": uuid.uuid4().hex[:12], "rule_id": rule["id"], "rule": rule["name"], "level": rule["level"],
                     "subject": node, "metric": rule["metric"], "condition": rule["condition"],
                     "threshold": threshold_for(rule, node), "low": rule.get("low"), "high": rule.get("high"),
                     "severity": rule["severity"]}
            res = step(keys=[keys.rule_states(rule["id"]), keys.rule_alerts(rule["id"]),
                             keys.rule_alert_order(rule["id"])],
                       args=[node, repr(now), verdict(rule, node, value), rule["for_s"],
                             json.dumps(alert), repr(value), s.alerts_max])
            if res[0] in ("opened", "resolved"):
                counts[str(res[0])] += 1
                run_actions(client, rule, str(res[1]), str(res[0]), value, now)
        return counts
    except redis.RedisError as exc:
        raise BackendUnavailable(f"rule evaluation (Redis) failed: {exc}") from exc
    finally:
        client.delete(keys.EVAL_LOCK)


def alert_event(alert: dict[str, Any], change: str) -> events.Event:
    """The stream event of one change (``opened``, ``acknowledged``, ``resolved``) of ``alert``."""
    at = {"opened": "opened_at", "acknowledged": "acknowledged_at", "resolved": "resolved_at"}[change]
    value = alert.get("resolved_value") if change == "resolved" else alert.get("value")
    return events.alert_event(alert["level"], alert["subject"], EVENT_STATE[change],
                              {**alert, "value": value, "at": alert.get(at)})


def run_actions(client: Any, rule: dict[str, Any], alert_id: str, event: str, value: float, now: float) -> None:
    """Notify for an opened or resolved alert; each action's outcome is recorded on the alert, in one
    pipeline with the alert's stream event."""
    alert = get_alert(client, rule["id"], alert_id)
    payload = json.dumps({"event": f"alert_{event}", "alert": alert}, separators=(",", ":")).encode()
    results = list(alert.get("actions") or [])
    for action in rule["actions"]:
        kind = action["type"]
        if kind == "alert":
            continue
        if kind == "job" and event != "opened":
            continue
        try:
            detail = _send(action, payload, alert)
            results.append({"type": kind, "event": event, "status": "sent" if detail != "pending" else "pending",
                            "detail": detail if detail != "pending" else "GRID_JOBS_URL is not set", "at": now})
        except (MeterTwinError, OSError, ValueError, httpx.HTTPError) as exc:
            results.append({"type": kind, "event": event, "status": "failed", "detail": str(exc)[:300], "at": now})
    emitted = alert_event(alert, event)
    if results:
        _annotate_piped(client, keys.rule_alerts(rule["id"]), [alert_id, "actions", json.dumps(results)],
                        lambda pipe: events.queue(client, pipe, emitted))
    else:
        events.emit(client, emitted)


def _send(action: dict[str, Any], payload: bytes, alert: dict[str, Any]) -> str:
    s = get_grid_settings()
    if action["type"] == "webhook":
        policy = policy_from_settings()
        with guarded_client(policy) as http:
            status, _body = post(http, policy, action["url"], content=payload,
                                 headers={"Content-Type": "application/json"})
        if status >= 300:
            raise InvalidInput(f"webhook answered HTTP {status}")
        return f"HTTP {status}"
    if action["type"] == "mqtt":
        clients.get_mqtt().publish(action["topic"], payload, qos=1, timeout_s=s.notify_timeout_s)
        return f"published on {action['topic']}"
    if action["type"] == "job":
        if not s.jobs_url:
            return "pending"
        token = auth.issue_token("grid-rules", {"utility", "service"})
        # The job says where it came from (edge-jobs refuses unknown fields: ``description``, not a note).
        body = {**action["job"]}
        body.setdefault("description", f"alert {alert['id']} of rule {alert['rule']} on {alert['subject']}"[:300])
        resp = clients.get_http().post(s.jobs_url, json=body, headers={"Authorization": f"Bearer {token}"},
                                       timeout=s.notify_timeout_s)
        if resp.status_code >= 300:
            raise InvalidInput(f"jobs answered HTTP {resp.status_code}: {resp.text[:200]}")
        return f"job {resp.json().get('id', '?')}"
    return "ignored"


def get_alert(client: Any, rule_id: str, alert_id: str) -> dict[str, Any]:
    raw = client.hget(keys.rule_alerts(rule_id), alert_id)
    if not raw:
        raise NotFound(f"alert {alert_id!r} of rule {rule_id!r} does not exist", field="alert_id")
    return dict(json.loads(raw))


def acknowledge(client: Any, rule_id: str, alert_id: str, *, who: str, now_s: float | None = None) -> dict[str, Any]:
    """Mark an open alert acknowledged (it stays the subject's one open alert until it clears); the
    ``acknowledged`` event is emitted only by the call that acknowledged it."""
    key = keys.rule_alerts(rule_id)
    (res, raw), alone = _annotate_piped(client, key, [alert_id, "acknowledged_by", json.dumps(who),
                                                      repr(time.time() if now_s is None else now_s)],
                                        lambda pipe: pipe.hget(key, alert_id))
    if alone or isinstance(raw, Exception):
        raw = client.hget(key, alert_id)  # the script ran after the read-back: read it again
    if int(res) == 0 or not raw:
        raise NotFound(f"alert {alert_id!r} of rule {rule_id!r} does not exist", field="alert_id")
    alert = dict(json.loads(raw))
    if int(res) == -1 and alert.get("status") != "acknowledged":
        raise InvalidInput(f"alert {alert_id!r} is {alert.get('status')}, not open", field="alert_id")
    if int(res) == 1:
        events.emit(client, alert_event(alert, "acknowledged"))
    return alert


def list_alerts(client: Any, *, status: str | None = None, rule_id: str | None = None, subject: str | None = None,
                limit: int = 100) -> list[dict[str, Any]]:
    """Alerts newest first, filtered by status (open, acknowledged, resolved), rule and subject."""
    if status not in (None, "open", "acknowledged", "resolved", "active"):
        raise InvalidInput(f"status={status!r} is not open, acknowledged, resolved or active", field="status")
    rule_ids = [rule_id] if rule_id else [r["id"] for r in RuleStore(client).all()]
    out: list[dict[str, Any]] = []
    for rid in rule_ids:
        ids = client.zrevrange(keys.rule_alert_order(rid), 0, -1)
        for raw in (client.hmget(keys.rule_alerts(rid), ids) if ids else []):
            if not raw:
                continue
            a = json.loads(raw)
            if status == "active" and a["status"] == "resolved":
                continue
            if status not in (None, "active") and a["status"] != status:
                continue
            if subject and a["subject"] != subject:
                continue
            out.append(a)
    out.sort(key=lambda a: (-a["opened_at"], a["id"]))
    return out[:limit]
