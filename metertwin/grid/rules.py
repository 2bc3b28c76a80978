"""Threshold rules on the aggregates: the model, its validation and the store.

A rule watches one metric of every node of a level (or one ``subject`` node)::

    {"name": "transformer overload", "level": "transformer", "metric": "net_w",
     "condition": "above", "threshold": 50000, "thresholds": {"T7": 80000},
     "hysteresis": 5000, "for_s": 300, "severity": "critical",
     "actions": [{"type": "alert"}, {"type": "webhook", "url": "https://ops.example/hook"}]}

* ``condition`` ``above``: breached when the value is above ``threshold`` (per node:
  ``thresholds[node]``, e.g. each transformer's rating), cleared below ``threshold - hysteresis``;
  ``below`` mirrors it; ``outside``: breached outside ``[low, high]``, cleared inside
  ``[low + hysteresis, high - hysteresis]``. Between breach and clear nothing changes.
* ``for_s``: the breach must hold that long (on every evaluation) before the rule fires.
* actions: ``alert`` (always recorded; at most one open alert per rule and subject), ``webhook``
  (an https/http URL that passes the outbound destination policy, checked here and at each send),
  ``mqtt`` (a topic outside the meter link's ``meters/`` tree, no wildcards), ``job`` (a bulk job
  body posted to ``GRID_JOBS_URL``; pending on the alert when that is unset).

Invalid input is refused with an error naming the field (``InvalidInput.field``).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metertwin.core.destinations import DestinationRefused, policy_from_settings
from metertwin.core.errors import BackendUnavailable, InvalidInput, NotFound
from metertwin.core.http import describe_validation_error
from metertwin.grid import keys
from metertwin.grid.settings import get_grid_settings

METRICS = ("import_w", "export_w", "net_w", "voltage_min_v", "voltage_max_v", "meters", "reporting", "online",
           "stale", "stale_ratio")
Level = Literal["transformer", "feeder", "substation", "region"]
Finite = float


class Action(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["alert", "webhook", "mqtt", "job"]
    url: str | None = Field(default=None, max_length=512)
    topic: str | None = Field(default=None, max_length=256)
    job: dict[str, Any] | None = None


class Rule(BaseModel):
    """The body of ``POST /rules``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    level: Level
    subject: str | None = Field(default=None, min_length=1, max_length=64)
    metric: Literal["import_w", "export_w", "net_w", "voltage_min_v", "voltage_max_v", "meters", "reporting",
                    "online", "stale", "stale_ratio"]
    condition: Literal["above", "below", "outside"]
    threshold: float | None = Field(default=None, allow_inf_nan=False)
    thresholds: dict[str, float] = Field(default_factory=dict, max_length=10_000)
    low: float | None = Field(default=None, allow_inf_nan=False)
    high: float | None = Field(default=None, allow_inf_nan=False)
    hysteresis: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    for_s: int = Field(default=0, ge=0, le=7 * 86_400)
    severity: Literal["info", "warning", "critical"] = "warning"
    actions: list[Action] = Field(default_factory=lambda: [Action(type="alert")], min_length=1, max_length=8)
    enabled: bool = True


def _bad(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", field=field)


def validate(body: dict[str, Any] | Rule) -> Rule:
    """Parse and check a rule; every refusal names the field."""
    if isinstance(body, Rule):
        rule = body
    else:
        try:
            rule = Rule.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidInput(describe_validation_error(exc),
                               field=".".join(str(p) for p in first["loc"]) or "body") from None
    if rule.condition == "outside":
        if rule.low is None or rule.high is None:
            raise _bad("low" if rule.low is None else "high", "condition 'outside' needs both low and high")
        if rule.low + 2 * rule.hysteresis >= rule.high:
            raise _bad("hysteresis", f"low {rule.low} + 2 x hysteresis {rule.hysteresis} must stay below "
                                     f"high {rule.high}")
    elif rule.threshold is None and not rule.thresholds:
        raise _bad("threshold", f"condition {rule.condition!r} needs a threshold (or thresholds per node)")
    for node, value in rule.thresholds.items():
        if not math.isfinite(value):
            raise _bad(f"thresholds.{node}", f"{value!r} is not a finite number")
    policy = None
    for i, action in enumerate(rule.actions):
        where = f"actions.{i}"
        if action.type == "webhook":
            if not action.url:
                raise _bad(f"{where}.url", "a webhook action needs a url")
            policy = policy or policy_from_settings()
            try:
                policy.check_url(action.url, "webhook url")
            except DestinationRefused as exc:
                raise _bad(f"{where}.url", exc.message) from None
        elif action.type == "mqtt":
            topic = action.topic or ""
            if not topic or any(c in topic for c in "+#\x00") or topic.startswith(("meters/", "$")):
                raise _bad(f"{where}.topic", f"topic {topic!r} must be set, without wildcards, outside meters/ "
                                             f"and $ topics")
        elif action.type == "job" and not action.job:
            raise _bad(f"{where}.job", "a job action needs the job body (target and action)")
    if not any(a.type == "alert" for a in rule.actions):
        rule.actions.insert(0, Action(type="alert"))  # every firing is recorded
    return rule


def threshold_for(rule: dict[str, Any], node: str) -> float | None:
    return float(rule["thresholds"][node]) if node in rule.get("thresholds", {}) else rule.get("threshold")


class RuleStore:
    """Rules in the fog Redis (one hash, slot ``{grid-ix}``)."""

    def __init__(self, client: Any) -> None:
        self._r = client

    def create(self, body: dict[str, Any], *, actor: str) -> dict[str, Any]:
        rule = validate(body)
        if self._call(self._r.hlen, keys.RULES) >= get_grid_settings().max_rules:
            raise InvalidInput(f"there are already {get_grid_settings().max_rules} rules (GRID_MAX_RULES)",
                               field="name")
        doc = {"id": uuid.uuid4().hex[:12], **rule.model_dump(), "created_by": actor,
               "created_at": round(time.time(), 3)}
        self._call(self._r.hset, keys.RULES, doc["id"], json.dumps(doc, separators=(",", ":")))
        return doc

    def get(self, rule_id: str) -> dict[str, Any]:
        raw = self._call(self._r.hget, keys.RULES, rule_id)
        if not raw:
            raise NotFound(f"rule {rule_id!r} does not exist", field="rule_id")
        return dict(json.loads(raw))

    def all(self) -> list[dict[str, Any]]:
        raw = self._call(self._r.hgetall, keys.RULES)
        return sorted((json.loads(v) for v in raw.values()), key=lambda r: (r["created_at"], r["id"]))

    def delete(self, rule_id: str) -> None:
        self.get(rule_id)
        self._call(self._r.hdel, keys.RULES, rule_id)
        self._call(self._r.delete, keys.rule_states(rule_id), keys.rule_alerts(rule_id), keys.rule_alert_order(rule_id))

    @staticmethod
    def _call(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"grid rules (Redis) failed: {exc}") from exc
