"""The zone's demand-response records in Redis (keys in :mod:`metertwin.dr.keys`).

* one hash per meter, event id -> event record (JSON), with the decision, the plan and
  the execution state; every change is a WATCH/MULTI transaction (:meth:`DrStore.update`);
* the consumer's preferences (opt-out, comfort limits, flexible load);
* the load limit the twin last sent its meter;
* one sorted set of due actions for the zone, scored by when they are due (epoch s);
  :meth:`DrStore.claim_due` claims due members atomically (a Lua ZRANGEBYSCORE + ZREM), so
  several callers never run one action twice;
* per event an index meter -> answer, for the operator's view.

Every change of an event record is a ``dr`` event on the zone's stream (:func:`change_of` names
it), appended in the same pipeline as the operator's index: no round trip of its own.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any

import redis

from metertwin.core.clients import StrRedis
from metertwin.core.errors import BackendUnavailable, NotFound
from metertwin.dr import keys
from metertwin.dr.decisions import Preferences
from metertwin.dr.settings import get_dr_settings
from metertwin.stream import events as stream_events

# KEYS[1]=due set; ARGV: now, limit. Claims (removes and returns) due members atomically.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""


#: Execution states (``record["exec"]["state"]``) in which the meter is being limited for the event.
_SHEDDING = frozenset({"applying", "applied"})


def change_of(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """What a record change means for watchers (one of ``events.DR_CHANGES``), or None (nothing to tell).

    A first record is ``received`` (its data carries the answer, ``opt``); later ones, first match:
    ``cancelled``, ``modified`` (a new modification number), ``opted_out``/``opted_in``, then the
    execution: ``active`` (a limit being sent or acknowledged), ``completed`` (restored after the
    event), ``execution`` (any other execution state: rejected, meter unreachable, restoring ...).
    """
    if old is None:
        return "cancelled" if new.get("cancelled") else "received"
    if new.get("cancelled") and not old.get("cancelled"):
        return "cancelled"
    if new.get("modification_number") != old.get("modification_number"):
        return "modified"
    if new.get("opt") != old.get("opt"):
        return "opted_out" if new.get("opt") == "optOut" else "opted_in"
    was, now = (old.get("exec") or {}).get("state"), (new.get("exec") or {}).get("state")
    if was == now:
        return None
    if now in _SHEDDING:
        return "active"
    if now == "restored" and not new.get("cancelled"):
        return "completed"
    return "execution"


def retention_s(record: dict[str, Any], now: float | None = None) -> int:
    """How long to keep an event record from now: until the event, its recovery and randomization
    window are over (``keep_until``), plus ``DR_RETENTION_S``."""
    now = time.time() if now is None else now
    until = float(record.get("keep_until") or record.get("end_at") or now)
    return int(max(0.0, until - now)) + keys.DR_RETENTION_S


class DrStore:
    """Demand-response records of one zone's Redis."""

    def __init__(self, client: StrRedis) -> None:
        self.redis = client
        self._claim = client.register_script(_CLAIM)

    # events
    def events(self, meter_id: str) -> dict[str, dict[str, Any]]:
        raw = self._do(lambda: self.redis.hgetall(keys.dr_events(meter_id)))
        return {eid: json.loads(doc) for eid, doc in raw.items()}

    def event(self, meter_id: str, event_id: str) -> dict[str, Any]:
        raw = self._do(lambda: self.redis.hget(keys.dr_events(meter_id), event_id))
        if raw is None:
            raise NotFound(f"event {event_id!r} is not known to meter {meter_id!r}", event_id=event_id)
        return dict(json.loads(raw))

    def update(self, meter_id: str, event_id: str,
               change: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> dict[str, Any] | None:
        """Read-modify-write one event record under WATCH; ``change`` may return None to leave it."""
        key = keys.dr_events(meter_id)
        for _ in range(20):
            try:
                with self.redis.pipeline(transaction=True) as pipe:
                    pipe.watch(key)
                    raw = pipe.hget(key, event_id)
                    before = json.loads(raw) if raw else None
                    new = change(json.loads(raw) if raw else None)
                    if new is None:
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    pipe.hset(key, event_id, json.dumps(new, separators=(",", ":")))
                    ttl = retention_s(new)
                    # The hash holds every event of the meter: its TTL only ever grows (NX sets, GT extends).
                    pipe.expire(key, ttl, nx=True)
                    pipe.expire(key, ttl, gt=True)
                    pipe.execute()
            except redis.WatchError:
                continue
            except redis.RedisError as exc:
                raise BackendUnavailable(f"Redis unavailable updating DR event {event_id!r} of {meter_id!r}: {exc}") \
                    from exc
            self._index(meter_id, event_id, new, change_of(before, new))
            return new
        raise BackendUnavailable(f"DR event {event_id!r} of {meter_id!r} kept changing; gave up after 20 tries")

    def _index(self, meter_id: str, event_id: str, record: dict[str, Any], change: str | None) -> None:
        """The operator's per-event view, and the ``dr`` event of the change; other hash slots, so
        outside the meter's transaction."""
        entry = {"opt": record.get("opt"), "code": record.get("response_code"),
                 "mod": record.get("modification_number"), "cancelled": record.get("cancelled"),
                 "exec": (record.get("exec") or {}).get("state"), "baseline_w": record.get("baseline_w")}
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.dr_event_meters(event_id), meter_id, json.dumps(entry, separators=(",", ":")))
        ttl = retention_s(record)
        pipe.expire(keys.dr_event_meters(event_id), ttl, nx=True)
        pipe.expire(keys.dr_event_meters(event_id), ttl, gt=True)
        pipe.zadd(keys.DR_EVENT_INDEX, {event_id: float(record.get("start") or time.time())})
        pipe.zremrangebyscore(keys.DR_EVENT_INDEX, "-inf", time.time() - keys.DR_RETENTION_S)
        if change is not None:
            stream_events.queue(self.redis, pipe, stream_events.dr_event(meter_id, event_id, change, record))
        self._do(pipe.execute)

    def prune(self, meter_id: str, now: float) -> int:
        """Drop the oldest finished events beyond ``events_per_meter_max``."""
        limit = get_dr_settings().events_per_meter_max
        if self._do(lambda: self.redis.hlen(keys.dr_events(meter_id))) <= limit:
            return 0
        records = self.events(meter_id)
        done = sorted((r for r in records.values() if r.get("cancelled") or now >= r.get("end_at", 0)),
                      key=lambda r: r.get("end_at", 0))
        drop = [r["event_id"] for r in done[: len(records) - limit]]
        if drop:
            self._do(lambda: self.redis.hdel(keys.dr_events(meter_id), *drop))
        return len(drop)

    # preferences
    def preferences(self, meter_id: str) -> Preferences:
        raw = self._do(lambda: self.redis.get(keys.dr_preferences(meter_id)))
        return Preferences.model_validate_json(raw) if raw else Preferences()

    def set_preferences(self, meter_id: str, prefs: Preferences) -> None:
        self._do(lambda: self.redis.set(keys.dr_preferences(meter_id), prefs.model_dump_json()))

    # load control state (what the twin last asked the meter)
    def load_control(self, meter_id: str) -> dict[str, Any]:
        raw = self._do(lambda: self.redis.get(keys.dr_load_control(meter_id)))
        return dict(json.loads(raw)) if raw else {}

    def set_load_control(self, meter_id: str, state: dict[str, Any]) -> None:
        self._do(lambda: self.redis.set(keys.dr_load_control(meter_id), json.dumps(state, separators=(",", ":"))))

    # due actions
    def schedule(self, actions: list[tuple[float, dict[str, Any]]]) -> None:
        if not actions:
            return
        mapping = {json.dumps(a, separators=(",", ":"), sort_keys=True): at for at, a in actions}
        self._do(lambda: self.redis.zadd(keys.DR_DUE, mapping))

    def claim_due(self, now: float, limit: int) -> list[dict[str, Any]]:
        members = self._do(lambda: self._claim(keys=[keys.DR_DUE], args=[repr(now), limit]))
        return [json.loads(m) for m in members]

    def next_due(self) -> float | None:
        first = self._do(lambda: self.redis.zrange(keys.DR_DUE, 0, 0, withscores=True))
        return float(first[0][1]) if first else None

    # opt-outs for the VTN (the bridge sends them as oadrCreateOpt)
    def queue_opt(self, meter_id: str, opt: dict[str, Any]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(keys.dr_opts(meter_id), json.dumps(opt, separators=(",", ":")))
        pipe.expire(keys.dr_opts(meter_id), keys.DR_RETENTION_S)
        pipe.sadd(keys.DR_OPTS_PENDING, meter_id)
        self._do(pipe.execute)

    def opts_pending(self) -> int:
        return int(self._do(lambda: self.redis.scard(keys.DR_OPTS_PENDING)))

    def claim_opts(self, meter_ids: list[str]) -> list[dict[str, Any]]:
        """The queued opt-outs of these meters, removed from the queue (the caller retries sending them)."""
        flags = self._do(lambda: self.redis.smismember(keys.DR_OPTS_PENDING, meter_ids)) if meter_ids else []
        out: list[dict[str, Any]] = []
        for meter_id, pending in zip(meter_ids, flags, strict=True):
            if not pending:
                continue
            pipe = self.redis.pipeline(transaction=True)
            pipe.lrange(keys.dr_opts(meter_id), 0, -1)
            pipe.delete(keys.dr_opts(meter_id))
            raw, _ = self._do(pipe.execute)
            self._do(functools.partial(self.redis.srem, keys.DR_OPTS_PENDING, meter_id))
            out.extend(json.loads(doc) for doc in raw)
        return out

    @staticmethod
    def _do(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc

