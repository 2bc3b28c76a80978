"""Commands from a twin to its meter: stored, delivered over MQTT, acknowledged, tracked.

Lifecycle (nothing is dropped silently; every command ends in a final state):

* ``pending``: accepted and stored; not yet taken by the broker (broker down).
  The sweeper (cron) republishes pending commands.
* ``delivered``: the broker acknowledged it (PUBACK) into the meter's persistent
  session; an offline meter receives it on reconnect, while the MQTT v5
  message expiry has not passed.
* ``acknowledged`` / ``rejected``: the meter applied or refused it (its ack).
* ``expired``: the expiry passed with no answer from the meter.

Each command is a Redis hash; a sorted set of open commands per meter (scored by
expiry) lets the sweeper find what to expire, and a capped log lists recent ones.
Status changes are Lua scripts so that an ack racing the sweeper cannot be lost.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

import redis
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, model_validator

from metertwin.core.clients import StrRedis, get_mqtt, get_redis
from metertwin.core.errors import BackendUnavailable, InvalidInput, MeterTwinError, NotFound, UnknownMeter
from metertwin.core.http import validate
from metertwin.core.settings import get_settings
from metertwin.stream import events
from metertwin.twin import command_batch, keys
from metertwin.twin.concentrators import downlink
from metertwin.twin.messages import CommandAck

OPEN = ("pending", "delivered")
FINAL = ("acknowledged", "rejected", "expired")
MAX_EXPIRY_S = 7 * 24 * 3600


# --- parameters per kind --------------------------------------------------------------
class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RelayParams(_Params):
    state: Literal["open", "closed"]


class ReportingIntervalParams(_Params):
    seconds: int = Field(ge=1, le=86_400)


class LoadLimitParams(_Params):
    watts: Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)] | None


class TariffPeriod(_Params):
    name: str = Field(min_length=1, max_length=32)
    start: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="HH:MM local time")
    price: float = Field(ge=-10, le=10, allow_inf_nan=False, description="currency per kWh")


class TariffParams(_Params):
    tariff_id: str = Field(min_length=1, max_length=64)
    periods: list[TariffPeriod] = Field(default_factory=list, max_length=48)


class DesiredFields(_Params):
    relay: Literal["open", "closed"] | None = None
    reporting_interval_s: int | None = Field(default=None, ge=1, le=86_400)
    load_limit_w: float | None = Field(default=None, ge=0, le=1_000_000, allow_inf_nan=False)
    tariff_id: str | None = Field(default=None, min_length=1, max_length=64)


class DesiredParams(_Params):
    fields: dict[str, Any]

    @model_validator(mode="after")
    def _known_fields(self) -> DesiredParams:
        if not self.fields:
            raise ValueError("fields must name at least one setting")
        DesiredFields.model_validate(self.fields)
        return self


class OpaqueParams(BaseModel):
    """``trade`` and ``dr`` carry application payloads the meter only stores and echoes."""

    model_config = ConfigDict(extra="allow")


PARAMS_BY_KIND: dict[str, type[BaseModel]] = {
    "relay": RelayParams,
    "reporting_interval": ReportingIntervalParams,
    "load_limit": LoadLimitParams,
    "tariff": TariffParams,
    "desired": DesiredParams,
    "trade": OpaqueParams,
    "dr": OpaqueParams,
}


def validate_params(kind: str, params: Any) -> dict[str, Any]:
    model = PARAMS_BY_KIND.get(kind)
    if model is None:
        raise InvalidInput(f"command kind {kind!r} is unknown; known: {sorted(PARAMS_BY_KIND)}", field="kind")
    if not isinstance(params, dict):
        raise InvalidInput(f"params for {kind!r} must be an object, got {type(params).__name__}", field="params")
    try:
        return validate(params, model).model_dump(exclude_unset=kind in ("desired", "trade", "dr"))
    except InvalidInput as exc:
        raise InvalidInput(f"params for {kind!r}: {exc.message}", field="params") from None


# --- state transitions (atomic) ------------------------------------------------------
# KEYS: cmd, open set; ARGV: new status, now, allowed-from statuses (comma list), extra json
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0, ''} end
local allowed = false
for s in string.gmatch(ARGV[3], '[^,]+') do if s == status then allowed = true end end
if not allowed then return {0, status} end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[2])
for k, v in pairs(cjson.decode(ARGV[4])) do redis.call('HSET', KEYS[1], k, v) end
if ARGV[1] == 'acknowledged' or ARGV[1] == 'rejected' or ARGV[1] == 'expired' then
  redis.call('ZREM', KEYS[2], ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
end
return {1, ARGV[1]}
"""


