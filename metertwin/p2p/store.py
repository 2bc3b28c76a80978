"""Redis persistence of peer-to-peer markets: specs, participants, rounds, trades, settlements.

A market moves ``open`` → ``running`` → ``cleared`` (or ``failed``). Participants can be
added only while it is ``open``; exactly one caller wins the move to ``running``
(Lua compare-and-set), so a market is never negotiated twice. Trades, the
settlement and the per-meter trade index are written in one MULTI, so a reader
never sees a cleared market without its trades.

Each change is a ``p2p`` event on the zone's stream (``metertwin.stream.events``): the market's
status (``open``, ``running``, ``cleared``, ``failed``; no meter), each negotiation round (one per
round, appended in the round's own pipeline) and each twin's trade (an event of its meter).
"""

from __future__ import annotations

import json
import time
from typing import Any, TypeAlias

import redis

from metertwin.core.errors import BackendUnavailable, Conflict, InvalidInput, NotFound
from metertwin.p2p import keys
from metertwin.stream import events

# KEYS: market, participants; ARGV: meter id, profile json, max participants
_PUT_PARTICIPANT = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {-1, ''} end
if status ~= 'open' then return {-2, status} end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 and redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[3]) then
  return {-3, ''}
end
local created = redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {created, status}
"""

# KEYS: market; ARGV: from status, to status, now, extra field, extra value
_MOVE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {-1, ''} end
if status ~= ARGV[1] then return {0, status} end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'updated_at', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], ARGV[4], ARGV[5]) end
return {1, ARGV[2]}
"""


#: A ``decode_responses=True`` client; redis-py's stubs type replies as bytes | str.
StrRedis: TypeAlias = Any


# KEYS: market, rounds; ARGV: now, stale after (s)
# open -> running; or a run left 'running' longer than any run can take (its process died):
# start over, forgetting that run's rounds. Returns {1, previous status} or {0|-1, status}.
_BEGIN_RUN = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {-1, ''} end
local stale = status == 'running' and
  tonumber(ARGV[1]) - tonumber(redis.call('HGET', KEYS[1], 'updated_at')) > tonumber(ARGV[2])
