"""What callers declare about a participant (untrusted input, validated with pydantic), resolved into a
:class:`~metertwin.p2p.market.Bidder`. The market maths does not use these models."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from metertwin.p2p.market import Battery, Bidder, MarketParams

Price = Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)]
Kwh = Annotated[float, Field(ge=0, le=10_000, allow_inf_nan=False)]
ZONE_PATTERN = r"^[a-z][a-z0-9-]{0,30}$"


class BatteryIn(BaseModel):
    """A battery as a participant declares it (kWh per slot, prices per kWh)."""

    model_config = ConfigDict(extra="forbid")

    capacity_kwh: Annotated[float, Field(gt=0, le=10_000, allow_inf_nan=False)]
    soc_kwh: Kwh
    max_charge_kwh: Kwh
    max_discharge_kwh: Kwh
    charge_below_price: Price
    discharge_above_price: Price

    @model_validator(mode="after")
    def _consistent(self) -> BatteryIn:
        if self.soc_kwh > self.capacity_kwh:
            raise ValueError(f"battery.soc_kwh {self.soc_kwh!r} exceeds battery.capacity_kwh {self.capacity_kwh!r}")
        if self.charge_below_price > self.discharge_above_price:
            raise ValueError(
                f"battery.charge_below_price {self.charge_below_price!r} is above "
                f"battery.discharge_above_price {self.discharge_above_price!r}"
            )
        return self


class ParticipantIn(BaseModel):
    """A twin's owner profile as registered for one market.

    Omitted forecasts come from the twin's last net power (persistence forecast);
    omitted limits default to the tariffs (buy up to retail, sell down to feed-in).
    """

    model_config = ConfigDict(extra="forbid")

    meter_id: str | None = Field(default=None, min_length=1, max_length=64)
    forecast_load_kwh: Kwh | None = None
    forecast_pv_kwh: Kwh | None = None
    max_buy_price: Price | None = None
    min_sell_price: Price | None = None
    price_ramp: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = 0.0
    battery: BatteryIn | None = None
    zone: str | None = Field(default=None, pattern=ZONE_PATTERN)

    def to_bidder(self, meter_id: str, params: MarketParams, forecast: tuple[float, float] | None) -> Bidder:
        """Resolve defaults; ``forecast`` is ``(load, pv)`` kWh used for the fields not given."""
        load, pv = self.forecast_load_kwh, self.forecast_pv_kwh
        if load is None and pv is None:
            if forecast is None:
                raise ValueError(
                    f"meter {meter_id!r} has no forecast: give forecast_load_kwh/forecast_pv_kwh "
                    "or let its twin report power_w"
                )
            load, pv = forecast
        bat = self.battery
        return Bidder(
            meter_id=meter_id,
            load_kwh=load or 0.0,
            pv_kwh=pv or 0.0,
            max_buy_price=self.max_buy_price if self.max_buy_price is not None else params.retail_tariff,
            min_sell_price=self.min_sell_price if self.min_sell_price is not None else params.feed_in_tariff,
            price_ramp=self.price_ramp,
            battery=Battery(**bat.model_dump()) if bat else None,
        )
