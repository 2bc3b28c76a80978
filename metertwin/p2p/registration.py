"""Joining a market: a participant's profile resolved against the market's spec and where its twin lives.

Limits default to the tariffs (buy up to retail, sell down to feed-in). A twin of this zone
gets its forecast from its data here now, so a twin without one is refused at the door and
every round uses the same forecast; a twin of another zone gets it once from that zone's
``p2p-bid`` (unless declared); a zone without a configured gateway is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metertwin.core.clients import get_redis
from metertwin.core.errors import InvalidInput
from metertwin.core.http import METER_ID_RE
from metertwin.core.settings import get_settings
from metertwin.p2p.channels import remote_forecast, zone_gateways
from metertwin.p2p.forecast import resolve_bidder
from metertwin.p2p.market import MarketParams
from metertwin.p2p.participants import ParticipantIn


def market_params(spec: Mapping[str, Any]) -> MarketParams:
    """A stored market spec's :class:`MarketParams`; :class:`InvalidInput` naming the bad values."""
    try:
        return MarketParams(
            feed_in_tariff=spec["feed_in_tariff"], retail_tariff=spec["retail_tariff"],
            tolerance_kwh=spec["tolerance_kwh"], price_tolerance=spec["price_tolerance"],
            max_rounds=spec["max_rounds"], min_rounds=spec["min_rounds"], start_price=spec["start_price"],
        )
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def register(spec: Mapping[str, Any], meter_id: str, p: ParticipantIn) -> dict[str, Any]:
    """The profile stored for ``meter_id`` in a market of ``spec`` (forecast fixed, limits and zone resolved)."""
    if p.meter_id is not None and p.meter_id != meter_id:
        raise InvalidInput(f"meter_id {p.meter_id!r} in the body differs from {meter_id!r} in the path",
                           field="meter_id")
    if not METER_ID_RE.match(meter_id):
        raise InvalidInput(f"meter id {meter_id!r} is not valid", field="meter_id")
    params = market_params(spec)
    here = get_settings().zone
    zone = p.zone or here
    profile = p.model_dump(exclude={"meter_id", "zone"})
    profile.update(meter_id=meter_id, zone=zone)
    profile["max_buy_price"] = p.max_buy_price if p.max_buy_price is not None else params.retail_tariff
    profile["min_sell_price"] = p.min_sell_price if p.min_sell_price is not None else params.feed_in_tariff
    if zone == here:
        # The forecast comes from the twin data of this zone: resolve it now, so a twin without
        # one is refused at the door (naming it) and every round uses the same forecast.
        b = resolve_bidder(get_redis(), p, meter_id, spec["slot_minutes"], params)
        profile.update(forecast_load_kwh=b.load_kwh, forecast_pv_kwh=b.pv_kwh)
    elif zone not in zone_gateways():
        raise InvalidInput(
            f"zone {zone!r} of meter {meter_id!r} is neither this zone ({here!r}) nor one of the "
            f"zones with a gateway {sorted(zone_gateways())}", field="zone",
        )
    elif p.forecast_load_kwh is None and p.forecast_pv_kwh is None:
        # The twin's data lives in its own zone: ask that zone's p2p-bid once, now.
        fc = remote_forecast(zone, zone_gateways()[zone], meter_id, spec["slot_minutes"])
        if fc is None:
            raise InvalidInput(
                f"meter {meter_id!r} has no forecast: give forecast_load_kwh/forecast_pv_kwh or let its twin "
                f"in zone {zone!r} report power_w", field="forecast_load_kwh", meter_id=meter_id,
            )
        profile.update(forecast_load_kwh=fc[0], forecast_pv_kwh=fc[1])
    return profile
