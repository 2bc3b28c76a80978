"""The peer-to-peer market model: what one market is and who takes part. Pure, no I/O.

A market clears one time slot among twins. :class:`MarketParams` says how it negotiates
(the feed-in..retail tariff band, tolerances, round limits); each twin is a :class:`Bidder`
(its forecast for the slot, its price limits, maybe a :class:`Battery`), and :func:`bid`
is its answer to an announced price. The negotiation over those answers is
:mod:`metertwin.p2p.negotiation`; the final allocation :mod:`metertwin.p2p.clearing`;
what callers declare (validated) :mod:`metertwin.p2p.participants`.

Prices are currency units per kWh, quantities kWh per slot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

# --- participants ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Battery:
    """A battery behind the meter that trades on price thresholds.

    It charges (buys) up to ``min(max_charge_kwh, capacity_kwh - soc_kwh)`` when the price is
    at most ``charge_below_price`` and discharges (sells) up to ``min(max_discharge_kwh, soc_kwh)``
    when the price is at least ``discharge_above_price``.
    """

    capacity_kwh: float
    soc_kwh: float
    max_charge_kwh: float
    max_discharge_kwh: float
    charge_below_price: float
    discharge_above_price: float

    @property
    def charge_room_kwh(self) -> float:
        return max(0.0, min(self.max_charge_kwh, self.capacity_kwh - self.soc_kwh))

    @property
    def discharge_avail_kwh(self) -> float:
        return max(0.0, min(self.max_discharge_kwh, self.soc_kwh))


@dataclass(frozen=True, slots=True)
class Bidder:
    """A twin's owner profile for one slot, resolved (forecast and limits known).

    ``price_ramp`` makes bids elastic: demand fades linearly to zero over the last
    ``price_ramp`` below ``max_buy_price``; supply grows linearly over the first
    ``price_ramp`` above ``min_sell_price``. ``0`` gives all-or-nothing (step) bids.
    """

    meter_id: str
    load_kwh: float
    pv_kwh: float
    max_buy_price: float
    min_sell_price: float
    price_ramp: float = 0.0
    battery: Battery | None = None

    @property
    def net_need_kwh(self) -> float:
        return self.load_kwh - self.pv_kwh

    def capacity_kwh(self) -> float:
        """The most this twin could ever trade (buy or sell) in the slot."""
        b = self.battery
        extra = max(b.charge_room_kwh, b.discharge_avail_kwh) if b else 0.0
        return abs(self.net_need_kwh) + extra

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Bidder:
        bat = data.get("battery")
        return cls(
            meter_id=str(data["meter_id"]),
            load_kwh=float(data["load_kwh"]),
            pv_kwh=float(data["pv_kwh"]),
            max_buy_price=float(data["max_buy_price"]),
            min_sell_price=float(data["min_sell_price"]),
            price_ramp=float(data.get("price_ramp", 0.0)),
            battery=Battery(**{k: float(v) for k, v in bat.items()}) if bat else None,
        )


def _fade_out(p: float, limit: float, ramp: float) -> float:
    """1 well below ``limit``, 0 above it, linear over ``ramp`` just below it."""
    if p > limit:
        return 0.0
    if ramp <= 0.0 or p <= limit - ramp:
        return 1.0
    return (limit - p) / ramp


def _fade_in(p: float, limit: float, ramp: float) -> float:
    """0 below ``limit``, 1 well above it, linear over ``ramp`` just above it."""
    if p < limit:
        return 0.0
    if ramp <= 0.0 or p >= limit + ramp:
        return 1.0
    return (p - limit) / ramp


def bid(b: Bidder, price: float) -> float:
    """Quantity the twin wants at ``price``: ``+`` buys, ``-`` sells (kWh).

    Non-increasing in ``price``. Buys only at ``price <= max_buy_price``; sells only at
    ``price >= min_sell_price`` (a battery's thresholds are tightened to those limits).
    """
    need = b.load_kwh - b.pv_kwh
    buy = need * _fade_out(price, b.max_buy_price, b.price_ramp) if need > 0 else 0.0
    sell = -need * _fade_in(price, b.min_sell_price, b.price_ramp) if need < 0 else 0.0
    bat = b.battery
    if bat is not None:
        charge_at = min(bat.charge_below_price, b.max_buy_price)
        discharge_at = max(bat.discharge_above_price, b.min_sell_price)
        buy += bat.charge_room_kwh * _fade_out(price, charge_at, b.price_ramp)
        sell += bat.discharge_avail_kwh * _fade_in(price, discharge_at, b.price_ramp)
    return buy - sell


def excess_demand(answers: Iterable[float]) -> float:
    """``Σ buys - Σ sells``, exactly rounded (independent of the order of answers)."""
    return math.fsum(answers)


def volumes(answers: Iterable[float]) -> tuple[float, float]:
    """``(Σ buys, Σ sells)`` of the answers, both ``>= 0``, exactly rounded."""
    qs = list(answers)
    return math.fsum(q for q in qs if q > 0), math.fsum(-q for q in qs if q < 0)


# --- market parameters ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MarketParams:
    """How one market negotiates. ``min_rounds`` keeps announcing the cleared price (benchmarks)."""

    feed_in_tariff: float
    retail_tariff: float
    tolerance_kwh: float = 1e-3
    price_tolerance: float = 1e-6
    max_rounds: int = 100
    min_rounds: int = 0
    start_price: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.feed_in_tariff) and math.isfinite(self.retail_tariff)):
            raise ValueError("tariffs must be finite")
        if not 0 <= self.feed_in_tariff < self.retail_tariff:
            raise ValueError(
                f"feed_in_tariff {self.feed_in_tariff!r} must be >= 0 and below retail_tariff {self.retail_tariff!r}"
            )
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds {self.max_rounds!r} must be >= 1")
        if not 0 <= self.min_rounds <= self.max_rounds:
            raise ValueError(f"min_rounds {self.min_rounds!r} must be in [0, max_rounds={self.max_rounds}]")
        if self.start_price is not None and not self.feed_in_tariff <= self.start_price <= self.retail_tariff:
            raise ValueError(
                f"start_price {self.start_price!r} is outside [{self.feed_in_tariff}, {self.retail_tariff}]"
            )

    def clamp(self, price: float) -> float:
        return min(self.retail_tariff, max(self.feed_in_tariff, price))

    @property
    def first_price(self) -> float:
        if self.start_price is not None:
            return self.start_price
        return (self.feed_in_tariff + self.retail_tariff) / 2

