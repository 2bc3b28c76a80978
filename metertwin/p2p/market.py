"""Peer-to-peer energy market among twins: pure logic, no I/O.

A market clears one time slot by *tâtonnement*: a coordinator announces a price,
every twin answers with the quantity it wants at that price (``+`` buy, ``-`` sell),
and the price moves with the excess demand ``z(p) = Σ buys - Σ sells``:

    p ← clamp(p + k·z(p), bracket)

Each twin's answer is non-increasing in ``p`` (demand falls, supply rises), so
``z`` is monotone and every announced price tells on which side of the clearing
price it lies. The coordinator keeps that bracket ``[lo, hi]`` (inside the
feed-in..retail tariff band) and picks the step ``k`` adaptively: one-sided it
doubles the step until the sign of ``z`` flips (or a tariff is reached); with a
two-sided bracket ``k`` is the secant estimate of ``1/|z'|`` (regula falsi,
Illinois variant), and if the bracket did not halve in two rounds it bisects.
So the market ends in ``O(log((retail-feed_in)/price_tolerance))`` rounds even
for step-shaped bids, well inside the round limit.

Everyone settles at the final single price; the long side is rationed pro rata.
Sums use :func:`math.fsum` (exactly rounded), so the outcome does not depend on
the order in which answers arrive.

Prices are currency units per kWh, quantities kWh per slot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


# --- the negotiation state machine -------------------------------------------------------

Status = Literal["running", "converged", "bracketed", "at_retail", "at_feed_in", "max_rounds"]
Rule = Literal["start", "explore", "secant", "bisect", "edge", "hold", "reset", "confirm"]


@dataclass(slots=True)
class RoundRecord:
    """What one round announced and gathered."""

    round: int
    price: float
    excess_kwh: float
    buy_kwh: float
    sell_kwh: float
    answered: int
    missing: list[str]
    rule: Rule
    lo: float
    hi: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Negotiation:
    """The coordinator's round logic: announce :attr:`price`, feed the answers to :meth:`observe`.

    ``participants`` is the set of ids asked each round; an id missing from the answers
    (timed out, failed, invalid) counts as zero in that round. When the set of
    answering twins changes, ``z`` changed shape, so the bracket is reset to the
    tariff band (the current price is kept).
    """

    params: MarketParams
    participants: frozenset[str]
    capacity_kwh: float = 1.0
    price: float = 0.0
    rule: Rule = "start"
    status: Status = "running"
    rounds: list[RoundRecord] = field(default_factory=list)
    answers_at: dict[float, dict[str, float]] = field(default_factory=dict)
    final_answers: dict[str, float] = field(default_factory=dict)
    _lo: float = 0.0
    _hi: float = 0.0
    _zlo: float | None = None
    _zhi: float | None = None
    _step: float = 0.0
    _responders: frozenset[str] | None = None
    _width_mark: float = 0.0
    _since_halved: int = 0
    _last_side: int = 0
    _side_streak: int = 0

    def __post_init__(self) -> None:
        p = self.params
        self.price = p.first_price
        self._lo, self._hi = p.feed_in_tariff, p.retail_tariff
        self._width_mark = self._hi - self._lo
        self.capacity_kwh = max(self.capacity_kwh, 1e-9)
        # First exploratory step: a price move of a quarter band for an imbalance of the whole capacity.
        self._step = 0.25 * (p.retail_tariff - p.feed_in_tariff) / self.capacity_kwh

    @property
    def done(self) -> bool:
        return (self.status != "running" and len(self.rounds) >= self.params.min_rounds) or (
            len(self.rounds) >= self.params.max_rounds
        )

    def observe(self, answers: Mapping[str, float]) -> RoundRecord:
        """Record the answers to the current price and choose the next price."""
        if self.done:
            raise RuntimeError("negotiation is over")
        p = self.params
        price = self.price
        got = {k: float(v) for k, v in answers.items() if k in self.participants and math.isfinite(v)}
        missing = sorted(self.participants - got.keys())
        z = excess_demand(got.values())
        buy, sell = volumes(got.values())
        responders = frozenset(got)
        rule = self.rule
        # The market may end only on answers from a stable set of twins: the same set as in
        # the round before (or everyone). A twin that timed out once is asked again before
        # the market ends without it; one that never answers is, in the end, left out.
        stable = responders == self._responders or (self._responders is None and not missing)
        if self._responders is not None and responders != self._responders:
            self._reset_bracket()
            rule = "reset"
        self._responders = responders
        self.answers_at[price] = got
        rec = RoundRecord(len(self.rounds) + 1, price, z, buy, sell, len(got), missing, rule, self._lo, self._hi)
        self.rounds.append(rec)

        if self.status == "running":
            self._update(price, z, stable)
            rec.lo, rec.hi = self._lo, self._hi
            if self.status != "running":
                self.price, self.final_answers = self._final_choice()
            elif len(self.rounds) >= p.max_rounds:
                self.status = "max_rounds"
                self.price, self.final_answers = price, got
        else:
            # Hold rounds (min_rounds) re-announce the final price; its latest answers settle.
            self.rule = "hold"
            self.final_answers = got
        return rec

    # -- internals -----------------------------------------------------------------------
    def _reset_bracket(self) -> None:
        self._lo, self._hi = self.params.feed_in_tariff, self.params.retail_tariff
        self._zlo = self._zhi = None
        self._width_mark = self._hi - self._lo
        self._since_halved = 0
        self._side_streak = 0
        self._last_side = 0

    def _update(self, price: float, z: float, stable: bool) -> None:
        p = self.params
        side = 0 if abs(z) <= p.tolerance_kwh else 1 if z > 0 else -1
        if side > 0:
            self._lo, self._zlo = price, z
        elif side < 0:
            self._hi, self._zhi = price, z
        end: Status | None = None
        if side == 0:
            end = "converged"
        elif side > 0 and price >= p.retail_tariff:
            end = "at_retail"
        elif side < 0 and price <= p.feed_in_tariff:
            end = "at_feed_in"
        elif self._hi - self._lo <= p.price_tolerance and self._zlo is not None and self._zhi is not None:
            end = "bracketed"  # both ends asked: z jumps across zero between them
        if end is not None:
            if stable:
                self.status = end
            else:
                self.rule = "confirm"  # ask again at the same price before ending without someone
            return
        self._side_streak = self._side_streak + 1 if side == self._last_side else 1
        self._last_side = side
        width = self._hi - self._lo
        if width <= self._width_mark / 2:
            self._width_mark, self._since_halved = width, 0
        else:
            self._since_halved += 1
        self.price, self.rule = self._next_price(price, z)

    def _next_price(self, price: float, z: float) -> tuple[float, Rule]:
        lo, hi = self._lo, self._hi
        if self._zlo is None or self._zhi is None:
            # One-sided: tâtonnement step, doubled each round until z changes sign or a tariff is hit.
            if self.rule == "explore":
                self._step *= 2
            target = price + self._step * z
            if (side_hi := target >= hi) or target <= lo:
                return (hi if side_hi else lo), "edge"
            return target, "explore"
        if self._since_halved >= 2:
            self._since_halved = 0
            self._width_mark = hi - lo
            return (lo + hi) / 2, "bisect"
        # Regula falsi (Illinois): the endpoint kept twice in a row has its z halved.
        zlo, zhi = self._zlo, -self._zhi
        if self._side_streak >= 2:
            if self._last_side > 0:
                zhi /= 2 ** (self._side_streak - 1)
            else:
                zlo /= 2 ** (self._side_streak - 1)
        target = lo + (hi - lo) * zlo / (zlo + zhi)
        if not lo < target < hi:
            return (lo + hi) / 2, "bisect"
        return target, "secant"

    def _final_choice(self) -> tuple[float, dict[str, float]]:
        """The price everyone settles at, and the answers given to it."""
        if self.status == "bracketed":
            # z jumps across zero inside a bracket narrower than price_tolerance: of its two
            # ends, settle where more energy changes hands.
            best = max(
                (self._lo, self._hi),
                key=lambda q: (min(volumes(self.answers_at.get(q, {}).values())), -q),
            )
            return best, self.answers_at.get(best, {})
        return self.price, self.answers_at[self.price]


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


def negotiate(
    bidders: Iterable[Bidder],
    params: MarketParams,
    ask: Callable[[int, float, list[Bidder]], Mapping[str, float]] | None = None,
) -> Negotiation:
    """Run a whole negotiation in memory (tests, benchmarks).

    ``ask(round, price, bidders)`` returns the answers that arrived; by default every
    twin answers with :func:`bid`.
    """
    bs = sorted(bidders, key=lambda b: b.meter_id)
    cap = math.fsum(b.capacity_kwh() for b in bs)
    neg = Negotiation(params, frozenset(b.meter_id for b in bs), capacity_kwh=cap)
    while not neg.done:
        if ask is None:
            answers: Mapping[str, float] = {b.meter_id: bid(b, neg.price) for b in bs}
        else:
            answers = ask(len(neg.rounds) + 1, neg.price, bs)
        neg.observe(answers)
    return neg


# --- untrusted input ---------------------------------------------------------------------
# pydantic only validates what callers send; the market maths above does not use it.
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
