"""One ``XREAD`` loop per process fanning the zone's events out to every SSE client.

Each entry is decoded and framed once, then offered to the clients whose filter matches
(clients following one meter are indexed by it, so an event costs a dict lookup for them,
not a check per client). A client's queue is bounded: when it is full the client is cut off
with a close reason instead of growing memory, and the events already queued are dropped
(it resumes with ``Last-Event-ID``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from metertwin.core.aio import stop_requested
from metertwin.stream.access import Filter
from metertwin.stream.events import Event

log = logging.getLogger("metertwin.stream.hub")

#: How long one blocking XREAD waits (ms); also how fast the loop notices it is stopped.
BLOCK_MS = 1000
#: Pause after a Redis error before reading again (pacing, not a wait for a condition).
RETRY_S = 0.5


def stream_id(entry_id: str) -> tuple[int, int]:
    """A stream id as a comparable pair (``"1700000000000-3"`` -> ``(1700000000000, 3)``)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class Framed:
    """An event with its SSE frame, built once for every client."""

    event: Event
    frame: bytes

    @classmethod
    def of(cls, event: Event) -> Framed:
        return cls(event, f"id: {event.id}\ndata: {event.to_json()}\n\n".encode())


@dataclass(eq=False, slots=True)
class Subscriber:
    """One SSE client: its filter and its bounded queue. ``None`` in the queue means: stop."""

    filter: Filter
    queue_max: int
    queue: asyncio.Queue[Framed | None] = field(init=False)
    #: Why the hub stopped this client (``None``: still served, or the client left).
    closed_reason: str | None = None

    def __post_init__(self) -> None:
        # One slot more than the limit, for the stop marker.
        self.queue = asyncio.Queue(self.queue_max + 1)

    def offer(self, item: Framed) -> None:
        if self.closed_reason is not None:
            return
        if self.queue.qsize() >= self.queue_max:
            self.close(f"slow consumer: {self.queue_max} events queued unread; "
                       f"reconnect with Last-Event-ID to resume")
            return
        self.queue.put_nowait(item)

    def close(self, reason: str) -> None:
        """Stop this client: drop what is queued, wake its writer with the stop marker."""
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class Hub:
    """Reads the zone's stream once and offers every entry to the matching subscribers."""

    def __init__(self, client: Any, key: str, *, read_count: int = 1000) -> None:
        self.client = client
        self.key = key
        self.read_count = read_count
        self.last_id = "0-0"
        self._by_meter: dict[str, set[Subscriber]] = {}
        self._fleet: set[Subscriber] = set()
        self.events_read = 0
        self.clients_cut = 0

    @property
    def clients(self) -> int:
        return len(self._fleet) + sum(len(s) for s in self._by_meter.values())

    def add(self, sub: Subscriber) -> None:
        if sub.filter.meters is None:
            self._fleet.add(sub)
        else:
            for meter in sub.filter.meters:
                self._by_meter.setdefault(meter, set()).add(sub)

    def remove(self, sub: Subscriber) -> None:
        self._fleet.discard(sub)
        for meter in sub.filter.meters or ():
            subs = self._by_meter.get(meter)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_meter[meter]

    def close_all(self, reason: str) -> None:
        for sub in [*self._fleet, *(s for subs in self._by_meter.values() for s in subs)]:
            sub.close(reason)

    async def start_position(self) -> None:
        """Start after the newest entry: clients asking for older ones backfill them with XRANGE."""
        newest = await self.client.xrevrange(self.key, count=1)
        self.last_id = newest[0][0] if newest else "0-0"

    def dispatch(self, entries: Iterable[tuple[str, dict[str, str]]]) -> None:
        """Offer each entry to the subscribers that want it (framing it only if one does)."""
        for entry_id, fields in entries:
            self.last_id = entry_id
            self.events_read += 1
            event = Event.from_entry(entry_id, fields)
            framed: Framed | None = None
            by_meter = self._by_meter.get(event.meter, ())
            for sub in (*by_meter, *self._fleet) if by_meter else self._fleet:
                if sub.filter.matches(event):
                    if framed is None:
                        framed = Framed.of(event)
                    before = sub.closed_reason
                    sub.offer(framed)
                    if before is None and sub.closed_reason is not None:
                        self.clients_cut += 1

    async def run(self) -> None:
        """Read forever (until cancelled) from :attr:`last_id`."""
        while True:
            try:
                reply = await self.client.xread({self.key: self.last_id}, count=self.read_count, block=BLOCK_MS)
            except redis.RedisError as exc:
                if stop_requested():
                    raise asyncio.CancelledError from exc
                log.warning("reading %s failed: %s; retrying", self.key, exc)
                await asyncio.sleep(RETRY_S)
                continue
            for _key, entries in reply or ():
                self.dispatch(entries)
