"""MQTT messages a function refused, kept by the connector: none is acknowledged unrecorded.

A function's final answer other than 2xx (a 4xx verdict on the message, or a 500 bug) gets the
message acknowledged, so that a poison message cannot hold the receive window forever. Before
that, the connector keeps it here, in the zone's Redis (a capped stream,
:func:`gateway.keys.connector_dead_letters`), with the topic, the function, the status and the
function's reason. A function that keeps its own dead letter says so in its answer
(``details.dead_letter_id``, as fog-mdms-ingest does for readings VEE rejects): the connector
does not keep a second copy. If Redis cannot take the entry, the message is not acknowledged
and is delivered again later. ``GET /system/dead-letters`` lists them (``gateway.system``).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from gateway import keys

log = logging.getLogger("gateway.dead_letters")

#: Bytes of a message's payload kept (MQTT allows up to 256 MB; the gateway's body limit is smaller).
PAYLOAD_MAX_BYTES = 65_536
#: Characters of the function's answer kept as the reason.
REASON_MAX_CHARS = 2_000


def kept_by_function(body: bytes) -> bool:
    """True when the function's answer names the dead letter it kept itself."""
    if b"dead_letter_id" not in body:
        return False
    try:
        details = json.loads(body).get("details")
    except (ValueError, AttributeError):
        return False
    return isinstance(details, dict) and bool(details.get("dead_letter_id"))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One refused message as listed by ``GET /system/dead-letters``."""

    id: str
    topic: str
    function: str
    status: int
    reason: str
    payload: bytes
    truncated: bool
    received_at: float

    def to_dict(self) -> dict[str, Any]:
        try:
            payload: dict[str, str] = {"payload": self.payload.decode()}
        except UnicodeDecodeError:
            payload = {"payload_base64": base64.b64encode(self.payload).decode()}
        return {"id": self.id, "topic": self.topic, "function": self.function, "status": self.status,
                "reason": self.reason, **payload, "truncated": self.truncated, "received_at": self.received_at}


class ConnectorDeadLetters:
    """The zone's stream of messages its functions refused."""

    def __init__(self, zone: str, redis: Redis) -> None:
        self.key = keys.connector_dead_letters(zone)
        self.redis = redis
        self.kept = 0

    async def keep(self, function: str, topic: str, payload: bytes, status: int, answer: bytes) -> bool:
        """Record a refused message; False if it could not be recorded (leave it unacknowledged)."""
        if kept_by_function(answer):
            return True
        fields: dict[FieldT, EncodableT] = {
            "topic": topic, "function": function, "status": status,
            "reason": answer[:REASON_MAX_CHARS * 4].decode("utf-8", errors="replace")[:REASON_MAX_CHARS],
            "payload": payload[:PAYLOAD_MAX_BYTES], "truncated": int(len(payload) > PAYLOAD_MAX_BYTES),
            "received_at": round(time.time(), 3),
        }
        try:
            await self.redis.xadd(self.key, fields, maxlen=keys.CONNECTOR_DEAD_LETTERS_MAXLEN, approximate=True)
        except Exception as exc:  # Redis down: the message stays unacknowledged and comes again
            log.warning("cannot keep the dead letter of %s (%s answered %d): %s", topic, function, status, exc)
            return False
        self.kept += 1
        return True

    async def newest(self, count: int, before: str | None = None) -> tuple[list[DeadLetter], str | None]:
        """Up to ``count`` entries, newest first, older than the entry id ``before``; and the next cursor."""
        upper = f"({before}" if before else "+"
        reply: Any = await self.redis.xrevrange(self.key, max=upper, min="-", count=count)
        out = [_entry(entry_id, fields) for entry_id, fields in reply]
        return out, (out[-1].id if len(out) == count else None)


def _entry(entry_id: bytes | str, fields: dict[bytes, bytes]) -> DeadLetter:
    def text(name: bytes) -> str:
        return fields.get(name, b"").decode("utf-8", errors="replace")

    def number(name: bytes) -> float:
        try:
            return float(fields.get(name, b"0"))
        except ValueError:  # written by hand: read as 0, never fail the listing
            return 0.0

    return DeadLetter(
        id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        topic=text(b"topic"), function=text(b"function"), status=int(number(b"status")),
        reason=text(b"reason"), payload=fields.get(b"payload", b""), truncated=number(b"truncated") > 0,
        received_at=number(b"received_at"),
    )
