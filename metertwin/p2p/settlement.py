"""The outcome of a cleared market: settlement lines per twin, the market's result, and delivery to the meters.

Each twin sends only its final trade to its meter, through the write capability
(:func:`deliver_trades`, a ``trade`` command); the coordinator records per trade what
happened (:func:`deliver_outcome`). A delivery failure never undoes a trade.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Protocol

from metertwin.core.errors import MeterTwinError
from metertwin.p2p.clearing import Allocation
from metertwin.p2p.market import MarketParams, excess_demand
from metertwin.p2p.negotiation import Negotiation
from metertwin.p2p.store import MarketStore

#: A trade command never outlives this: the write capability's limit (``twin.commands.MAX_EXPIRY_S``, not
#: imported here so that settling needs no MQTT client).
MAX_EXPIRY_S = 7 * 24 * 3600


class TradeSink(Protocol):
    """Twins reachable one way, told their final trades ``(meter_id, kwh, price)``; answers per meter."""

    ids: list[str]

    def deliver(self, slot_start: float, trades: list[tuple[str, float, float]], expiry_s: int) -> dict[str, Any]: ...


#: Money is rounded half-up to this (cents of the market's currency), line by line.
CENT = Decimal("0.01")


def money(x: float) -> Decimal:
    """``x`` currency units as a Decimal rounded half-up to cents (from its shortest repr, not its binary value)."""
    return Decimal(repr(x)).quantize(CENT, rounding=ROUND_HALF_UP)


def settle(market_id: str, spec: Mapping[str, Any], params: MarketParams, neg: Negotiation,
           allocations: list[Allocation], negotiation_ms: float
           ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The market's result and one trade record (settlement line) per participant."""
    trade_records: dict[str, dict[str, Any]] = {}
    amounts: list[Decimal] = []
    for a in allocations:
        # What the same energy would have cost (or earned) with the grid alone.
        grid = money(a.kwh * (params.retail_tariff if a.kwh > 0 else params.feed_in_tariff))
        amount = money(a.amount)
        amounts.append(amount)
        trade_records[a.meter_id] = {
            "market_id": market_id, "meter_id": a.meter_id, "slot_start": spec["slot_start"],
            "slot_minutes": spec["slot_minutes"], "side": a.side, "wanted_kwh": a.wanted_kwh, "kwh": a.kwh,
            "price": a.price, "amount": float(amount), "grid_amount": float(grid), "benefit": float(grid - amount),
            "counterparty": "pool" if a.kwh else None,
        }
    paid = sum((x for x in amounts if x > 0), Decimal("0.00"))
    received = -sum((x for x in amounts if x < 0), Decimal("0.00"))
    bought = math.fsum(a.kwh for a in allocations if a.kwh > 0)
    sold = math.fsum(-a.kwh for a in allocations if a.kwh < 0)
    last = neg.rounds[-1] if neg.rounds else None
    result = {
        "market_id": market_id, "slot_start": spec["slot_start"], "slot_minutes": spec["slot_minutes"],
        "status": neg.status, "converged": neg.status in ("converged", "bracketed", "at_retail", "at_feed_in"),
        "price": neg.price, "rounds": len(neg.rounds), "participants": len(allocations),
        "excess_kwh": excess_demand(neg.final_answers.values()),
        "bought_kwh": bought, "sold_kwh": sold,
        "paid": float(paid), "received": float(received),
        # Each line is rounded to cents: what the pool keeps (or, negative, pays) for that rounding.
        "rounding": float(paid - received),
        "missing_last_round": last.missing if last else [],
        "negotiation_ms": round(negotiation_ms, 3),
        "feed_in_tariff": params.feed_in_tariff, "retail_tariff": params.retail_tariff,
    }
    return result, trade_records


def deliver_outcome(store: MarketStore, market_id: str, spec: Mapping[str, Any], sinks: Sequence[TradeSink],
                    allocations: list[Allocation]) -> dict[str, int]:
    """Each twin sends its final trade (and only that) to its meter; record what happened. Counts per status."""
    slot_end = spec["slot_start"] + spec["slot_minutes"] * 60
    expiry_s = int(min(MAX_EXPIRY_S, max(60, slot_end - time.time() + 60)))
    by_meter = {a.meter_id: a for a in allocations if a.kwh != 0}
    counts: dict[str, int] = {}
    for ch in sinks:
        todo = [(m, by_meter[m].kwh, by_meter[m].price) for m in ch.ids if m in by_meter]
        if not todo:
            continue
        outcome = ch.deliver(spec["slot_start"], todo, expiry_s)
        for meter_id, _, _ in todo:
            delivery = outcome.get(meter_id) or {"status": "not_sent", "error": "no_answer"}
            store.set_delivery(market_id, meter_id, delivery)
            counts[delivery["status"]] = counts.get(delivery["status"], 0) + 1
    return counts


def deliver_trades(
    market_id: str, slot_start: float, trades: list[tuple[str, float, float]], *, expiry_s: int
) -> dict[str, dict[str, Any]]:
    """Each twin sends only its final trade ``(meter_id, kwh, price)`` to its meter (write capability).

    A meter that cannot be reached now keeps its command ``pending`` in the write
    capability (republished by its sweeper); an error here never undoes a trade.
    """
    from metertwin.twin import commands  # imported here: bidding and clearing need no MQTT

    out: dict[str, dict[str, Any]] = {}
    for meter_id, kwh, price in trades:
        params = {"market_id": market_id, "slot_start": slot_start, "kwh": kwh, "price": price}
        try:
            cmd = commands.submit(meter_id, "trade", params, expiry_s=expiry_s, actor=f"p2p-market:{market_id}")
            out[meter_id] = {"command_id": cmd["id"], "status": cmd["status"]}
        except MeterTwinError as exc:
            out[meter_id] = {"status": "not_sent", "error": exc.code, "message": exc.message}
    return out
