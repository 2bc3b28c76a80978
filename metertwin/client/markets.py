"""Clients of the edge zone's market and fleet functions: P2P market and bid, demand response, upgrades."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metertwin.client.transport import Api, route

Json = dict[str, Any]


@dataclass
class P2PMarket(Api):
    """``edge-p2p-market``: community markets for one 15-minute slot; trades per meter."""

    function: str = "edge-p2p-market"

    @route("POST", "/markets")
    def open_market(self, slot_start: float | str, **terms: Any) -> Json:
        """Open a market (``feed_in_tariff``, ``retail_tariff``, ``market_id`` ... as keywords)."""
        return dict(self._call("POST", "/markets", json={"slot_start": slot_start, **terms}))

    @route("GET", "/markets")
    def markets(self, *, limit: int | None = None) -> Json:
        return dict(self._call("GET", "/markets", params={"limit": limit}))

    @route("GET", "/markets/{market_id}")
    def market(self, market_id: str) -> Json:
        return dict(self._call("GET", f"/markets/{market_id}"))

    @route("PUT", "/markets/{market_id}/participants/{meter_id}")
    def join(self, market_id: str, meter_id: str, participant: Json) -> Json:
        """One meter joins (a consumer token for its own meter, or utility)."""
        return dict(self._call("PUT", f"/markets/{market_id}/participants/{meter_id}", json=participant))

    @route("POST", "/markets/{market_id}/participants")
    def add_participants(self, market_id: str, participants: list[Json]) -> Json:
        return dict(self._call("POST", f"/markets/{market_id}/participants", json={"participants": participants}))

    @route("GET", "/markets/{market_id}/participants")
    def participants(self, market_id: str) -> Json:
        return dict(self._call("GET", f"/markets/{market_id}/participants"))

    @route("POST", "/markets/{market_id}/run")
    def run(self, market_id: str) -> Json:
        """Negotiate; only the final trades reach the meters."""
        return dict(self._call("POST", f"/markets/{market_id}/run", json={}))

    @route("GET", "/markets/{market_id}/rounds")
    def rounds(self, market_id: str, *, start: int | None = None, count: int | None = None) -> Json:
        return dict(self._call("GET", f"/markets/{market_id}/rounds", params={"from": start, "count": count}))

    @route("GET", "/markets/{market_id}/result")
    def result(self, market_id: str) -> Json:
        return dict(self._call("GET", f"/markets/{market_id}/result"))

    @route("GET", "/markets/{market_id}/trades")
    def trades(self, market_id: str) -> Json:
        return dict(self._call("GET", f"/markets/{market_id}/trades"))

    @route("GET", "/markets/{market_id}/trades/{meter_id}")
    def trade(self, market_id: str, meter_id: str) -> Json:
        return dict(self._call("GET", f"/markets/{market_id}/trades/{meter_id}"))

    @route("GET", "/meters/{meter_id}/trades")
    def meter_trades(self, meter_id: str, *, limit: int | None = None) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/trades", params={"limit": limit}))


@dataclass
class P2PBid(Api):
    """``edge-p2p-bid``: the twins' side of a market, called by the market coordinator (``service``)."""

    function: str = "edge-p2p-bid"

    @route("POST", "/bid")
    def bid(self, body: Json) -> Json:
        return dict(self._call("POST", "/bid", json=body))

    @route("POST", "/forecast")
    def forecast(self, meter_ids: list[str], *, slot_minutes: int = 15) -> Json:
        return dict(self._call("POST", "/forecast", json={"meter_ids": meter_ids, "slot_minutes": slot_minutes}))

    @route("POST", "/outcome")
    def outcome(self, body: Json) -> Json:
        return dict(self._call("POST", "/outcome", json=body))


