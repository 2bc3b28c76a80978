"""A twin's forecast for one slot, from its data in this zone's Redis, and its resolved bidder.

The coordinator resolves every local twin's forecast once, at registration, so every
round of a market uses the same one (a persistence forecast from the twin's last net power).
"""

from __future__ import annotations

import json

import redis

from metertwin.core.errors import BackendUnavailable, InvalidInput
from metertwin.p2p.market import Bidder, MarketParams
from metertwin.p2p.participants import ParticipantIn
from metertwin.p2p.store import StrRedis
from metertwin.twin import keys as twin_keys


def twin_forecast_kwh(client: StrRedis, meter_id: str, slot_minutes: int) -> tuple[float, float] | None:
    """Persistence forecast ``(load_kwh, pv_kwh)`` for one slot from the twin's last net power.

    Reads the twin hash (``twin_keys.twin``): the last measurement ``m`` (JSON with ``power_w``),
    or a reported ``power_w`` in ``r``/``rep`` (JSON ``{field: [value, ts]}``). ``None`` if
    the twin has no power figure. Positive power imports (load), negative exports (PV).
    """
    try:
        m, r, rep = client.hmget(twin_keys.twin(meter_id), ["m", "r", "rep"])
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable reading the twin of {meter_id!r}: {exc}") from exc
    power: float | None = None
    try:
        if m:
            value = json.loads(m).get("power_w")
            power = float(value) if value is not None else None
        for doc in (r, rep):
            if power is None and doc:
                entry = json.loads(doc).get("power_w")
                power = float(entry[0] if isinstance(entry, list) else entry) if entry is not None else None
    except (ValueError, TypeError, AttributeError, IndexError):
        return None
    if power is None or power != power or abs(power) == float("inf"):
        return None
    kwh = power / 1000.0 * slot_minutes / 60.0
    return (kwh, 0.0) if kwh >= 0 else (0.0, -kwh)


def resolve_bidder(
    client: StrRedis, profile: ParticipantIn, meter_id: str, slot_minutes: int, params: MarketParams
) -> Bidder:
    """The twin's bidder for a slot: its declared profile; the forecast from its twin data if not declared."""
    forecast = None
    if profile.forecast_load_kwh is None and profile.forecast_pv_kwh is None:
        forecast = twin_forecast_kwh(client, meter_id, slot_minutes)
    try:
        return profile.to_bidder(meter_id, params, forecast)
    except ValueError as exc:
        raise InvalidInput(str(exc), field="forecast_load_kwh", meter_id=meter_id) from None
