"""What a job is: its target, its action and its rollout (``POST /jobs``), validated on create.

Every bad field is a 400 that names the field and the value (``action.params: ...``,
``rollout.rate_per_s: ... (got -1)``); an action is checked by the module that later runs it
(the command kinds by :mod:`metertwin.twin.commands`, topology by :mod:`metertwin.fleet.topology`,
DR preferences by the DR capability, an upgrade by the upgrade manager's ``OperationSpec``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from metertwin.core.errors import InvalidInput
from metertwin.core.http import METER_ID_RE, validate
from metertwin.dr.decisions import Preferences
from metertwin.fleet.search import Query
from metertwin.fleet.topology import TopologyFields
from metertwin.twin.commands import MAX_EXPIRY_S, DesiredFields, validate_params
from metertwin.upgrade.operations import OperationSpec

#: Most twins one job may target (a filter matching more is refused on create).
MAX_TARGETS = 200_000
ACTION_TYPES = ("command", "desired", "dr_preferences", "topology", "upgrade")
#: Upgrade fields the job sets itself: the selection is the job's target set, pacing is its rollout.
_UPGRADE_OWN = ("select", "rebind_rate_per_s", "max_in_flight")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Target(_Model):
    """Exactly one of ``filter`` (``GET /meters`` parameters; lists for repeated group/tag) or ``meters``."""

    filter: dict[str, str | list[str]] | None = None
    meters: list[str] | None = Field(default=None, min_length=1, max_length=MAX_TARGETS)

    @model_validator(mode="after")
    def _one(self) -> Target:
        if (self.filter is None) == (self.meters is None):
            raise ValueError("give exactly one of filter or meters")
        for meter_id in self.meters or []:
            if not METER_ID_RE.match(meter_id):
                raise ValueError(f"meter id {meter_id[:80]!r} is not valid")
        return self

    def query(self) -> Query:
        """The fleet search of ``filter`` (its errors name ``target.filter.<param>``)."""
        flat: dict[str, str] = {}
        multi: dict[str, list[str]] = {}
        for name, value in (self.filter or {}).items():
            if name in ("limit", "cursor"):
                raise InvalidInput(f"target.filter.{name} is not a filter (the job pages by itself)",
                                   field=f"target.filter.{name}")
            values = value if isinstance(value, list) else [value]
            if name in ("group", "tag"):
                multi[name] = values
            elif len(values) != 1:
                raise InvalidInput(f"target.filter.{name}={value!r}: one value only", field=f"target.filter.{name}")
            flat[name] = values[0] if values else ""
        unknown = sorted(set(flat) - set(_FILTER_NAMES))
        if unknown:
            raise InvalidInput(f"target.filter.{unknown[0]} is not a fleet filter; known: {list(_FILTER_NAMES)}",
                               field=f"target.filter.{unknown[0]}")
        try:
            return Query.from_params(flat, multi)
        except InvalidInput as exc:
            raise InvalidInput(f"target.filter: {exc.message}", field=f"target.filter.{exc.details.get('field')}"
                               ) from None


_FILTER_NAMES = ("region", "substation", "feeder", "transformer", "phase", "tariff", "customer_class", "zone",
                 "group", "tag", "online", "stale_s", "release", "has_pending_commands", "dr_opted_out")


class Action(_Model):
    """``type`` and its payload: ``command`` (kind, params), ``desired`` (fields), ``dr_preferences``
    (preferences), ``topology`` (patch), ``upgrade`` (upgrade: the OperationSpec minus select/pacing)."""

    type: Literal["command", "desired", "dr_preferences", "topology", "upgrade"]
    kind: str | None = None
    params: dict[str, Any] | None = None
    fields: dict[str, Any] | None = None
    preferences: dict[str, Any] | None = None
    patch: dict[str, Any] | None = None
    upgrade: dict[str, Any] | None = None

    def checked(self) -> dict[str, Any]:
        """The action as stored, every payload validated by its owner."""
        need = {"command": "kind", "desired": "fields", "dr_preferences": "preferences", "topology": "patch",
                "upgrade": "upgrade"}[self.type]
        given = [n for n in ("kind", "params", "fields", "preferences", "patch", "upgrade")
                 if getattr(self, n) is not None and not (self.type == "command" and n == "params")]
        extra = [n for n in given if n != need]
        if getattr(self, need) is None or extra:
            raise InvalidInput(f"action of type {self.type!r} takes {need!r}"
                               + ("" if not extra else f", not {extra}"), field=f"action.{extra[0] if extra else need}")
        if self.type == "command":
            return {"type": "command", "kind": self.kind,
                    "params": _named("action.params", lambda: validate_params(str(self.kind), self.params or {}))}
        if self.type == "desired":
            fields = _named("action.fields",
                            lambda: validate(self.fields, DesiredFields).model_dump(exclude_unset=True))
            if not fields:
                raise InvalidInput("action.fields names no setting", field="action.fields")
            return {"type": "desired", "fields": fields}
        if self.type == "dr_preferences":
            prefs = _named("action.preferences", lambda: validate(self.preferences, Preferences))
            return {"type": "dr_preferences", "preferences": prefs.model_dump()}
        if self.type == "topology":
            changes = _named("action.patch", lambda: validate(self.patch, TopologyFields).changes())
            if not changes:
                raise InvalidInput("action.patch names no topology field", field="action.patch")
            return {"type": "topology", "patch": changes}
        own = [n for n in _UPGRADE_OWN if n in (self.upgrade or {})]
        if own:
            raise InvalidInput(f"action.upgrade.{own[0]} is set by the job (its target and rollout)",
                               field=f"action.upgrade.{own[0]}")
        body = {"auto_promote": True, "observe_s": 0, **(self.upgrade or {})}
        _named("action.upgrade", lambda: validate({**body, "select": {"meters": ["m-0"]}}, OperationSpec))
        return {"type": "upgrade", "upgrade": body}


class Abort(_Model):
    """Abort when more than ``failed_percent`` % of the finished executions failed, after ``min_executed``."""

    failed_percent: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
    min_executed: int = Field(default=10, ge=1, le=MAX_TARGETS)


class Rollout(_Model):
    rate_per_s: Annotated[float, Field(gt=0, le=10_000, allow_inf_nan=False)] = 50.0
    max_in_flight: int = Field(default=500, ge=1, le=100_000)
    #: Per twin: from its claim to its outcome (the command's expiry, too).
    timeout_s: int = Field(default=300, ge=1, le=MAX_EXPIRY_S)
    abort: Abort | None = None


class JobSpec(_Model):
    target: Target
    action: Action
    rollout: Rollout = Field(default_factory=Rollout)
    description: str | None = Field(default=None, max_length=300)


def _named(where: str, check: Any) -> Any:
    try:
        return check()
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc.message}", field=where) from None