@dataclass
class DemandResponse(Api):
    """``edge-dr-event``: OpenADR events as each twin's VEN, preferences, and the operators' view."""

    function: str = "edge-dr-event"

    @route("GET", "/meters/{meter_id}/events")
    def meter_events(self, meter_id: str) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/events"))

    @route("GET", "/meters/{meter_id}/events/{event_id}")
    def meter_event(self, meter_id: str, event_id: str) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/events/{event_id}"))

    @route("GET", "/meters/{meter_id}/dr-preferences")
    def preferences(self, meter_id: str) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/dr-preferences"))

    @route("PUT", "/meters/{meter_id}/dr-preferences")
    def set_preferences(self, meter_id: str, preferences: Json) -> Json:
        """A household's choices (``opt_out``, ``min_power_w`` ...): consumer or ems token of that meter."""
        return dict(self._call("PUT", f"/meters/{meter_id}/dr-preferences", json=preferences))

    @route("GET", "/events")
    def events(self, *, limit: int | None = None) -> Json:
        return dict(self._call("GET", "/events", params={"limit": limit}))

    @route("GET", "/events/{event_id}")
    def event(self, event_id: str) -> Json:
        return dict(self._call("GET", f"/events/{event_id}"))

    @route("POST", "/events")
    def deliver(self, delivery: Json) -> Json:
        """The VEN bridge's delivery of an OpenADR event (``service``)."""
        return dict(self._call("POST", "/events", json=delivery))

    @route("POST", "/due")
    def execute_due(self) -> Json:
        return dict(self._call("POST", "/due", json={}))

    @route("POST", "/")
    def on_schedule(self) -> Json:
        """The cron connector's tick (``service`` with ``X-Connector: cron-connector``)."""
        return dict(self._call("POST", "/", json={}, headers={"X-Connector": "cron-connector"}))

    @route("POST", "/telemetry")
    def telemetry(self, meter_ids: list[str]) -> Json:
        return dict(self._call("POST", "/telemetry", json={"meter_ids": meter_ids}))

    @route("POST", "/opts/claim")
    def claim_opts(self, meter_ids: list[str]) -> Json:
        """The opt-outs these twins' VENs are to send as ``oadrCreateOpt`` (service scope: the VEN bridge)."""
        return dict(self._call("POST", "/opts/claim", json={"meter_ids": meter_ids}))


@dataclass
class Upgrades(Api):
    """``edge-upgrade-manager``: move twins between releases of their functions (canary, promote, rollback)."""

    function: str = "edge-upgrade-manager"

    @route("GET", "/releases")
    def releases(self) -> Json:
        return dict(self._call("GET", "/releases"))

    @route("POST", "/operations")
    def start(self, spec: Json) -> Json:
        """Start an operation: ``{"to": "v2", "select": {...}, "canary": n, ...}`` (admin)."""
        return dict(self._call("POST", "/operations", json=spec))

    @route("GET", "/operations")
    def operations(self) -> Json:
        return dict(self._call("GET", "/operations"))

    @route("GET", "/operations/{op_id}")
    def operation(self, op_id: str) -> Json:
        return dict(self._call("GET", f"/operations/{op_id}"))

    def _step(self, op_id: str, step: str, body: Json | None) -> Json:
        return dict(self._call("POST", f"/operations/{op_id}/{step}", json=body or {}))

    @route("POST", "/operations/{op_id}/advance")
    def advance(self, op_id: str, *, budget_s: float | None = None) -> Json:
        return self._step(op_id, "advance", {"budget_s": budget_s} if budget_s is not None else None)

    @route("POST", "/operations/{op_id}/pause")
    def pause(self, op_id: str, body: Json | None = None) -> Json:
        return self._step(op_id, "pause", body)

    @route("POST", "/operations/{op_id}/resume")
    def resume(self, op_id: str, body: Json | None = None) -> Json:
        return self._step(op_id, "resume", body)

    @route("POST", "/operations/{op_id}/promote")
    def promote(self, op_id: str, *, force: bool = False) -> Json:
        return self._step(op_id, "promote", {"force": True} if force else None)

    @route("POST", "/operations/{op_id}/rollback")
    def rollback(self, op_id: str, body: Json | None = None) -> Json:
        return self._step(op_id, "rollback", body)

    @route("GET", "/meters/{meter_id}/binding")
    def binding(self, meter_id: str) -> Json:
        """The release a meter's twin is bound to."""
        return dict(self._call("GET", f"/meters/{meter_id}/binding"))

    @route("POST", "/")
    def on_message(self, topic: str, payload: Json) -> Json:
        """What the MQTT connector sends (``service``): a meter's status after a switch."""
        return dict(self._call("POST", "/", json=payload, headers={"X-Topic": topic}))
