"""Wire messages between a meter and its twin (JSON over MQTT), as pydantic models.

The meter side is deliberately minimal: it measures, reports, answers reads,
applies or rejects commands, and passes EMS messages through untouched.
Timestamps are epoch seconds (float, UTC). Energy registers are cumulative kWh.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Finite = Annotated[float, Field(allow_inf_nan=False)]


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

    seq: int = Field(ge=0, description="Per-meter sequence number, +1 per reading, never reused.")


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
