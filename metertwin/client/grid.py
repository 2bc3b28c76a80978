"""Client of the fog zone's grid function: aggregates up the grid tree, places, rules and alerts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from metertwin.client.transport import Api, QueryValue, route

Json = dict[str, Any]
LEVELS = ("transformers", "feeders", "substations", "regions")


def _nodes(path: str) -> Callable[..., Json]:
    @route("GET", f"/{path}")
    def nodes(self: Grid, *, limit: int | None = None, after: str | None = None) -> Json:
        return dict(self._call("GET", f"/{path}", params={"limit": limit, "after": after}))

    nodes.__doc__ = f"Nodes of ``{path}`` with aggregates."
    return nodes


def _summary(path: str) -> Callable[..., Json]:
    @route("GET", f"/{path}/{{node}}")
    def summary(self: Grid, node: str) -> Json:
        return dict(self._call("GET", f"/{path}/{quote(node, safe='')}"))

    summary.__doc__ = f"Current aggregates of one of the ``{path}`` (import/export W, meters, voltage band)."
    return summary


def _load(path: str) -> Callable[..., Any]:
    @route("GET", f"/{path}/{{node}}/load")
    def load(self: Grid, node: str, *, start: QueryValue = None, end: QueryValue = None,
             interval: str | None = None, csv: bool = False) -> Any:
        params = {"from": start, "to": end, "interval": interval}
        headers = {"Accept": "text/csv"} if csv else None
        out = self._call("GET", f"/{path}/{quote(node, safe='')}/load", params=params, headers=headers)
        return out if csv else dict(out)

    load.__doc__ = f"Load history of one of the ``{path}`` per interval (JSON, or CSV text with ``csv=True``)."
    return load


@dataclass
class Grid(Api):
    """``fog-grid``: the grid tree's aggregates, the fog's copy of each meter's place, rules and alerts."""

    function: str = "fog-grid"

    transformers = _nodes("transformers")
    feeders = _nodes("feeders")
    substations = _nodes("substations")
    regions = _nodes("regions")
    transformer = _summary("transformers")
    feeder = _summary("feeders")
    substation = _summary("substations")
    region = _summary("regions")
    transformer_load = _load("transformers")
    feeder_load = _load("feeders")
    substation_load = _load("substations")
    region_load = _load("regions")

    @route("GET", "/meters/{meter_id}/place")
    def place(self, meter_id: str) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/place"))

    @route("PUT", "/meters/{meter_id}/place")
    def set_place(self, meter_id: str, place: Json) -> Json:
        """``{transformer, feeder, substation, region, v}``; a ``v`` not above the stored one changes nothing."""
        return dict(self._call("PUT", f"/meters/{meter_id}/place", json=place))

    @route("POST", "/rules")
    def create_rule(self, rule: Json) -> Json:
        return dict(self._call("POST", "/rules", json=rule))

    @route("GET", "/rules")
    def rules(self) -> Json:
        return dict(self._call("GET", "/rules"))

    @route("GET", "/rules/{rule_id}")
    def rule(self, rule_id: str) -> Json:
        return dict(self._call("GET", f"/rules/{rule_id}"))

    @route("DELETE", "/rules/{rule_id}")
    def delete_rule(self, rule_id: str) -> Json:
        return dict(self._call("DELETE", f"/rules/{rule_id}"))

    @route("GET", "/alerts")
    def alerts(self, *, status: str | None = None, rule_id: str | None = None, subject: str | None = None,
               limit: int | None = None) -> Json:
        return dict(self._call("GET", "/alerts", params={"status": status, "rule_id": rule_id, "subject": subject,
                                                         "limit": limit}))

    @route("POST", "/rules/{rule_id}/alerts/{alert_id}/ack")
    def acknowledge(self, rule_id: str, alert_id: str) -> Json:
        return dict(self._call("POST", f"/rules/{rule_id}/alerts/{alert_id}/ack"))

    @route("POST", "/rules/evaluate")
    def evaluate(self) -> Json:
        return dict(self._call("POST", "/rules/evaluate"))

    @route("POST", "/drain")
    def drain(self) -> Json:
        """Apply the aggregation entries waiting since the last cron tick."""
        return dict(self._call("POST", "/drain"))

    @route("POST", "/archive")
    def archive(self) -> Json:
        return dict(self._call("POST", "/archive"))

    @route("POST", "/")
    def on_schedule(self) -> Json:
        """The cron connector's tick (``service`` with ``X-Connector: cron-connector``)."""
        return dict(self._call("POST", "/", json={}, headers={"X-Connector": "cron-connector"}))
