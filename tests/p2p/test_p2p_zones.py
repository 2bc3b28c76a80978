"""The coordinator's round gathering on random markets: zones, answer order and timeouts do not change the result.

Each zone is one bid channel of the coordinator (:mod:`metertwin.p2p.channels`; here the in-zone
library channel for each; the HTTP channel to another zone's gateway is exercised in ``test_p2p.py``).
With several channels the coordinator gathers them concurrently, so answers arrive in varying order.
"""

from __future__ import annotations

import math
import random
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metertwin.p2p import market
from metertwin.p2p.channels import BidChannel, LocalChannel, gather
from metertwin.p2p.clearing import clear
from metertwin.p2p.negotiation import Negotiation, negotiate
from tests.p2p.test_market import _check_outcome, markets

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ZONES = ["edge", "fog", "cloud", "edge-2"]


class SlowChannel:
    """A zone whose twins sometimes answer after the round deadline (a slow link)."""

    def __init__(self, inner: object, late_rounds: set[int]) -> None:
        self.inner = inner
        self.ids = inner.ids  # type: ignore[attr-defined]
        self.late_rounds = late_rounds

    def ask(self, round_no: int, price: float, deadline: float) -> dict[str, float]:
        if round_no in self.late_rounds:
            time.sleep(max(0.0, deadline - time.perf_counter()) + 0.005)
        return self.inner.ask(round_no, price, deadline)  # type: ignore[attr-defined,no-any-return]

    def deliver(self, *_a: object) -> dict[str, object]:
        return {}


def _run(bs: list[market.Bidder], params: market.MarketParams, channels: list[BidChannel],
         timeout_s: float = 5.0) -> Negotiation:
    cap = math.fsum(b.capacity_kwh() for b in bs)
    neg = Negotiation(params, frozenset(b.meter_id for b in bs), capacity_kwh=cap)
    while not neg.done:
        neg.observe(gather(channels, len(neg.rounds) + 1, neg.price, timeout_s))
    return neg


def _channels(bs: list[market.Bidder], zone_of: dict[str, str], rnd: random.Random) -> list[BidChannel]:
    groups: dict[str, list[market.Bidder]] = {}
    for b in bs:
        groups.setdefault(zone_of[b.meter_id], []).append(b)
    order = list(groups)
    rnd.shuffle(order)
    return [LocalChannel("m", rnd.sample(groups[z], len(groups[z]))) for z in order]


@given(markets(), st.data(), st.randoms(use_true_random=False))
@PROPS
def test_same_result_whichever_zone_the_twins_run_in(
    case: tuple[list[market.Bidder], market.MarketParams], data: st.DataObject, rnd: random.Random
) -> None:
    bs, params = case
    zone_of = {b.meter_id: data.draw(st.sampled_from(ZONES)) for b in bs}
    one_zone = negotiate(bs, params)
    spread = _run(bs, params, _channels(bs, zone_of, rnd))
    assert spread.price == one_zone.price
    assert [r.price for r in spread.rounds] == [r.price for r in one_zone.rounds]
    assert clear(spread.price, spread.final_answers) == clear(one_zone.price, one_zone.final_answers)


@given(markets(max_n=8), st.data(), st.randoms(use_true_random=False))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_zone_that_answers_late_counts_as_zero_in_that_round(
    case: tuple[list[market.Bidder], market.MarketParams], data: st.DataObject, rnd: random.Random
) -> None:
    bs, params = case
    zone_of = {b.meter_id: data.draw(st.sampled_from(ZONES[:2])) for b in bs}
    late = set(data.draw(st.lists(st.integers(1, 6), max_size=3)))
    channels = _channels(bs, zone_of, rnd)
    slow = SlowChannel(channels[0], late)
    neg = _run(bs, params, [slow, *channels[1:]], timeout_s=0.02)
    for rec in neg.rounds:
        if rec.round in late:
            assert set(slow.ids) <= set(rec.missing)
    _check_outcome(bs, params, neg)
    assert neg.status != "max_rounds"
