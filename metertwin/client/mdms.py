"""Clients of the MDMS: ``fog-mdms-ingest``, ``fog-mdms-query`` (fog zone) and ``cloud-mdms-archive`` (cloud)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from metertwin.client.transport import Api, paginate, route
from metertwin.core import mqtt_batch

Json = dict[str, Any]
#: Times: epoch seconds, ISO 8601 text, or a datetime (naive means UTC).
When = float | int | str | datetime


def _span(start: When, end: When) -> dict[str, str]:
    def text(t: When) -> str:
        return t.isoformat() if isinstance(t, datetime) else str(t)

    return {"from": text(start), "to": text(end)}


@dataclass
class MdmsIngest(Api):
    """``fog-mdms-ingest``: readings through VEE, head-end batches, edits, dead letters."""

    function: str = "fog-mdms-ingest"

    @route("POST", "/")
    def on_message(self, meter_id: str, reading: Json) -> Json:
        """One reading as the MQTT connector delivers it (``service`` tokens)."""
        return dict(self._call("POST", "/", json=reading, headers={"X-Topic": f"meters/{meter_id}/up/reading"}))

    @route("POST", "/mqtt-batch")
    def on_batch(self, messages: list[tuple[str, bytes]]) -> Json:
        """Many MQTT messages (readings, concentrator batches) in one call, as the connector sends them."""
        return dict(self._call("POST", "/mqtt-batch", content=mqtt_batch.encode(messages),
                               headers={"X-Connector": mqtt_batch.CONNECTOR, "Content-Type": "application/json"}))

    @route("POST", "/readings/batch")
    def upload_batch(self, readings: list[Json], *, source: str = "head-end", units: Json | None = None) -> Json:
        """A head-end batch (``{meter_id, seq, ts, import, export, power, voltage}`` items, in ``units``)."""
        body: Json = {"source": source, "readings": readings}
        if units:
            body["units"] = units
        return dict(self._call("POST", "/readings/batch", json=body))

    @route("POST", "/meters/{meter_id}/edits")
    def edit(self, meter_id: str, ts: When, reason: str, *, import_kwh: float | None = None,
             export_kwh: float | None = None) -> Json:
        body: Json = {"ts": ts.isoformat() if isinstance(ts, datetime) else ts, "reason": reason}
        body.update({k: v for k, v in (("import_kwh", import_kwh), ("export_kwh", export_kwh)) if v is not None})
        return dict(self._call("POST", f"/meters/{meter_id}/edits", json=body))

    @route("GET", "/meters/{meter_id}/edits")
    def edits(self, meter_id: str, *, limit: int | None = None) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/edits", params={"limit": limit}))

    @route("GET", "/dead-letters")
    def dead_letters(self, *, meter_id: str | None = None, rule: str | None = None, limit: int | None = None,
                     cursor: str | None = None) -> Json:
        return dict(self._call("GET", "/dead-letters", params={"meter_id": meter_id, "rule": rule, "limit": limit,
                                                               "cursor": cursor}))

    def iter_dead_letters(self, *, meter_id: str | None = None, rule: str | None = None,
                          limit: int = 500) -> Iterator[Json]:
        return paginate(lambda c: self.dead_letters(meter_id=meter_id, rule=rule, limit=limit, cursor=c),
                        "dead_letters")

    @route("POST", "/dead-letters/{entry_id}/replay")
    def replay(self, entry_id: str, *, reading: Json | None = None, meter_id: str | None = None) -> Json:
        body = {k: v for k, v in (("reading", reading), ("meter_id", meter_id)) if v is not None}
        return dict(self._call("POST", f"/dead-letters/{entry_id}/replay", json=body))

    @route("POST", "/dead-letters/replay")
    def replay_many(self, *, ids: list[str] | None = None, meter_id: str | None = None, rule: str | None = None,
                    limit: int | None = None) -> Json:
        body = {k: v for k, v in (("ids", ids), ("meter_id", meter_id), ("rule", rule), ("limit", limit))
                if v is not None}
        return dict(self._call("POST", "/dead-letters/replay", json=body))

    @route("DELETE", "/dead-letters/{entry_id}")
    def discard(self, entry_id: str) -> Json:
        return dict(self._call("DELETE", f"/dead-letters/{entry_id}"))


@dataclass
class MdmsQuery(Api):
    """``fog-mdms-query``: interval data, load profiles, energy, TOU bills (billing, mdms, utility, consumer)."""

    function: str = "fog-mdms-query"

    @route("GET", "/meters/{meter_id}/intervals")
    def intervals(self, meter_id: str, start: When, end: When, *, limit: int | None = None,
                  cursor: str | None = None) -> Json:
        """One page of raw register rows with quality and tier."""
        return dict(self._call("GET", f"/meters/{meter_id}/intervals",
                               params={**_span(start, end), "limit": limit, "cursor": cursor}))

    def iter_intervals(self, meter_id: str, start: When, end: When, *, limit: int = 5000) -> Iterator[Json]:
        """Every row of ``meter_id`` in the range, following cursors."""
        return paginate(lambda c: self.intervals(meter_id, start, end, limit=limit, cursor=c), "rows")

    def intervals_csv(self, meter_id: str, start: When, end: When, *, limit: int | None = None) -> str:
        return str(self._call("GET", f"/meters/{meter_id}/intervals", text=True,
                              params={**_span(start, end), "limit": limit, "format": "csv"}))

    @route("GET", "/intervals")
    def many_intervals(self, meters: list[str], start: When, end: When, *, limit: int | None = None,
                       cursor: str | None = None) -> Json:
        return dict(self._call("GET", "/intervals", params={"meters": ",".join(meters), **_span(start, end),
                                                            "limit": limit, "cursor": cursor}))

    def iter_many_intervals(self, meters: list[str], start: When, end: When, *, limit: int = 5000) -> Iterator[Json]:
        return paginate(lambda c: self.many_intervals(meters, start, end, limit=limit, cursor=c), "rows")

    @route("GET", "/meters/{meter_id}/load-profile")
    def load_profile(self, meter_id: str, start: When, end: When, *,
                     interval: Literal["15m", "30m", "1h"] = "15m") -> Json:
        """kWh import/export and average/maximum kW per interval, each with its quality flag."""
        return dict(self._call("GET", f"/meters/{meter_id}/load-profile",
                               params={**_span(start, end), "interval": interval}))

    def load_profile_csv(self, meter_id: str, start: When, end: When, *,
                         interval: Literal["15m", "30m", "1h"] = "15m") -> str:
        return str(self._call("GET", f"/meters/{meter_id}/load-profile", text=True,
                              params={**_span(start, end), "interval": interval},
                              headers={"Accept": "text/csv"}))

    @route("GET", "/meters/{meter_id}/energy")
    def energy(self, meter_id: str, start: When, end: When, *, period: Literal["day", "month"] = "day",
               tz: str = "UTC") -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/energy",
                               params={**_span(start, end), "period": period, "tz": tz}))

    @route("GET", "/meters/{meter_id}/billing")
    def bill(self, meter_id: str, start: When, end: When, *, tariff: str = "tou-3") -> Json:
        """Determinants and bill under a built-in tariff (see :meth:`tariffs`)."""
        return dict(self._call("GET", f"/meters/{meter_id}/billing", params={**_span(start, end), "tariff": tariff}))

    @route("POST", "/meters/{meter_id}/billing")
    def bill_with(self, meter_id: str, start: When, end: When, tariff: Json | str) -> Json:
        """Determinants and bill under a tariff of your own (the ``/tariffs`` shape) or a built-in name."""
        return dict(self._call("POST", f"/meters/{meter_id}/billing", json={**_span(start, end), "tariff": tariff}))

    @route("GET", "/tariffs")
    def tariffs(self) -> Json:
        return dict(self._call("GET", "/tariffs"))

    @route("GET", "/meters/{meter_id}/latest")
    def latest(self, meter_id: str) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/latest"))

    @route("GET", "/meters/{meter_id}/tiers")
    def tiers(self, meter_id: str) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/tiers"))


@dataclass
class Archive(Api):
    """``cloud-mdms-archive``: moves cold meter-days from the fog hot tier to S3 (Parquet)."""

    function: str = "cloud-mdms-archive"

    @route("POST", "/")
    def on_schedule(self) -> Json:
        """What the cron connector sends (``service``): one archive run."""
        return dict(self._call("POST", "/", json={}))

    @route("POST", "/run")
    def run(self) -> Json:
        return dict(self._call("POST", "/run", json={}))

    @route("GET", "/plan")
    def plan(self) -> Json:
        """What the next run would move, per meter-day, and why."""
        return dict(self._call("GET", "/plan"))