class CommandService:
    """Submit commands, record acks, expire and republish (one per process)."""

    def __init__(self, client: StrRedis) -> None:
        self._r = client
        self.redis = client
        self._transition = client.register_script(_TRANSITION)

    def submit(
        self, meter_id: str, kind: str, params: Any, *, expiry_s: int | None = None, actor: str = "system"
    ) -> dict[str, Any]:
        clean = validate_params(kind, params)
        expiry = expiry_s if expiry_s is not None else get_settings().command_expiry_s
        if not 1 <= expiry <= MAX_EXPIRY_S:
            raise InvalidInput(f"expiry_s {expiry} is outside [1, {MAX_EXPIRY_S}]", field="expiry_s")
        try:
            if not self._r.exists(keys.twin(meter_id)):
                raise UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        now = time.time()
        command_id = uuid.uuid4().hex[:16]
        record = {
            "id": command_id, "meter_id": meter_id, "kind": kind, "params": json.dumps(clean),
            "status": "pending", "created_at": repr(now), "updated_at": repr(now),
            "expires_at": repr(now + expiry), "actor": actor, "attempts": "0",
        }
        # The sweep set is another slot than the meter's keys on Redis Cluster, so it is written
        # apart from the meter's MULTI: before it (a crash in between leaves the meter in the set
        # with nothing open, which the sweep removes) and after it (so a sweep that ran in
        # between, see _forget_if_idle, cannot have dropped the meter for good).
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(keys.command(meter_id, command_id), mapping=record)
        pipe.zadd(keys.pending_commands(meter_id), {command_id: now + expiry})
        pipe.zadd(keys.command_log(meter_id), {command_id: now})
        pipe.zremrangebyrank(keys.command_log(meter_id), 0, -keys.COMMAND_LOG_MAX - 1)
        try:
            self._r.sadd(keys.METERS_WITH_OPEN_COMMANDS, meter_id)
            pipe.execute()
            self._r.sadd(keys.METERS_WITH_OPEN_COMMANDS, meter_id)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable storing command for {meter_id!r}: {exc}") from exc
        events.command_status(self._r, meter_id, command_id, "pending", kind)
        self._publish(meter_id, command_id, kind, clean, now + expiry)
        return self.get(meter_id, command_id)

    def submit_many(
        self, meter_ids: list[str], kind: str, params: Any, *, expiry_s: int | None = None, actor: str = "system"
    ) -> list[str | MeterTwinError]:
        """One command to each of ``meter_ids`` in a few round trips (:mod:`metertwin.twin.command_batch`):
        per meter, the command id or the error ``submit`` would have raised. Bad params raise."""
        clean = validate_params(kind, params)
        expiry = expiry_s if expiry_s is not None else get_settings().command_expiry_s
        if not 1 <= expiry <= MAX_EXPIRY_S:
            raise InvalidInput(f"expiry_s {expiry} is outside [1, {MAX_EXPIRY_S}]", field="expiry_s")
        return command_batch.submit_many(self, meter_ids, kind, clean, expiry_s=expiry, actor=actor)

    def transition_in(self, pipe: Any, meter_id: str, command_id: str, status: str, allowed: tuple[str, ...]) -> None:
        """Queue a status change on ``pipe`` (its reply: ``[moved, status]``; the caller emits the event)."""
        self._transition(
            keys=[keys.command(meter_id, command_id), keys.pending_commands(meter_id)],
            args=[status, repr(time.time()), ",".join(allowed), "{}", command_id, keys.COMMAND_RETENTION_S],
            client=pipe,
        )

    def _publish(self, meter_id: str, command_id: str, kind: str, params: dict[str, Any], expires_at: float) -> bool:
        remaining = int(expires_at - time.time())
        if remaining <= 0:
            return False
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.MessageExpiryInterval = remaining
        payload = {"id": command_id, "kind": kind, "params": params, "expires_at": expires_at}
        self._r.hincrby(keys.command(meter_id, command_id), "attempts", 1)
        try:
            # Direct, or down the concentrator the meter is behind, addressed by meter_id.
            topic, address = downlink(self._r, meter_id, "cmd")
            get_mqtt().publish(
                topic, {**payload, **address}, timeout_s=get_settings().publish_timeout_s, properties=props
            )
        except BackendUnavailable:
            return False  # stays pending; the sweeper retries
        self._move(meter_id, command_id, "delivered", ("pending",))
        return True

    def get(self, meter_id: str, command_id: str) -> dict[str, Any]:
        try:
            raw = self._r.hgetall(keys.command(meter_id, command_id))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        if not raw:
            raise NotFound(f"command {command_id!r} of meter {meter_id!r} not found", command_id=command_id)
        if raw["status"] in OPEN and float(raw["expires_at"]) < time.time():
            self._move(meter_id, command_id, "expired", OPEN)
            raw = self._r.hgetall(keys.command(meter_id, command_id))
        return _public(raw)

    def recent(self, meter_id: str, limit: int = 50) -> list[dict[str, Any]]:
        ids = self._r.zrevrange(keys.command_log(meter_id), 0, max(0, limit - 1))
        out = []
        for command_id in ids:
            try:
                out.append(self.get(meter_id, command_id))
            except NotFound:
                continue  # aged out of retention
        return out

    def on_ack(self, meter_id: str, ack: CommandAck) -> str | None:
        """Record the meter's answer; returns the new status, or None if unknown/already final."""
        status = "acknowledged" if ack.status == "applied" else "rejected"
        extra = {"acked_at": repr(ack.ts), **({"reason": ack.reason} if ack.reason else {})}
        # An ack is the meter's word: it wins even over an expiry the sweeper just recorded.
        moved = self._move(meter_id, ack.id, status, (*OPEN, "expired"), extra)
        return status if moved else None

    def sweep_all(self, batch: int = 500) -> dict[str, int]:
        """Sweep every meter with open commands (the cron entry point)."""
        totals = {"expired": 0, "republished": 0, "meters": 0}
        cursor = 0
        while True:
            cursor, ids = self._r.sscan(keys.METERS_WITH_OPEN_COMMANDS, cursor=cursor, count=batch)
            done = self.sweep(list(ids))
            for name in ("expired", "republished"):
                totals[name] += done[name]
            totals["meters"] += len(ids)
            if cursor == 0:
                return totals

    def sweep(self, meter_ids: list[str]) -> dict[str, int]:
        """Expire overdue commands and republish pending ones for ``meter_ids``."""
        now = time.time()
        expired = republished = 0
        for meter_id in meter_ids:
            for command_id in self._r.zrangebyscore(keys.pending_commands(meter_id), "-inf", now):
                expired += self._move(meter_id, command_id, "expired", OPEN)
            for command_id in self._r.zrangebyscore(keys.pending_commands(meter_id), now, "+inf"):
                raw = self._r.hgetall(keys.command(meter_id, command_id))
                if raw.get("status") == "pending":
                    published = self._publish(
                        meter_id, command_id, raw["kind"], json.loads(raw["params"]), float(raw["expires_at"])
                    )
                    republished += published
            self._forget_if_idle(meter_id)
        return {"expired": expired, "republished": republished}

    def _forget_if_idle(self, meter_id: str) -> None:
        """Take a meter with no open command out of the sweep set.

        Not one script: the set and the meter's queue are different slots on Redis Cluster.
        Check, remove, check again, and put it back if a command was submitted meanwhile: a
        submit re-adds the meter after its MULTI, so whichever order the steps interleave in,
        a meter with an open command ends in the set.
        """
        if self._r.zcard(keys.pending_commands(meter_id)):
            return
        self._r.srem(keys.METERS_WITH_OPEN_COMMANDS, meter_id)
        if self._r.zcard(keys.pending_commands(meter_id)):
            self._r.sadd(keys.METERS_WITH_OPEN_COMMANDS, meter_id)

    def _move(
        self, meter_id: str, command_id: str, status: str, allowed: tuple[str, ...], extra: dict[str, str] | None = None
    ) -> bool:
        done, _ = self._transition(
            keys=[keys.command(meter_id, command_id), keys.pending_commands(meter_id)],
            args=[status, repr(time.time()), ",".join(allowed), json.dumps(extra or {}), command_id,
                  keys.COMMAND_RETENTION_S],
        )
        if done:
            events.command_status(self._r, meter_id, command_id, status)
        return bool(done)


def _public(raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": raw["id"], "meter_id": raw["meter_id"], "kind": raw["kind"], "params": json.loads(raw["params"]),
        "status": raw["status"], "created_at": float(raw["created_at"]), "updated_at": float(raw["updated_at"]),
        "expires_at": float(raw["expires_at"]), "actor": raw.get("actor"), "attempts": int(raw.get("attempts", 0)),
    }
    if "acked_at" in raw:
        out["acked_at"] = float(raw["acked_at"])
    if "reason" in raw:
        out["reason"] = raw["reason"]
    return out


_service: CommandService | None = None


def get_commands() -> CommandService:
    global _service
    client = get_redis()
    if _service is None or _service.redis is not client:
        _service = CommandService(client)
    return _service


def submit(
    meter_id: str, kind: str, params: dict[str, Any], *, expiry_s: int | None = None, actor: str = "system"
) -> dict[str, Any]:
    """Send a command to a meter through its twin (the write capability's library entry point)."""
    return get_commands().submit(meter_id, kind, params, expiry_s=expiry_s, actor=actor)