if status ~= 'open' and not stale then return {0, status} end
redis.call('HSET', KEYS[1], 'status', 'running', 'updated_at', ARGV[1])
redis.call('DEL', KEYS[2])
return {1, status}
"""


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


class MarketStore:
    """Markets of one zone in that zone's Redis."""

    def __init__(self, client: StrRedis) -> None:
        self.redis = client
        self._put = client.register_script(_PUT_PARTICIPANT)
        self._move = client.register_script(_MOVE)
        self._begin = client.register_script(_BEGIN_RUN)

    # -- markets --------------------------------------------------------------------
    def create(self, market_id: str, spec: dict[str, Any], *, created_by: str) -> dict[str, Any]:
        """Store a new ``open`` market; :class:`Conflict` if the id is taken."""
        now = time.time()
        record = {
            "id": market_id, "status": "open", "spec": _dump(spec), "created_by": created_by,
            "created_at": repr(now), "updated_at": repr(now),
        }
        try:
            if not self.redis.hsetnx(keys.p2p_market(market_id), "id", market_id):
                raise Conflict(f"market {market_id!r} already exists", market_id=market_id)
            # The list (its own slot on Redis Cluster) before the record: a crash in between leaves
            # a claimed id without a status, which get() and list_markets() skip, the state a crash
            # just after HSETNX always left.
            self.redis.zadd(keys.P2P_MARKETS, {market_id: float(spec["slot_start"])})
            self.redis.hset(keys.p2p_market(market_id), mapping=record)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable creating market {market_id!r}: {exc}") from exc
        events.emit(self.redis, events.p2p_market(market_id, "open"))
        return self.get(market_id)

    def get(self, market_id: str) -> dict[str, Any]:
        raw = self._hgetall(keys.p2p_market(market_id))
        if not raw or "status" not in raw:
            raise NotFound(f"market {market_id!r} not found", market_id=market_id)
        out: dict[str, Any] = {
            "id": raw["id"], "status": raw["status"], "spec": json.loads(raw["spec"]),
            "created_by": raw.get("created_by"), "created_at": float(raw["created_at"]),
            "updated_at": float(raw["updated_at"]),
        }
        if "result" in raw:
            out["result"] = json.loads(raw["result"])
        if "error" in raw:
            out["error"] = raw["error"]
        return out

    def list_markets(self, *, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent markets by slot start, newest first."""
        try:
            ids = self.redis.zrevrange(keys.P2P_MARKETS, 0, max(0, limit - 1))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        out = []
        for market_id in ids:
            try:
                market = self.get(market_id)
            except NotFound:
                continue
            market.pop("result", None)
            out.append(market)
        return out

    def move(self, market_id: str, frm: str, to: str, *, field: str = "", value: str = "") -> None:
        """Compare-and-set the status; :class:`Conflict` naming the current one if it is not ``frm``."""
        try:
            done, status = self._move(
                keys=[keys.p2p_market(market_id)], args=[frm, to, repr(time.time()), field, value]
            )
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        if done == -1:
            raise NotFound(f"market {market_id!r} not found", market_id=market_id)
        if done == 0:
            raise Conflict(
                f"market {market_id!r} is {status!r}, not {frm!r}", market_id=market_id, status=status
            )
        events.emit(self.redis, events.p2p_market(market_id, to, {field: value} if field else None))

    def begin_run(self, market_id: str, *, stale_after_s: float) -> str:
        """Move to ``running``; returns the previous status (``open``, or ``running`` for a dead run).

        :class:`Conflict` if the market is running (and not stale), cleared or failed.
        """
        try:
            done, status = self._begin(
                keys=[keys.p2p_market(market_id), keys.p2p_rounds(market_id)],
                args=[repr(time.time()), stale_after_s],
            )
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        if done == -1:
            raise NotFound(f"market {market_id!r} not found", market_id=market_id)
        if done == 0:
            raise Conflict(f"market {market_id!r} is {status!r}; only an 'open' market can run",
                           market_id=market_id, status=status)
        events.emit(self.redis, events.p2p_market(market_id, "running"))
        return str(status)

    # -- participants -----------------------------------------------------------------
    def put_participant(self, market_id: str, meter_id: str, profile: dict[str, Any]) -> bool:
        """Add or replace a participant while the market is open; True if newly added."""
        try:
            done, status = self._put(
                keys=[keys.p2p_market(market_id), keys.p2p_participants(market_id)],
                args=[meter_id, _dump(profile), keys.P2P_MAX_PARTICIPANTS],
            )
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        if done == -1:
            raise NotFound(f"market {market_id!r} not found", market_id=market_id)
        if done == -2:
            raise Conflict(
                f"market {market_id!r} is {status!r}; participants can join only while it is 'open'",
                market_id=market_id, status=status,
            )
        if done == -3:
            raise InvalidInput(
                f"market {market_id!r} already has the maximum of {keys.P2P_MAX_PARTICIPANTS} participants",
                field="meter_id",
            )
        return bool(done)

    def participants(self, market_id: str) -> dict[str, dict[str, Any]]:
        raw = self._hgetall(keys.p2p_participants(market_id))
        return {mid: json.loads(v) for mid, v in raw.items()}

    # -- rounds -------------------------------------------------------------------------
    def append_round(self, market_id: str, record: dict[str, Any]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(keys.p2p_rounds(market_id), _dump(record))
        if record.get("round") == 1:
            pipe.expire(keys.p2p_rounds(market_id), keys.P2P_ROUNDS_RETENTION_S)
        events.queue(self.redis, pipe, events.p2p_round(market_id, record))
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable recording a round of {market_id!r}: {exc}") from exc

    def append_rounds(self, market_id: str, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(keys.p2p_rounds(market_id), *[_dump(r) for r in records])
        pipe.expire(keys.p2p_rounds(market_id), keys.P2P_ROUNDS_RETENTION_S)
        events.queue(self.redis, pipe, *[events.p2p_round(market_id, r) for r in records])
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable recording rounds of {market_id!r}: {exc}") from exc

    def rounds(self, market_id: str, *, start: int = 0, count: int = 1000) -> list[dict[str, Any]]:
        try:
            raw = self.redis.lrange(keys.p2p_rounds(market_id), start, start + count - 1)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        return [json.loads(r) for r in raw]

    # -- outcome ------------------------------------------------------------------------
    def finish(
        self, market_id: str, result: dict[str, Any], trades: dict[str, dict[str, Any]], slot_start: float
    ) -> None:
        """Record the meters' trade indexes, then trades and result and ``cleared`` atomically.

        Each meter's index is its own slot on Redis Cluster, so it is written before the market's
        MULTI (one slot): a crash in between leaves indexes naming a market without trades, which
        :meth:`meter_trades` skips, and the retried clearing writes the same entries again.
        """
        index = self.redis.pipeline(transaction=False)
        for mid, trade in trades.items():
            if trade["kwh"] != 0:
                index.zadd(keys.p2p_meter_trades(mid), {market_id: slot_start})
        pipe = self.redis.pipeline(transaction=True)
        if trades:
            pipe.hset(keys.p2p_trades(market_id), mapping={mid: _dump(t) for mid, t in trades.items()})
        pipe.hset(
            keys.p2p_market(market_id),
            mapping={"status": "cleared", "result": _dump(result), "updated_at": repr(time.time())},
        )
        try:
            index.execute()
            pipe.execute()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable recording the outcome of {market_id!r}: {exc}") from exc
        # After the MULTI (another slot on Redis Cluster): watchers never hear of trades not stored.
        events.emit(self.redis, events.p2p_market(market_id, "cleared", result),
                    *[events.p2p_trade(market_id, t) for t in trades.values() if t["kwh"] != 0])

    def set_delivery(self, market_id: str, meter_id: str, delivery: dict[str, Any]) -> None:
        """Attach the write-capability outcome (command id, status) to a recorded trade."""
        key = keys.p2p_trades(market_id)
        try:
            raw = self.redis.hget(key, meter_id)
            if raw is None:
                return
            trade = json.loads(raw)
            trade["delivery"] = delivery
            self.redis.hset(key, meter_id, _dump(trade))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc

    def trades(self, market_id: str) -> dict[str, dict[str, Any]]:
        raw = self._hgetall(keys.p2p_trades(market_id))
        return {mid: json.loads(v) for mid, v in sorted(raw.items())}

    def trade(self, market_id: str, meter_id: str) -> dict[str, Any]:
        try:
            raw = self.redis.hget(keys.p2p_trades(market_id), meter_id)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        if raw is None:
            raise NotFound(f"meter {meter_id!r} has no trade in market {market_id!r}", meter_id=meter_id)
        return dict(json.loads(raw))

    def meter_trades(self, meter_id: str, *, limit: int = 100) -> list[dict[str, Any]]:
        """A meter's trades, newest slot first."""
        try:
            ids = self.redis.zrevrange(keys.p2p_meter_trades(meter_id), 0, max(0, limit - 1))
            out = []
            for market_id in ids:
                raw = self.redis.hget(keys.p2p_trades(market_id), meter_id)
                if raw is not None:
                    out.append({"market_id": market_id, **json.loads(raw)})
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        return out

    def _hgetall(self, key: str) -> dict[str, str]:
        try:
            return dict(self.redis.hgetall(key))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc


_store: MarketStore | None = None


def get_store() -> MarketStore:
    """The process's store over the zone's Redis (rebuilt if the client was reset)."""
    global _store
    from metertwin.core.clients import get_redis

    client = get_redis()
    if _store is None or _store.redis is not client:
        _store = MarketStore(client)
    return _store
