"""The MDMS dead-letter store: every rejected reading with the rule it broke and why.

A Redis stream (``keys.MDMS_DEAD_LETTERS``) capped at ``MDMS_DEAD_LETTER_MAX`` entries
(oldest dropped first: they were rejected, so no accepted data is lost). Operators list
entries and replay them through VEE (:func:`metertwin.mdms.vee.replay_dead_letter`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, cast

import redis

from metertwin.core.errors import BackendUnavailable, InvalidInput, NotFound
from metertwin.mdms import keys
from metertwin.mdms.hot_store import get_hot_redis
from metertwin.mdms.settings import get_mdms_settings

ENTRY_ID_RE = re.compile(r"^\d{1,20}-\d{1,20}$")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    meter_id: str
    source: str
    topic: str
    payload: str
    truncated: bool
    rule: str
    reason: str
    received_at: float
    attempts: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "meter_id": self.meter_id or None, "source": self.source, "topic": self.topic or None,
            "payload": self.payload, "truncated": self.truncated, "rule": self.rule, "reason": self.reason,
            "received_at": self.received_at, "attempts": self.attempts,
        }


def _entry(entry_id: str, f: dict[str, str]) -> DeadLetter:
    return DeadLetter(
        id=entry_id, meter_id=f.get("meter_id", ""), source=f.get("source", ""), topic=f.get("topic", ""),
        payload=f.get("payload", ""), truncated=f.get("truncated") == "1", rule=f.get("rule", ""),
        reason=f.get("reason", ""), received_at=float(f.get("received_at", "0")), attempts=int(f.get("attempts", "1")),
    )


def _fields(
    *, meter_id: str, source: str, payload: bytes | str, rule: str, reason: str, topic: str, attempts: int
) -> dict[str, str]:
    limit = get_mdms_settings().max_reading_bytes
    text = payload.decode("utf-8", errors="replace") if isinstance(payload, bytes) else payload
    return {
        "meter_id": meter_id, "source": source, "topic": topic, "payload": text[:limit],
        "truncated": "1" if len(text) > limit else "0", "rule": rule, "reason": reason[:1000],
        "received_at": repr(time.time()), "attempts": str(attempts),
    }


def add(
    *, meter_id: str, source: str, payload: bytes | str, rule: str, reason: str, topic: str = "", attempts: int = 1,
    pipe: redis.client.Pipeline | None = None,
) -> str | None:
    """Store a rejected reading; returns its id (``None`` when queued on ``pipe``)."""
    s = get_mdms_settings()
    fields = _fields(meter_id=meter_id, source=source, payload=payload, rule=rule, reason=reason, topic=topic,
                     attempts=attempts)
    try:
        target = pipe if pipe is not None else get_hot_redis()
        entry_id = target.xadd(keys.MDMS_DEAD_LETTERS, fields, maxlen=s.dead_letter_max, approximate=True)  # type: ignore[arg-type]
    except redis.RedisError as exc:
        raise BackendUnavailable(f"dead-letter store (Redis) failed: {exc}") from exc
    return None if pipe is not None else str(entry_id)


async def add_async(*, meter_id: str, source: str, payload: bytes | str, rule: str, reason: str,
                    topic: str = "") -> str:
    """:func:`add` on the running event loop (the gateway's async lane)."""
    from metertwin.mdms.hot_store import get_hot_redis_async

    s = get_mdms_settings()
    fields = _fields(meter_id=meter_id, source=source, payload=payload, rule=rule, reason=reason, topic=topic,
                     attempts=1)
    try:
        entry_id = await get_hot_redis_async().xadd(
            keys.MDMS_DEAD_LETTERS, fields, maxlen=s.dead_letter_max, approximate=True  # type: ignore[arg-type]
        )
    except redis.RedisError as exc:
        raise BackendUnavailable(f"dead-letter store (Redis) failed: {exc}") from exc
    return str(entry_id)


def get(entry_id: str) -> DeadLetter:
    check_id(entry_id)
    try:
        found = cast(list[Any], get_hot_redis().xrange(keys.MDMS_DEAD_LETTERS, entry_id, entry_id))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"dead-letter store (Redis) failed: {exc}") from exc
    if not found:
        raise NotFound(f"dead letter {entry_id!r} does not exist (replayed, discarded or never stored)")
    return _entry(found[0][0], found[0][1])


def delete(entry_id: str) -> bool:
    check_id(entry_id)
    return bool(get_hot_redis().xdel(keys.MDMS_DEAD_LETTERS, entry_id))


def check_id(entry_id: str) -> str:
    if not ENTRY_ID_RE.match(entry_id):
        raise InvalidInput(f"dead-letter id {entry_id!r} is not a stream id like '1700000000000-0'", field="id")
    return entry_id


def list_entries(
    *, meter_id: str | None = None, rule: str | None = None, limit: int = 100, before: str | None = None
) -> tuple[list[DeadLetter], str | None]:
    """Newest first; ``before`` is the cursor (an id, exclusive). Returns entries and the next cursor."""
    if before is not None:
        check_id(before)
    out: list[DeadLetter] = []
    high = f"({before}" if before else "+"
    scanned = 0
    r = get_hot_redis()
    while len(out) < limit and scanned < 50_000:
        batch = cast(list[Any], r.xrevrange(keys.MDMS_DEAD_LETTERS, high, "-", count=500))
        if not batch:
            return out, None
        for entry_id, fields in batch:
            scanned += 1
            high = f"({entry_id}"
            e = _entry(entry_id, fields)
            if (meter_id is None or e.meter_id == meter_id) and (rule is None or e.rule == rule):
                out.append(e)
                if len(out) >= limit:
                    return out, entry_id
    return out, high[1:] if high != "+" else None


def count() -> int:
    return int(get_hot_redis().xlen(keys.MDMS_DEAD_LETTERS))
