"""The coordinator's negotiation of one market: announce a price, observe the answers, move the price.

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

"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from metertwin.p2p.market import Bidder, MarketParams, bid, excess_demand, volumes

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

