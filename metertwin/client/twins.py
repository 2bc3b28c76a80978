"""Clients of the edge zone's twin functions: registry, read (v1, v2), write, forward, ingest (v1, v2)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from metertwin.client.transport import Api, QueryValue, paginate, route
from metertwin.core import mqtt_batch

Json = dict[str, Any]


@dataclass
class Registry(Api):
    """``edge-registry``: provisioning of twins and meter accounts; the meter listing (admin, utility, billing)."""

    function: str = "edge-registry"

    @route("POST", "/meters")
    def provision(self, meter_id: str, profile: Json | None = None) -> Json:
        """Create a twin and its meter's MQTT account; the answer holds the meter's password (once)."""
        return dict(self._call("POST", "/meters", json={"meter_id": meter_id, **({"profile": profile} if profile
                                                                                  else {})}))

    @route("POST", "/meters/bulk")
    def provision_bulk(self, meters: list[Json]) -> Json:
        """Many at once (admin): ``[{"meter_id": ..., "profile": {...}}, ...]``."""
        return dict(self._call("POST", "/meters/bulk", json={"meters": meters}))

    @route("GET", "/meters")
    def list_meters(self, *, cursor: int | str | None = None, count: int = 100) -> Json:
        """One page of meter ids (``next_cursor`` is ``None`` after the last)."""
        return dict(self._call("GET", "/meters", params={"cursor": cursor, "count": count}))

    def iter_meters(self, *, count: int = 500) -> Iterator[str]:
        """Every meter id of the zone, page by page."""
        return paginate(lambda c: self.list_meters(cursor=c, count=count), "meters")

    @route("GET", "/meters/{meter_id}")
    def get_meter(self, meter_id: str) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}"))

    @route("DELETE", "/meters/{meter_id}")
    def remove(self, meter_id: str) -> Json:
        return dict(self._call("DELETE", f"/meters/{meter_id}"))

    @route("POST", "/meters/bulk-delete")
    def remove_bulk(self, meter_ids: list[str]) -> Json:
        return dict(self._call("POST", "/meters/bulk-delete", json={"meter_ids": meter_ids}))

    @route("POST", "/reconcile")
    def reconcile(self, *, fix: bool = False) -> Json:
        """Compare twins with the broker's meter accounts (``fix=True`` repairs them)."""
        return dict(self._call("POST", "/reconcile", params={"fix": fix}))

    # -- concentrators (DCUs): meters behind one MQTT account that uplinks their readings in batches --
    @route("POST", "/concentrators")
    def create_concentrator(self, concentrator_id: str) -> Json:
        """A concentrator and its MQTT account; the answer holds its password (once) and its topics."""
        return dict(self._call("POST", "/concentrators", json={"concentrator_id": concentrator_id}))

    @route("GET", "/concentrators/{concentrator_id}")
    def get_concentrator(self, concentrator_id: str) -> Json:
        return dict(self._call("GET", f"/concentrators/{concentrator_id}"))

    @route("DELETE", "/concentrators/{concentrator_id}")
    def remove_concentrator(self, concentrator_id: str) -> Json:
        return dict(self._call("DELETE", f"/concentrators/{concentrator_id}"))

    @route("POST", "/concentrators/{concentrator_id}/meters")
    def assign_meters(self, concentrator_id: str, meter_ids: list[str]) -> Json:
        """Put existing twins' meters behind the concentrator (their ACL and downlink follow)."""
        return dict(self._call("POST", f"/concentrators/{concentrator_id}/meters", json={"meter_ids": meter_ids}))

    @route("POST", "/concentrators/{concentrator_id}/twins")
    def provision_behind(self, concentrator_id: str, meters: list[Json]) -> Json:
        """Many twins behind the concentrator at once (no MQTT account per meter)."""
        return dict(self._call("POST", f"/concentrators/{concentrator_id}/twins", json={"meters": meters}))

    @route("GET", "/concentrators/{concentrator_id}/rejected")
    def concentrator_rejections(self, concentrator_id: str) -> Json:
        """Readings the concentrator sent that were refused (e.g. for a meter not assigned to it), with reasons."""
        return dict(self._call("GET", f"/concentrators/{concentrator_id}/rejected"))

    @route("PUT", "/meters/{meter_id}/route")
    def set_meter_route(self, meter_id: str, concentrator_id: str | None) -> Json:
        """Move a meter behind a concentrator, or back to direct (``None``)."""
        return dict(self._call("PUT", f"/meters/{meter_id}/route", json={"concentrator_id": concentrator_id}))


@dataclass
class Read(Api):
    """``edge-read`` (and ``edge-read-v2``): the twin's reading and document."""

    function: str = "edge-read"

    @route("GET", "/meters/{meter_id}/reading")
    def reading(self, meter_id: str, *, max_age: float | None = None, live: bool | None = None,
                timeout: float | None = None) -> Json:
        """The latest reading: cached if younger than ``max_age`` s, else (or with ``live``) asked of the meter."""
        return dict(self._call("GET", f"/meters/{meter_id}/reading",
                               params={"max_age": max_age, "live": live, "timeout": timeout}))

    @route("GET", "/meters/{meter_id}/twin")
    def twin(self, meter_id: str) -> Json:
        """The twin document: reported, desired, delta, metadata and version."""
        return dict(self._call("GET", f"/meters/{meter_id}/twin"))


