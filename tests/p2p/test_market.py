"""Properties of the peer-to-peer market on random markets (pure logic, no services)."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from metertwin.p2p import market
from metertwin.p2p.clearing import Allocation, clear, reference_clearing
from metertwin.p2p.market import Battery, Bidder, MarketParams, bid
from metertwin.p2p.negotiation import Negotiation, negotiate

PROPS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EPS = 1e-9


@st.composite
def batteries(draw: st.DrawFn) -> Battery:
    cap = draw(st.floats(0.5, 15))
    lo = draw(st.floats(0, 0.5))
    return Battery(
        capacity_kwh=cap,
        soc_kwh=draw(st.floats(0, cap)),
        max_charge_kwh=draw(st.floats(0, 5)),
        max_discharge_kwh=draw(st.floats(0, 5)),
        charge_below_price=lo,
        discharge_above_price=lo + draw(st.floats(0, 0.3)),
    )


@st.composite
def bidders(draw: st.DrawFn, meter_id: str) -> Bidder:
    kwh = st.just(0.0) | st.floats(0, 6)
    return Bidder(
        meter_id=meter_id,
        load_kwh=draw(kwh),
        pv_kwh=draw(kwh),
        max_buy_price=draw(st.floats(0, 0.6)),
        min_sell_price=draw(st.floats(0, 0.6)),
        price_ramp=draw(st.just(0.0) | st.floats(0.005, 0.1)),
        battery=draw(st.none() | batteries()),
    )


@st.composite
def markets(draw: st.DrawFn, max_n: int = 12) -> tuple[list[Bidder], MarketParams]:
    feed = draw(st.floats(0.0, 0.15))
    retail = feed + draw(st.floats(0.03, 0.4))
    n = draw(st.integers(1, max_n))
    bs = [draw(bidders(f"m{i:03d}")) for i in range(n)]
    start = draw(st.none() | st.floats(feed, retail))
    return bs, MarketParams(feed, retail, start_price=start)


def _traded(answers: Mapping[str, float]) -> float:
    return min(market.volumes(answers.values()))


def _z(bs: list[Bidder], p: float) -> float:
    return market.excess_demand(bid(b, p) for b in bs)


def _check_outcome(bs: list[Bidder], params: MarketParams, neg: Negotiation) -> list[Allocation]:
    """Every safety property of a final outcome; returns the allocations."""
    price = neg.price
    by_id = {b.meter_id: b for b in bs}
    final = {b.meter_id: neg.final_answers.get(b.meter_id, 0.0) for b in bs}
    allocs = clear(price, final)
    scale = 1 + math.fsum(b.capacity_kwh() for b in bs)
    # price within the tariff band
    assert params.feed_in_tariff <= price <= params.retail_tariff
    # ends within the round limit
    assert 1 <= len(neg.rounds) <= params.max_rounds
    # energy sold equals energy bought; payments equal receipts
    bought = math.fsum(a.kwh for a in allocs if a.kwh > 0)
    sold = math.fsum(-a.kwh for a in allocs if a.kwh < 0)
    assert bought == pytest.approx(sold, abs=EPS * scale)
    paid = math.fsum(a.amount for a in allocs if a.amount > 0)
    received = math.fsum(-a.amount for a in allocs if a.amount < 0)
    assert paid == pytest.approx(received, abs=EPS * scale)
    assert len({a.meter_id for a in allocs}) == len(allocs) == len(bs)
    for a in allocs:
        b = by_id[a.meter_id]
        # no self-trade: one side only, never more than wanted, in the direction wanted
        assert a.kwh * a.wanted_kwh >= 0
        assert abs(a.kwh) <= abs(a.wanted_kwh) + EPS
        assert a.price == price
        if a.kwh > 0:  # buyers pay at most their limit and at most retail
            assert price <= b.max_buy_price + EPS
            assert a.amount <= a.kwh * params.retail_tariff + EPS
        if a.kwh < 0:  # sellers get at least their limit and at least feed-in
            assert price >= b.min_sell_price - EPS
            assert -a.amount >= -a.kwh * params.feed_in_tariff - EPS
        # no one is worse off than with the grid alone: the rest of the need goes to the grid
        need = b.net_need_kwh
        grid_only = need * (params.retail_tariff if need > 0 else params.feed_in_tariff)
        rest = need - a.kwh
        with_market = a.amount + rest * (params.retail_tariff if rest > 0 else params.feed_in_tariff)
        if a.wanted_kwh * need >= 0 and abs(a.kwh) <= abs(need) + EPS:
            assert with_market <= grid_only + EPS * scale
    return allocs


def _check_matches_reference(bs: list[Bidder], params: MarketParams, neg: Negotiation) -> None:
    ref = reference_clearing(bs, params)
    tol = params.tolerance_kwh
    scale = 1 + math.fsum(b.capacity_kwh() for b in bs)
    z_mine = _z(bs, neg.price)
    # a clearing price: balanced within tolerance, or at the reference's price
    assert abs(z_mine) <= tol or abs(neg.price - ref.price) <= 2 * params.price_tolerance + 1e-9, (
        neg.price, z_mine, ref
    )
    # the same energy changes hands (at a jump of z, the reference side with more volume)
    v_ref = max(_traded({b.meter_id: bid(b, p) for b in bs}) for p in (ref.lo, ref.hi, ref.price))
    v_mine = _traded(neg.final_answers)
    assert v_mine == pytest.approx(v_ref, abs=2 * tol + 1e-3 * scale), (neg.status, neg.price, ref)


@given(st.data())
@PROPS
def test_bids_are_monotone_and_respect_limits(data: st.DataObject) -> None:
    b = data.draw(bidders("m"))
    p1, p2 = sorted(data.draw(st.lists(st.floats(0, 0.7), min_size=2, max_size=2)))
    assert bid(b, p1) >= bid(b, p2) - EPS
    for p in (p1, p2):
        q = bid(b, p)
        if q > EPS:
            assert p <= b.max_buy_price
        if q < -EPS:
            assert p >= b.min_sell_price


@given(markets())
@PROPS
def test_random_market_is_correct(case: tuple[list[Bidder], MarketParams]) -> None:
    bs, params = case
    neg = negotiate(bs, params)
    assert neg.status != "max_rounds", neg.rounds[-3:]
    _check_outcome(bs, params, neg)
    _check_matches_reference(bs, params, neg)


@given(markets(), st.randoms(use_true_random=False))
@PROPS
def test_answer_order_does_not_matter(case: tuple[list[Bidder], MarketParams], rnd: random.Random) -> None:
    bs, params = case
    plain = negotiate(bs, params)

    def shuffled(_round: int, price: float, bidders: list[Bidder]) -> dict[str, float]:
        order = list(bidders)
        rnd.shuffle(order)
        return {b.meter_id: bid(b, price) for b in order}

    mixed = negotiate(list(reversed(bs)), params, shuffled)
    assert mixed.price == plain.price
    assert [r.price for r in mixed.rounds] == [r.price for r in plain.rounds]
    assert clear(mixed.price, mixed.final_answers) == clear(plain.price, plain.final_answers)


@given(markets(), st.randoms(use_true_random=False), st.floats(0.05, 0.5))
@PROPS
def test_timeouts_count_as_zero_and_market_still_ends(
    case: tuple[list[Bidder], MarketParams], rnd: random.Random, p_timeout: float
) -> None:
    bs, params = case

    def flaky(_round: int, price: float, bidders: list[Bidder]) -> dict[str, float]:
        return {b.meter_id: bid(b, price) for b in bidders if rnd.random() > p_timeout}

    neg = negotiate(bs, params, flaky)
    allocs = _check_outcome(bs, params, neg)
    missing = set(neg.rounds[-1].missing) if neg.status != "max_rounds" else set()
    for a in allocs:
        if a.meter_id not in neg.final_answers:
            assert a.kwh == 0
    assert missing <= {a.meter_id for a in allocs if a.kwh == 0} | set(neg.final_answers)


@given(markets(), st.data())
@PROPS
def test_dead_and_late_twins_still_clear_correctly(
    case: tuple[list[Bidder], MarketParams], data: st.DataObject
) -> None:
    bs, params = case
    assume(len(bs) >= 2)
    dead = set(data.draw(st.sets(st.sampled_from([b.meter_id for b in bs]), max_size=len(bs) - 1)))
    late_rounds = data.draw(st.integers(0, 5))

    def ask(round_no: int, price: float, bidders: list[Bidder]) -> dict[str, float]:
        # dead twins never answer; in the first rounds the odd-numbered twins time out too
        return {
            b.meter_id: bid(b, price) for i, b in enumerate(bidders)
            if b.meter_id not in dead and not (round_no <= late_rounds and i % 2)
        }

    neg = negotiate(bs, params, ask)
    assert neg.status != "max_rounds"
    _check_outcome(bs, params, neg)
    assert all(neg.final_answers.get(m, 0.0) == 0.0 for m in dead)
    # the result is the clearing of the twins that answered at the end; with late twins back
    # in time, that is everyone alive
    answered = [b for b in bs if b.meter_id in neg.final_answers]
    _check_matches_reference(answered, params, neg)
    if late_rounds <= 1:
        assert {b.meter_id for b in answered} == {b.meter_id for b in bs} - dead


@given(markets(max_n=6), st.integers(1, 100))
@PROPS
def test_round_limit_and_min_rounds(case: tuple[list[Bidder], MarketParams], limit: int) -> None:
    bs, p = case
    params = MarketParams(p.feed_in_tariff, p.retail_tariff, max_rounds=limit, min_rounds=limit // 2)
    neg = negotiate(bs, params)
    assert params.min_rounds <= len(neg.rounds) <= limit
    _check_outcome(bs, params, neg)


def test_two_twins_step_bids() -> None:
    bs = [Bidder("a", 3, 0, 0.25, 0.05), Bidder("b", 0, 5, 0.3, 0.12)]
    params = MarketParams(0.08, 0.30)
    neg = negotiate(bs, params)
    assert neg.status == "bracketed"
    assert neg.price == pytest.approx(0.12, abs=2e-6)
    allocs = {a.meter_id: a for a in clear(neg.price, neg.final_answers)}
    assert allocs["a"].kwh == 3
    assert allocs["b"].kwh == pytest.approx(-3)  # the long side (sellers) rationed pro rata


def test_pro_rata_rationing() -> None:
    allocs = {a.meter_id: a for a in clear(0.2, {"b1": 2.0, "b2": 6.0, "s": -4.0})}
    assert allocs["b1"].kwh == pytest.approx(1.0)
    assert allocs["b2"].kwh == pytest.approx(3.0)
    assert allocs["s"].kwh == -4.0
    assert allocs["s"].amount == pytest.approx(-0.8)


def test_excess_supply_at_feed_in_and_demand_at_retail() -> None:
    params = MarketParams(0.05, 0.30)
    sellers = [Bidder("s1", 0, 4, 0.3, 0.0), Bidder("b1", 1, 0, 0.3, 0.0)]
    neg = negotiate(sellers, params)
    assert (neg.status, neg.price) == ("at_feed_in", 0.05)
    buyers = [Bidder("s1", 0, 1, 0.3, 0.0), Bidder("b1", 4, 0, 0.5, 0.0)]
    neg = negotiate(buyers, params)
    assert (neg.status, neg.price) == ("at_retail", 0.30)


def test_battery_buys_cheap_and_sells_dear() -> None:
    bat = Battery(10, 5, 2, 3, charge_below_price=0.1, discharge_above_price=0.2)
    b = Bidder("x", 0, 0, 0.3, 0.0, battery=bat)
    assert bid(b, 0.05) == 2
    assert bid(b, 0.15) == 0
    assert bid(b, 0.25) == -3


def test_params_name_bad_values() -> None:
    with pytest.raises(ValueError, match=r"feed_in_tariff 0\.3"):
        MarketParams(0.3, 0.2)
    with pytest.raises(ValueError, match=r"start_price 0\.9"):
        MarketParams(0.1, 0.2, start_price=0.9)
