"""Bid channels: how the market coordinator asks twins for their answers, round by round.

Twins of this zone answer through a library call (:class:`LocalChannel`, the same code the
``p2p-bid`` function runs); twins of another zone through that zone's gateway
(:class:`GatewayChannel`, ``/function/<zone>-p2p-bid/bid``), with the gateways listed in
``P2P_ZONE_GATEWAYS`` (``fog=http://fog-gw:8080,cloud=...``). :func:`gather` asks every
channel at once and keeps what arrived by the round's deadline: a twin that does not
answer in time counts as zero in that round.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Protocol

import httpx

from metertwin.core import auth
from metertwin.core.errors import BackendUnavailable
from metertwin.p2p.market import Bidder, bid
from metertwin.p2p.settlement import TradeSink, deliver_trades

log = logging.getLogger("metertwin.p2p")
#: An answer beyond what any participant may declare (forecast + battery) is no answer.
MAX_ANSWER_KWH = 30_000.0


class BidChannel(TradeSink, Protocol):
    """Twins reachable one way. ``ask`` returns the answers that arrived by ``deadline`` (perf_counter)."""

    def ask(self, round_no: int, price: float, deadline: float) -> dict[str, float]: ...


class LocalChannel:
    """Twins of this zone: the bid logic runs as a library call in this process.

    Bids are pure and take microseconds, so they run inline; an answer computed after
    the deadline is dropped like a late network answer.
    """

    def __init__(self, market_id: str, bidders: list[Bidder]) -> None:
        self.market_id = market_id
        self.bidders = bidders
        self.ids = [b.meter_id for b in bidders]

    def ask(self, round_no: int, price: float, deadline: float) -> dict[str, float]:
        out: dict[str, float] = {}
        clock = time.perf_counter
        for b in self.bidders:
            q = bid(b, price)
            if clock() > deadline:
                break
            out[b.meter_id] = q
        return out

    def deliver(self, slot_start: float, trades: list[tuple[str, float, float]], expiry_s: int) -> dict[str, Any]:
        return deliver_trades(self.market_id, slot_start, trades, expiry_s=expiry_s)


@functools.cache
def _http() -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(5.0), limits=httpx.Limits(max_connections=64))


_token: tuple[str, float] = ("", 0.0)


def _service_token() -> str:
    """A ``service`` token for peer zones' p2p-bid, renewed well before it expires."""
    global _token
    token, renew_at = _token
    if time.time() >= renew_at:
        token = auth.issue_token("p2p-market", {"service"}, ttl_s=3600)
        _token = (token, time.time() + 1800)
    return token


class GatewayChannel:
    """Twins of another zone: that zone's ``p2p-bid`` function through its gateway."""

    def __init__(
        self, market_id: str, zone: str, base_url: str, profiles: list[dict[str, Any]], slot_minutes: int
    ) -> None:
        self.market_id = market_id
        self.url = f"{base_url.rstrip('/')}/function/{zone}-p2p-bid"
        self.profiles = profiles
        self.slot_minutes = slot_minutes
        self.ids = [p["meter_id"] for p in profiles]
        self._known = frozenset(self.ids)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {_service_token()}"}

    def ask(self, round_no: int, price: float, deadline: float) -> dict[str, float]:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return {}
        body = {"market_id": self.market_id, "round": round_no, "price": price,
                "slot_minutes": self.slot_minutes, "participants": self.profiles}
        try:
            resp = _http().post(f"{self.url}/bid", json=body, headers=self._headers(), timeout=remaining)
            answers = resp.json().get("answers") if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("market %s round %d: %s unreachable: %s", self.market_id, round_no, self.url, exc)
            return {}
        if not isinstance(answers, dict):
            return {}
        # Anything but a finite number for a twin we asked is no answer.
        return {
            k: float(v) for k, v in answers.items()
            if k in self._known and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v) and abs(v) <= MAX_ANSWER_KWH
        }

    def deliver(self, slot_start: float, trades: list[tuple[str, float, float]], expiry_s: int) -> dict[str, Any]:
        body = {"market_id": self.market_id, "slot_start": slot_start, "expiry_s": expiry_s,
                "trades": [{"meter_id": m, "kwh": k, "price": p} for m, k, p in trades]}
        try:
            resp = _http().post(f"{self.url}/outcome", json=body, headers=self._headers(), timeout=30.0)
            resp.raise_for_status()
            delivery = resp.json().get("delivery")
            return delivery if isinstance(delivery, dict) else {}
        except (httpx.HTTPError, ValueError) as exc:
            return {m: {"status": "not_sent", "error": "zone_unreachable", "message": str(exc)} for m, _, _ in trades}


def zone_gateways() -> dict[str, str]:
    """``P2P_ZONE_GATEWAYS`` (``zone=url,zone=url``) as a mapping."""
    raw = os.environ.get("P2P_ZONE_GATEWAYS", "")
    out = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        zone, _, url = item.partition("=")
        if zone and url:
            out[zone.strip()] = url.strip()
    return out


_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="p2p-ask")


def gather(channels: list[BidChannel], round_no: int, price: float, timeout_s: float) -> dict[str, float]:
    """Ask every channel at once; keep what arrived within ``timeout_s``."""
    deadline = time.perf_counter() + timeout_s
    if len(channels) == 1:
        return channels[0].ask(round_no, price, deadline)
    futures = [_pool.submit(ch.ask, round_no, price, deadline) for ch in channels]
    done, _ = wait(futures, timeout=max(0.0, deadline - time.perf_counter()))
    answers: dict[str, float] = {}
    for fut in done:
        if fut.exception() is None:
            answers.update(fut.result())
    return answers


def remote_forecast(zone: str, base_url: str, meter_id: str, slot_minutes: int) -> tuple[float, float] | None:
    """One twin's forecast ``(load_kwh, pv_kwh)`` from its own zone's ``p2p-bid``; None if it has none."""
    url = f"{base_url.rstrip('/')}/function/{zone}-p2p-bid/forecast"
    try:
        resp = _http().post(url, json={"slot_minutes": slot_minutes, "meter_ids": [meter_id]},
                            headers={"Authorization": f"Bearer {_service_token()}"}, timeout=5.0)
        resp.raise_for_status()
        value = resp.json()["forecasts"][meter_id]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise BackendUnavailable(f"zone {zone!r} did not give the forecast of meter {meter_id!r}: {exc}") from None
    if value is None:
        return None
    load, pv = (float(v) for v in value)
    if not (math.isfinite(load) and math.isfinite(pv) and load >= 0 and pv >= 0):
        raise BackendUnavailable(f"zone {zone!r} gave an invalid forecast {value!r} for meter {meter_id!r}")
    return load, pv
