"""Running one market: its bid channels, the rounds, the clearing, the record and the delivery.

:func:`run_market` moves an ``open`` market to ``running`` (exactly one caller wins), asks
every channel round by round until the negotiation ends, records each round as it happens,
clears at the final price, stores the trades and the result atomically, then has each twin
tell its meter its trade. A failure during the negotiation marks the market ``failed``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from metertwin.core.errors import MeterTwinError
from metertwin.core.http import validate
from metertwin.core.settings import get_settings
from metertwin.p2p.channels import BidChannel, GatewayChannel, LocalChannel, gather, zone_gateways
from metertwin.p2p.clearing import clear
from metertwin.p2p.market import Bidder
from metertwin.p2p.negotiation import Negotiation
from metertwin.p2p.participants import ParticipantIn
from metertwin.p2p.registration import market_params
from metertwin.p2p.settlement import deliver_outcome, settle
from metertwin.p2p.store import MarketStore, get_store

log = logging.getLogger("metertwin.p2p")


def build_channels(market_id: str, spec: Mapping[str, Any], profiles: Mapping[str, dict[str, Any]]
                   ) -> tuple[list[BidChannel], float]:
    """Group the participants by how they are reached; also the total capacity (kWh) known here."""
    here = spec.get("zone") or get_settings().zone
    params = market_params(spec)
    local: list[Bidder] = []
    remote: dict[str, list[dict[str, Any]]] = {}
    for mid in sorted(profiles):
        prof = profiles[mid]
        zone = prof.get("zone") or here
        if zone == here:
            p = validate({k: v for k, v in prof.items() if k != "meter_id"} | {"zone": zone}, ParticipantIn)
            local.append(p.to_bidder(mid, params, None))
        else:
            remote.setdefault(zone, []).append(prof)
    channels: list[BidChannel] = []
    if local:
        channels.append(LocalChannel(market_id, local))
    gateways = zone_gateways()
    for zone, profs in sorted(remote.items()):
        if zone in gateways:
            channels.append(GatewayChannel(market_id, zone, gateways[zone], profs, spec["slot_minutes"]))
        else:
            # Its gateway was configured at registration and is gone now: those twins never answer.
            log.error("market %s: no gateway for zone %r; its %d twins count as zero", market_id, zone, len(profs))
    capacity = math.fsum(b.capacity_kwh() for b in local) + math.fsum(
        (p.get("forecast_load_kwh") or 0.0) + (p.get("forecast_pv_kwh") or 0.0)
        for profs in remote.values() for p in profs
    )
    return channels, capacity


def run_market(market_id: str, store: MarketStore | None = None) -> dict[str, Any]:
    """Negotiate, clear, record and deliver one ``open`` market; returns its result.

    ``store`` defaults to the process's store over the zone's Redis.
    """
    store = store or get_store()
    spec = store.get(market_id)["spec"]
    params = market_params(spec)
    # A run is bounded by its rounds' timeouts; one 'running' for much longer died with its process.
    stale_after_s = spec["max_rounds"] * spec["round_timeout_ms"] / 1000.0 + 300.0
    store.begin_run(market_id, stale_after_s=stale_after_s)
    started = time.perf_counter()
    try:
        profiles = store.participants(market_id)
        channels, capacity = build_channels(market_id, spec, profiles)
        neg = Negotiation(params, frozenset(profiles), capacity_kwh=capacity or 1.0)
        timeout_s = spec["round_timeout_ms"] / 1000.0
        while not neg.done:
            answers = gather(channels, len(neg.rounds) + 1, neg.price, timeout_s) if channels else {}
            rec = neg.observe(answers)
            # Each round is recorded as it happens, so the operator can watch the market converge.
            store.append_round(market_id, rec.to_dict())
        negotiation_ms = (time.perf_counter() - started) * 1000
        final = {mid: neg.final_answers.get(mid, 0.0) for mid in profiles}
        allocations = clear(neg.price, final)
        result, trade_records = settle(market_id, spec, params, neg, allocations, negotiation_ms)
        store.finish(market_id, result, trade_records, spec["slot_start"])
    except Exception as exc:
        why = exc.message if isinstance(exc, MeterTwinError) else f"{type(exc).__name__}: {exc}"
        # Best effort: the original error is the one to report (Redis may be what failed).
        with contextlib.suppress(MeterTwinError):
            store.move(market_id, "running", "failed", field="error", value=why)
        raise
    if spec.get("deliver", True):
        result["delivery"] = deliver_outcome(store, market_id, spec, channels, allocations)
    result["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 3)
    return result
