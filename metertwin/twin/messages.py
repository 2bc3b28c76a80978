"""Wire messages between a meter and its twin (JSON over MQTT), as pydantic models.

The meter side is deliberately minimal: it measures, reports, answers reads,
applies or rejects commands, and passes EMS messages through untouched.
Timestamps are epoch seconds (float, UTC). Energy registers are cumulative kWh.

Two rules here are shared by the edge (twin ingest) and the fog (VEE), so that the edge
rejects exactly what the fog rejects:

* **Sequence numbers** (:data:`MAX_SEQ`) are JSON integers ``0 <= seq <= 10**14 - 1``, strictly:
  ``"3"`` (a string), ``3.0``, ``1e17`` and ``true`` are rejected, not coerced.
* **Timestamps** (:class:`TimestampRule`): at most ``MDMS_CLOCK_SKEW_S`` (300 s) ahead of the
  receiver's clock and at most ``MDMS_HORIZON_S`` (35 days) old. Both zones read the same two
  variables; set them to the same values on edge and fog.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from metertwin.core.errors import InvalidInput

Finite = Annotated[float, Field(allow_inf_nan=False)]

#: Highest sequence number accepted. Redis Lua numbers are doubles (integers exact up to 2**53),
#: and Lua turns a number into a string with 14 significant digits (``seq .. ':'`` in the twin's
#: dedupe window, ``HSET`` of a number beyond 2**53 writes ``1e+17``): below 10**14 every script
#: stores and compares a seq exactly. One reading a second takes 3 million years to get there.
MAX_SEQ = 10**14 - 1

#: Defaults of the timestamp rule (the fog's VEE horizon, 35 days, and a 5-minute clock skew).
CLOCK_SKEW_S = 300.0
MAX_AGE_S = 35 * 86_400.0


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Measurement(_Msg):
    """What a meter measures at one instant."""

    ts: Finite = Field(gt=0, description="Epoch seconds of the measurement.")
    import_kwh: Finite = Field(ge=0, le=1e9, description="Cumulative imported energy register.")
    export_kwh: Finite = Field(default=0.0, ge=0, le=1e9, description="Cumulative exported energy register.")
    power_w: Finite = Field(ge=-1e6, le=1e6, description="Net active power; negative when exporting.")
    voltage_v: Finite = Field(default=230.0, ge=0, le=1000)


class Reading(Measurement):
    """Periodic report on ``meters/<id>/up/reading`` (QoS1) with a monotonically increasing sequence."""

    seq: int = Field(ge=0, le=MAX_SEQ, strict=True,
                     description="Per-meter sequence number, +1 per reading, never reused (a JSON integer).")


class ReadRequest(_Msg):
    """On-demand read, sent with MQTT v5 ResponseTopic and CorrelationData."""

    fields: list[str] | None = None


class ReadResponse(Measurement):
    """The meter's answer to a :class:`ReadRequest`, published to the response topic."""


CommandKind = Literal["relay", "reporting_interval", "load_limit", "tariff", "desired", "trade", "dr"]


class Command(_Msg):
    """A write from the twin to the meter on ``meters/<id>/down/cmd`` (QoS1, message expiry set)."""

    id: str = Field(min_length=1, max_length=64)
    kind: CommandKind
    params: dict[str, Any]
    expires_at: Finite


class CommandAck(_Msg):
    """The meter's answer to a command on ``meters/<id>/up/ack``."""

    id: str = Field(min_length=1, max_length=64)
    status: Literal["applied", "rejected"]
    reason: str | None = Field(default=None, max_length=500)
    #: Settings the meter now reports after applying (e.g. ``{"relay": "open"}``).
    reported: dict[str, Any] = Field(default_factory=dict)
    ts: Finite = Field(gt=0)


class EmsMessage(_Msg):
    """An opaque message passed between meter and home EMS; the twin does not interpret ``payload``."""

    id: str = Field(min_length=1, max_length=64)
    payload: dict[str, Any]
    ts: Finite = Field(gt=0)


class Control(_Msg):
    """Platform control message on ``meters/<id>/down/control`` (e.g. rebind to a new twin version)."""

    action: Literal["rebind", "ping"]
    params: dict[str, Any] = Field(default_factory=dict)


class TimestampRejected(InvalidInput):
    """A reading's ``ts`` is outside the accepted window; ``rule`` is ``future`` or ``too_old``."""

    code = "timestamp_rejected"

    def __init__(self, rule: str, message: str, **details: Any) -> None:
        super().__init__(message, rule=rule, **details)
        self.rule = rule


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):  # beyond year 9999
        return "out of calendar range"


@dataclass(frozen=True, slots=True)
class TimestampRule:
    """The one timestamp rule of readings, applied by the edge (twin ingest) and the fog (VEE)."""

    #: How far ``ts`` may lie ahead of the receiver's clock (meters' clocks drift).
    clock_skew_s: float = CLOCK_SKEW_S
    #: How old ``ts`` may be (a meter's offline buffer is replayed within this).
    max_age_s: float = MAX_AGE_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TimestampRule:
        """From ``MDMS_CLOCK_SKEW_S`` / ``MDMS_HORIZON_S`` (the VEE settings' variables, so one pair
        configures both zones); unset, empty or unusable values mean the defaults."""
        e = os.environ if env is None else env
        return cls(_positive(e.get("MDMS_CLOCK_SKEW_S"), CLOCK_SKEW_S, zero_ok=True),
                   _positive(e.get("MDMS_HORIZON_S"), MAX_AGE_S, zero_ok=False))

    def check(self, ts: float, now_s: float) -> None:
        """Raise :class:`TimestampRejected` naming ``ts`` if it is in the future or too old."""
        if ts > now_s + self.clock_skew_s:
            raise TimestampRejected(
                "future", f"ts {ts!r} ({_iso(ts)}) is {ts - now_s:.0f} s in the future; "
                f"allowed clock skew is {self.clock_skew_s:.0f} s", ts=ts,
            )
        if ts < now_s - self.max_age_s:
            raise TimestampRejected(
                "too_old", f"ts {ts!r} ({_iso(ts)}) is older than the horizon of {self.max_age_s:.0f} s", ts=ts,
            )


def _positive(raw: str | None, default: float, *, zero_ok: bool) -> float:
    try:
        value = float(raw) if raw else default
    except ValueError:
        return default
    return value if value > 0 or (zero_ok and value == 0) else default  # NaN fails both
