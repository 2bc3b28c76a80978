"""What one SSE client sees: the filters it asked for, narrowed by what its token may see.

* ``utility``, ``mdms``, ``admin`` and ``service`` see every event of the zone;
* ``consumer`` sees every event of its own meter (the token's ``meter`` claim): its readings,
  settings, commands, DR events, P2P trades, upgrade steps and job executions; never an event of
  no meter (market rounds, operations, jobs, alerts: the fleet's business) nor another meter's;
* ``ems`` sees only ``ems`` and ``reading`` events of its meter;
* ``billing`` sees ``reading`` and ``p2p`` events of any meter (what it bills from: readings, and
  the trades' settlement lines with the rounds and clearing that priced them).

A request for more than the token allows is a 403 that says why, not a silently empty stream.
Filters: ``meter`` (comma list), ``type`` (comma list of :data:`~metertwin.stream.events.TYPES`)
and ``topic``, an MQTT-style pattern over ``meters/<meter>/<type>[/<sub>]`` (``+`` one level,
``#`` the rest, only last).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from metertwin.core.auth import Principal
from metertwin.core.errors import Forbidden, InvalidInput
from metertwin.stream.events import EMS, P2P, READING, TYPES, Event

#: Scopes that see the whole zone.
FLEET_SCOPES: Final = frozenset({"utility", "mdms", "admin", "service"})
#: Per other scope, the event types it may see (None: all).
TYPES_BY_SCOPE: Final[dict[str, frozenset[str] | None]] = {
    "consumer": None, "ems": frozenset({EMS, READING}), "billing": frozenset({READING, P2P})}
#: Scopes bound to the token's own meter.
OWN_METER_SCOPES: Final = frozenset({"consumer", "ems"})

_METER_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_LIST = 1000


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events one client receives. ``None`` fields match anything."""

    meters: frozenset[str] | None = None
    types: frozenset[str] | None = None
    topic: tuple[str, ...] | None = None

    def matches(self, event: Event) -> bool:
        if self.meters is not None and event.meter not in self.meters:
            return False
        if self.types is not None and event.type not in self.types:
            return False
        return self.topic is None or topic_matches(self.topic, event.topic)


def parse_topic(pattern: str) -> tuple[str, ...]:
    """The levels of an MQTT-style pattern; ``#`` only as the last level, wildcards alone in a level."""
    levels = tuple(pattern.split("/"))
    if not pattern or len(pattern) > 256:
        raise InvalidInput(f"topic {pattern[:60]!r} must be 1-256 characters", field="topic")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
            raise InvalidInput(f"topic {pattern!r}: '#' only as the last level, '+' only as a whole level",
                               field="topic")
    return levels


def topic_matches(levels: tuple[str, ...], topic: str) -> bool:
    """MQTT matching of ``topic`` against the pattern ``levels``."""
    parts = topic.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= len(parts) or (level != "+" and level != parts[i]):
            return False
    return len(parts) == len(levels)


def _csv(value: str | None, field: str) -> frozenset[str] | None:
    if value is None or value == "":
        return None
    items = frozenset(v.strip() for v in value.split(",") if v.strip())
    if not items or len(items) > MAX_LIST:
        raise InvalidInput(f"{field} {value[:60]!r} must list 1-{MAX_LIST} values", field=field)
    return items


def filter_for(principal: Principal, *, meter: str | None = None, type_: str | None = None,
               topic: str | None = None) -> Filter:
    """The :class:`Filter` of one request, within what ``principal`` may see (else 400/403)."""
    meters = _csv(meter, "meter")
    for m in meters or ():
        if not _METER_ID.match(m):
            raise InvalidInput(f"meter {m[:60]!r} is not a meter id", field="meter")
    types = _csv(type_, "type")
    if types is not None and not types <= TYPES:
        raise InvalidInput(f"type(s) {sorted(types - TYPES)} unknown; known: {sorted(TYPES)}", field="type")
    levels = parse_topic(topic) if topic else None
    if principal.scopes & FLEET_SCOPES:
        return Filter(meters, types, levels)
    granted = [TYPES_BY_SCOPE[s] for s in principal.scopes if s in TYPES_BY_SCOPE]
    if not granted:
        raise Forbidden(f"scopes {sorted(principal.scopes)} see no events")
    allowed: frozenset[str] | None = None if any(g is None for g in granted) \
        else frozenset().union(*[g for g in granted if g is not None])
    if allowed is not None:
        if types is not None and not types <= allowed:
            raise Forbidden(f"scopes {sorted(principal.scopes)} do not see event type(s) {sorted(types - allowed)}")
        types = types if types is not None else allowed
    if principal.scopes <= OWN_METER_SCOPES:
        own = principal.meter or ""
        if meters is not None and meters != {own}:
            raise Forbidden(f"token for meter {own!r} does not reach meter(s) {sorted(meters - {own})}")
        meters = frozenset({own})
    return Filter(meters, types, levels)
