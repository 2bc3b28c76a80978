"""What an upgrade operation is: the operator's spec, the stored operation, and its states.

An operation moves the meters it selects through per-meter index sets
(``keys.upgrade_op_set``) in pipeline order, :data:`FORWARD_SETS` to :data:`END_SETS`, or to
:data:`ROLLBACK_SETS` when it is rolled back. Its own state is one of :data:`ACTIVE` or
:data:`TERMINAL`. See :mod:`metertwin.upgrade.operations` for the lifecycle.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from metertwin.core.http import METER_ID_RE
from metertwin.upgrade.binding import DEFAULT_RELEASE
from metertwin.upgrade.health import Thresholds

#: States of an operation. ``paused`` remembers the state to resume in ``resume_to``.
ACTIVE = ("planning", "canary", "observing", "rolling_out", "paused", "rolling_back")
TERMINAL = ("completed", "rolled_back")
#: Per-meter index sets of an operation, in pipeline order.
FORWARD_SETS = ("queued", "admitted", "prepared", "synced", "rebinding", "switched")
END_SETS = ("done", "skipped", "failed")
ROLLBACK_SETS = ("rb_confirming", "rolled_back")
ALL_SETS = FORWARD_SETS + END_SETS + ROLLBACK_SETS
IN_FLIGHT = ("admitted", "prepared", "synced", "rebinding", "switched")
#: Switch-record phases of another operation that a new one may take over.
RELEASED_PHASES = ("done", "cancelled", "confirmed", "rejected")
REBIND_PREFIX = "rb."
#: Seconds between full passes over the meters waiting for their rebind ack.
RECONCILE_EVERY_S = 1.0
MAX_FAILURE_DETAILS = 200


#: (meter id, from set, to set, why) for :meth:`~metertwin.upgrade.store.OperationStore._move`.
Move = tuple[str, str, str, str | None]


class InjectedCrash(BaseException):
    """Raised at a crash point (tests): like a process dying, nothing after it runs."""


# --- operator input -------------------------------------------------------------------------
class Selector(BaseModel):
    """Exactly one of: ``meters`` (ids), ``percent`` (stable hash of the id), ``zone``, ``all``."""

    model_config = ConfigDict(extra="forbid")

    meters: list[str] | None = Field(default=None, min_length=1, max_length=100_000)
    percent: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    zone: str | None = Field(default=None, min_length=1, max_length=64)
    all: bool = False

    @model_validator(mode="after")
    def _one(self) -> Selector:
        chosen = [n for n in ("meters", "percent", "zone") if getattr(self, n) is not None] + (
            ["all"] if self.all else [])
        if len(chosen) != 1:
            raise ValueError(f"select meters with exactly one of meters, percent, zone, all (got {chosen or 'none'})")
        for meter_id in self.meters or []:
            if not METER_ID_RE.match(meter_id):
                raise ValueError(f"meter id {meter_id!r} is not valid")
        return self


class OperationSpec(BaseModel):
    """``POST /operations``: what to upgrade, how fast, and what counts as healthy."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    to: str = Field(min_length=1, max_length=32)
    source: str = Field(default=DEFAULT_RELEASE, alias="from", min_length=1, max_length=32)
    select: Selector
    #: First wave: a count, or a percentage of the selection (the larger wins); 0: no canary.
    canary: int = Field(default=0, ge=0, le=100_000)
    canary_percent: float = Field(default=0.0, ge=0, le=100, allow_inf_nan=False)
    batch: int = Field(default=500, ge=1, le=10_000)
    max_in_flight: int = Field(default=5_000, ge=1, le=100_000)
    #: Rebind messages per second at most. Every rebind comes back as an ack that the gateway's
    #: MQTT connector handles in the same queue as the readings: an unpaced burst of thousands
    #: of acks would delay the readings behind them by seconds.
    rebind_rate_per_s: float = Field(default=250.0, gt=0, le=100_000, allow_inf_nan=False)
    drain_s: float = Field(default=5.0, ge=0, le=3600, allow_inf_nan=False)
    rebind_ttl_s: int = Field(default=600, ge=1, le=7 * 86_400)
    resend_after_s: float = Field(default=10.0, ge=0.1, le=3600, allow_inf_nan=False)
    max_attempts: int = Field(default=5, ge=1, le=1000)
    #: More failed meters than this pauses the operation.
    max_failed: int = Field(default=10, ge=0)
    auto_promote: bool = False
    observe_s: float = Field(default=60.0, ge=0, le=7 * 86_400, allow_inf_nan=False)
    #: Roll back by itself when the canary's health verdict is ``bad`` (with auto_promote).
    auto_rollback: bool = True
    max_error_rate: float = Field(default=0.01, ge=0, le=1, allow_inf_nan=False)
    max_p95_ratio: float = Field(default=1.5, ge=1, le=100, allow_inf_nan=False)
    latency_slack_ms: float = Field(default=50.0, ge=0, le=60_000, allow_inf_nan=False)
    min_calls: int = Field(default=20, ge=0)
    metrics_url: str | None = Field(default=None, max_length=500)
    note: str | None = Field(default=None, max_length=500)

    def thresholds(self) -> Thresholds:
        return Thresholds(self.max_error_rate, self.max_p95_ratio, self.latency_slack_ms, self.min_calls)


@dataclass(frozen=True)
class Operation:
    """An operation as stored: spec, state and counters."""

    id: str
    spec: OperationSpec
    raw: dict[str, str]

    @property
    def state(self) -> str:
        return self.raw.get("state", "planning")

    def num(self, name: str, default: float = 0.0) -> float:
        value = self.raw.get(name)
        return float(value) if value not in (None, "") else default

    @property
    def rid(self) -> str:
        return f"{REBIND_PREFIX}{self.id}.{self.spec.to}"

    @property
    def back_rid(self) -> str:
        return f"{REBIND_PREFIX}{self.id}.{self.spec.source}"


def stable_bucket(meter_id: str) -> float:
    """A meter's place in [0, 100): the same in every run and on every machine."""
    return int(hashlib.sha1(meter_id.encode()).hexdigest()[:8], 16) % 10_000 / 100.0
