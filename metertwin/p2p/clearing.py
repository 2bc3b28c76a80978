"""Clearing at the final price (everyone settles at one price, the long side rationed pro rata),
and an independent reference clearing by bisection to check a negotiation against."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from metertwin.p2p.market import Bidder, MarketParams, bid, excess_demand, volumes

# --- settlement --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Allocation:
    """One twin's final trade: ``kwh`` > 0 bought, < 0 sold, ``amount`` > 0 paid, < 0 received."""

    meter_id: str
    wanted_kwh: float
    kwh: float
    price: float
    amount: float

    @property
    def side(self) -> str:
        return "buy" if self.kwh > 0 else "sell" if self.kwh < 0 else "none"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "side": self.side}


def clear(price: float, answers: Mapping[str, float]) -> list[Allocation]:
    """Allocate at ``price``: the short side trades in full, the long side pro rata.

    Every participant is a net buyer or a net seller, never both, and trades with the
    pool at the single price (no self-trade). Sorted by meter id.
    """
    buy, sell = volumes(answers.values())
    traded = min(buy, sell)
    buy_ratio = traded / buy if buy > 0 else 0.0
    sell_ratio = traded / sell if sell > 0 else 0.0
    out: list[Allocation] = []
    for mid in sorted(answers):
        q = answers[mid]
        if q > 0:
            kwh = q if buy <= sell else q * buy_ratio
        elif q < 0:
            kwh = q if sell <= buy else q * sell_ratio
        else:
            kwh = 0.0
        out.append(Allocation(mid, q, kwh, price, kwh * price))
    return out


# --- reference clearing ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reference:
    """Independent clearing by bisection on the monotone excess demand."""

    price: float
    lo: float
    hi: float
    excess_kwh: float


def reference_clearing(
    bidders: Iterable[Bidder], params: MarketParams, *, iterations: int = 200, eps: float = 1e-12
) -> Reference:
    """Bisection on ``z(p)`` over the tariff band, straight from the bid functions."""
    bs = list(bidders)

    def z(p: float) -> float:
        return excess_demand(bid(b, p) for b in bs)

    lo, hi = params.feed_in_tariff, params.retail_tariff
    z_hi = z(hi)
    if z_hi >= 0:
        return Reference(hi, hi, hi, z_hi)
    z_lo = z(lo)
    if z_lo <= 0:
        return Reference(lo, lo, lo, z_lo)
    for _ in range(iterations):
        if hi - lo <= eps:
            break
        mid = (lo + hi) / 2
        if z(mid) > 0:
            lo = mid
        else:
            hi = mid
    mid = (lo + hi) / 2
    return Reference(mid, lo, hi, z(mid))

