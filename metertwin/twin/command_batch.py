"""One command to many meters at once (bulk jobs): the same records, states and events as
:meth:`metertwin.twin.commands.CommandService.submit`, in a few round trips per batch instead of
about ten per meter.

1. ``SADD`` the meters to the sweep set (before their commands exist, as ``submit`` does);
2. one pipeline of a per-meter script (its keys share the meter's hash tag, so a Redis Cluster
   pipeline groups them by slot): the twin must exist; stores the command, its open-set and log
   entries atomically; returns the meter's concentrator, if any;
3. ``SADD`` again (after the commands exist) and the ``pending`` events, in one pipeline;
4. the MQTT publishes, QoS 1, a bounded window awaiting PUBACK (:meth:`TwinMqtt.publish_many`),
   each to the meter's own topic or down its concentrator's, addressed by ``meter_id``;
5. one pipeline of the ``attempts`` counts and the ``pending -> delivered`` transitions, then
   the ``delivered`` events of the ones that moved (an ack that came first wins, as in ``submit``).

A meter with no twin gets :class:`UnknownMeter` (step 1 put it in the sweep set; the sweep finds
nothing open and takes it out). A command the broker did not take stays ``pending`` (the sweeper
republishes it) and still counts as submitted, as does one stored when Redis fails after step 2.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from metertwin.core import topics
from metertwin.core.clients import get_mqtt
from metertwin.core.errors import BackendUnavailable, MeterTwinError, UnknownMeter
from metertwin.core.settings import get_settings
from metertwin.stream import events
from metertwin.twin import keys

# KEYS: twin, command, open set, log; ARGV: command id, expires_at, now, log max, route field, field/value pairs...
_STORE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
redis.call('HSET', KEYS[2], unpack(ARGV, 6))
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -tonumber(ARGV[4]) - 1)
return {1, redis.call('HGET', KEYS[1], ARGV[5]) or ''}
"""

_scripts: dict[int, Any] = {}


def _store_script(client: Any) -> Any:
    found = _scripts.get(id(client))
    if found is None or found[0] is not client:
        found = _scripts[id(client)] = (client, client.register_script(_STORE))
    return found[1]


def submit_many(service: Any, meter_ids: list[str], kind: str, clean: dict[str, Any], *, expiry_s: int,
                actor: str) -> list[str | MeterTwinError]:
    """Send the validated command ``kind``/``clean`` to every meter of ``meter_ids``; per meter, the
    command id or the error (the batch's ``BackendUnavailable`` when Redis fails before storing)."""
    r = service.redis
    if not meter_ids:
        return []
    now = time.time()
    expires_at = now + expiry_s
    ids = [uuid.uuid4().hex[:16] for _ in meter_ids]
    out: list[str | MeterTwinError] = []
    store = _store_script(r)
    try:
        r.sadd(keys.METERS_WITH_OPEN_COMMANDS, *meter_ids)
        pipe = r.pipeline(transaction=False)
        for meter_id, cid in zip(meter_ids, ids, strict=True):
            record = {"id": cid, "meter_id": meter_id, "kind": kind, "params": json.dumps(clean), "status": "pending",
                      "created_at": repr(now), "updated_at": repr(now), "expires_at": repr(expires_at),
                      "actor": actor, "attempts": "0"}
            store(keys=[keys.twin(meter_id), keys.command(meter_id, cid), keys.pending_commands(meter_id),
                        keys.command_log(meter_id)],
                  args=[cid, repr(expires_at), repr(now), keys.COMMAND_LOG_MAX, keys.ROUTE_FIELD,
                        *[x for kv in record.items() for x in kv]], client=pipe)
        replies = pipe.execute(raise_on_error=False)
    except redis.RedisError as exc:
        err = BackendUnavailable(f"Redis unavailable storing commands: {exc}")
        return [err for _ in meter_ids]
    stored: list[tuple[str, str, str]] = []  # meter, command id, concentrator or ''
    for meter_id, cid, reply in zip(meter_ids, ids, replies, strict=True):
        if isinstance(reply, Exception):
            out.append(BackendUnavailable(f"Redis unavailable storing command for {meter_id!r}: {reply}"))
        elif not int(reply[0]):
            out.append(UnknownMeter(f"meter {meter_id!r} has no twin in this zone", meter_id=meter_id))
        else:
            out.append(cid)
            stored.append((meter_id, cid, str(reply[1] or "")))
    if not stored:
        return out
    try:
        pipe = r.pipeline(transaction=False)
        pipe.sadd(keys.METERS_WITH_OPEN_COMMANDS, *[m for m, _, _ in stored])
        events.queue(r, pipe, *[_event(m, c, "pending", kind) for m, c, _ in stored])
        pipe.execute()
    except redis.RedisError as exc:
        del exc  # stored: the commands exist and stay pending (the sweeper republishes them)
        return out
    _publish(service, stored, kind, clean, expires_at)
    return out


def _publish(service: Any, stored: list[tuple[str, str, str]], kind: str, clean: dict[str, Any],
             expires_at: float) -> None:
    remaining = int(expires_at - time.time())
    if remaining <= 0:
        return  # stays pending, as in submit
    messages = []
    for meter_id, cid, via in stored:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.MessageExpiryInterval = remaining
        payload: dict[str, Any] = {"id": cid, "kind": kind, "params": clean, "expires_at": expires_at}
        if via:
            messages.append((topics.concentrator_commands(via), {**payload, "meter_id": meter_id}, props))
        else:
            messages.append((topics.commands(meter_id), payload, props))
    r = service.redis
    try:
        failed = get_mqtt().publish_many(messages, timeout_s=get_settings().publish_timeout_s)
    except BackendUnavailable:
        failed = ["broker unavailable"] * len(messages)
    try:
        pipe = r.pipeline(transaction=False)
        for meter_id, cid, _ in stored:
            pipe.hincrby(keys.command(meter_id, cid), "attempts", 1)
        took = [s for s, why in zip(stored, failed, strict=True) if why is None]
        for meter_id, cid, _ in took:
            service.transition_in(pipe, meter_id, cid, "delivered", ("pending",))
        replies = pipe.execute()[len(stored):]
        moved = [_event(m, c, "delivered") for (m, c, _), (done, _s) in zip(took, replies, strict=True) if done]
        events.emit(r, *moved)
    except redis.RedisError:
        return  # published; the records say pending: the sweeper republishes (at-least-once, as in submit)


def _event(meter_id: str, command_id: str, status: str, kind: str = "") -> events.Event:
    data = {"id": command_id, "status": status, **({"kind": kind} if kind else {})}
    return events.Event(events.COMMAND, meter_id, json.dumps(data, separators=(",", ":")), status)