@dataclass
class ReadV2(Read):
    """``edge-read-v2``: release v2 of the read function (adds the readings history)."""

    function: str = "edge-read-v2"

    @route("GET", "/meters/{meter_id}/readings")
    def readings(self, meter_id: str, *, since_seq: int | None = None, limit: int | None = None) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/readings", params={"since_seq": since_seq,
                                                                              "limit": limit}))


@dataclass
class Write(Api):
    """``edge-write``: commands to meters and the twin's desired state."""

    function: str = "edge-write"

    @route("POST", "/meters/{meter_id}/commands")
    def command(self, meter_id: str, kind: str, params: Json, *, expiry_s: int | None = None) -> Json:
        """Queue a command (202); follow it with :meth:`get_command`."""
        body: Json = {"kind": kind, "params": params}
        if expiry_s is not None:
            body["expiry_s"] = expiry_s
        return dict(self._call("POST", f"/meters/{meter_id}/commands", json=body))

    @route("GET", "/meters/{meter_id}/commands")
    def commands(self, meter_id: str, *, limit: int | None = None) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/commands", params={"limit": limit}))

    @route("GET", "/meters/{meter_id}/commands/{command_id}")
    def get_command(self, meter_id: str, command_id: str) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/commands/{command_id}"))

    @route("PATCH", "/meters/{meter_id}/desired")
    def set_desired(self, meter_id: str, fields: Json, *, if_match: int | None = None) -> Json:
        """Change desired settings; ``if_match`` (a twin version) makes it conditional (412 if stale)."""
        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else None
        return dict(self._call("PATCH", f"/meters/{meter_id}/desired", json=fields, headers=headers))

    @route("POST", "/")
    def on_message(self, topic: str, payload: Json) -> Json:
        """What the MQTT connector sends (``service`` tokens): a meter's command acknowledgement."""
        return dict(self._call("POST", "/", json=payload, headers={"X-Topic": topic}))


@dataclass
class Forward(Api):
    """``edge-forward``: messages between a meter and its home energy manager (EMS)."""

    function: str = "edge-forward"

    @route("PUT", "/meters/{meter_id}/ems/route")
    def set_route(self, meter_id: str, kind: str, target: str | None = None) -> Json:
        """Where the meter's EMS messages go: ``mqtt``, or ``webhook`` with a ``target`` URL."""
        return dict(self._call("PUT", f"/meters/{meter_id}/ems/route",
                               json={"kind": kind, **({"target": target} if target else {})}))

    @route("GET", "/meters/{meter_id}/ems/route")
    def get_route(self, meter_id: str) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/ems/route"))

    @route("POST", "/meters/{meter_id}/ems/messages")
    def send(self, meter_id: str, payload: Json) -> Json:
        return dict(self._call("POST", f"/meters/{meter_id}/ems/messages", json={"payload": payload}))

    @route("GET", "/meters/{meter_id}/ems/messages")
    def messages(self, meter_id: str, *, limit: int | None = None) -> Json:
        return dict(self._call("GET", f"/meters/{meter_id}/ems/messages", params={"limit": limit}))

    @route("POST", "/")
    def on_message(self, topic: str, payload: Json) -> Json:
        """What the MQTT connector sends (``service``): a meter's message to its EMS."""
        return dict(self._call("POST", "/", json=payload, headers={"X-Topic": topic}))


@dataclass
class Ingest(Api):
    """``edge-ingest`` (and ``edge-ingest-v2``): the functions meters publish readings to (``service`` tokens)."""

    function: str = "edge-ingest"

    @route("POST", "/")
    def on_message(self, topic: str, payload: Json) -> Json:
        """One meter message as the MQTT connector delivers it (``X-Topic``)."""
        return dict(self._call("POST", "/", json=payload, headers={"X-Topic": topic}))

    @route("POST", "/mqtt-batch")
    def on_batch(self, messages: list[tuple[str, bytes]]) -> Json:
        """Many MQTT messages in one call, as the connector sends them (annotation ``mqtt-batch``)."""
        return dict(self._call("POST", "/mqtt-batch", content=mqtt_batch.encode(messages),
                               headers={"X-Connector": mqtt_batch.CONNECTOR, "Content-Type": "application/json"}))

    @route("POST", "/inboxes")
    def drain_inboxes(self, body: Json | None = None) -> Json:
        """Apply readings parked for this release (upgrade manager)."""
        return dict(self._call("POST", "/inboxes", json=body or {}))

    @route("POST", "/meters/{meter_id}/inbox")
    def drain_inbox(self, meter_id: str, body: Json | None = None) -> Json:
        return dict(self._call("POST", f"/meters/{meter_id}/inbox", json=body or {}))


def params(**values: QueryValue) -> dict[str, QueryValue]:
    """Query parameters without the ``None`` ones (helper for callers building their own calls)."""
    return {k: v for k, v in values.items() if v is not None}
