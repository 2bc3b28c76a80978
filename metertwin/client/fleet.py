"""Client of the edge zone's fleet function: grid topology per twin, CSV import, fleet search."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from metertwin.client.transport import Api, QueryValue, paginate, route

Json = dict[str, Any]


@dataclass
class Fleet(Api):
    """``edge-fleet``: topology (region, feeder, transformer, groups, tags, ...) and search over it."""

    function: str = "edge-fleet"

    @route("GET", "/meters")
    def search(self, **filters: QueryValue) -> Json:
        """One page of meters matching ``filters`` (``feeder=``, ``group=``, ``online=``, ``limit=``, ``cursor=``)."""
        return dict(self._call("GET", "/meters", params=filters))

    def iter_search(self, **filters: QueryValue) -> Iterator[Any]:
        """Every match of ``filters``, page by page."""
        return paginate(lambda c: self.search(**filters, cursor=c), "meters")

    @route("GET", "/meters/{meter_id}/topology")
    def topology(self, meter_id: str) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/topology"))

    @route("PATCH", "/meters/{meter_id}/topology")
    def patch_topology(self, meter_id: str, changes: Json, *, if_match: int | None = None) -> Json:
        """A JSON merge patch of the twin's topology; ``if_match``: the version it must still have."""
        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else None
        return dict(self._call("PATCH", f"/meters/{meter_id}/topology", json=changes, headers=headers))

    @route("GET", "/meters/{meter_id}/topology/history")
    def topology_history(self, meter_id: str, *, limit: int | None = None) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/topology/history", params={"limit": limit}))

    @route("POST", "/meters/import")
    def import_csv(self, csv_text: str | bytes, *, mode: str = "merge") -> Json:
        """Topology of many twins from a GIS/CIS export (CSV); per-row errors name the column and value."""
        body = csv_text.encode() if isinstance(csv_text, str) else csv_text
        return dict(self._call("POST", "/meters/import", params={"mode": mode}, content=body,
                               headers={"Content-Type": "text/csv"}))
