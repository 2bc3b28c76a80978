"""What the VEN bridge posts to ``dr-event``: one ``oadrDistributeEvent`` of one twin as plain JSON.

The bridge turns openleadr's parsed message into these models (datetimes -> epoch s,
durations -> s). A :class:`Delivery` is validated as a whole, but its events only one by
one (:class:`EventIn`), so that one malformed event cannot spoil the others.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metertwin.core.errors import InvalidInput
from metertwin.core.http import describe_validation_error

Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Model(BaseModel):
    # openleadr parses every all-digit XML text as an int (ids such as "0421" included).
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)


class IntervalIn(_Model):
    start: Finite = Field(gt=0, description="epoch s")
    duration_s: Finite = Field(ge=0)
    payload: Finite


class SignalIn(_Model):
    name: str = Field(min_length=1, max_length=64)
    type: str = Field(min_length=1, max_length=64)
    id: str | None = Field(default=None, max_length=128)
    #: The signal's itemBase (``powerReal``, ``currencyPerKWh``, ...), its itemUnits and siScaleCode.
    item_base: str | None = Field(default=None, max_length=64)
    units: str | None = Field(default=None, max_length=64)
    scale: str | None = Field(default=None, max_length=16)
    #: No count limit (OpenADR sets none): the delivery's size is bounded by the request body limit.
    intervals: list[IntervalIn] = Field(min_length=1)


class EventIn(_Model):
    """One OpenADR event as the bridge normalises it (datetimes -> epoch s, durations -> s)."""

    event_id: str = Field(min_length=1, max_length=128)
    modification_number: int = Field(ge=0)
    status: str = Field(default="far", max_length=32)
    market_context: str | None = Field(default=None, max_length=512)
    priority: int = 0
    test_event: bool = False
    start: Finite = Field(gt=0, description="active period start, epoch s")
    duration_s: Finite = Field(ge=0)
    startafter_s: Finite = Field(default=0.0, ge=0, description="randomization window (tolerance.startafter)")
    recovery_s: Finite = Field(default=0.0, ge=0, description="x-eiRecovery after the active period")
    signals: list[SignalIn] = Field(min_length=1, max_length=100)
    targets: list[dict[str, Any]] = Field(default_factory=list, max_length=1000)
    response_required: Literal["always", "never"] = "always"


class Delivery(_Model):
    """One ``oadrDistributeEvent`` for one twin: every event the VTN currently holds for it."""

    meter_id: str = Field(min_length=1, max_length=64)
    ven_id: str = Field(min_length=1, max_length=128)
    vtn_id: str = Field(default="", max_length=128)
    request_id: str | None = Field(default=None, max_length=128)
    #: Validated one by one, so that one malformed event cannot spoil the others.
    events: list[dict[str, Any]] = Field(max_length=1000)
    #: Events of the message the VEN rejected itself (schema-invalid) and answered: still listed by
    #: the VTN, so not cancelled (implied).
    rejected_event_ids: list[str] = Field(default_factory=list, max_length=1000)


def validate_delivery(data: Any) -> Delivery:
    """The delivery, or :class:`InvalidInput` naming what is wrong with it."""
    try:
        return Delivery.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc)) from None
