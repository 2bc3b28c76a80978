"""Data concentrators (DCUs): meters behind one MQTT account that uplinks their readings in batches.

A concentrator is provisioned like a meter (a record here, its own MQTT account and dynsec role,
:mod:`metertwin.twin.dynsec`). A meter is *direct* or *behind* one concentrator; the twin hash's
``dcu`` field (``keys.ROUTE_FIELD``) says which, and is the authority:

* the ingest script applies a concentrator's reading only for a meter whose ``dcu`` names it
  (checked atomically with the reading, :mod:`metertwin.upgrade.inbox`);
* the concentrator's role lets it publish on the ``up`` topics of its meters only (the broker
  refuses the rest);
* reads and commands of a meter behind a concentrator go down the concentrator's topics,
  addressed per meter (:func:`downlink`); it answers and acks on the meter's own ``up`` topics.

A move (:meth:`Concentrators.assign`) writes in an order that a crash leaves safe and a retry
repairs: the new concentrator's ACL and set first, then the twin's ``dcu`` (the switch), then
the old concentrator's ACL and set are removed.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from metertwin.core import topics
from metertwin.core.clients import StrRedis, get_redis
from metertwin.core.errors import BackendUnavailable, Conflict, InvalidInput, NotFound, UnknownMeter
from metertwin.core.http import METER_ID_RE, Request, Response, Router, json_response
from metertwin.core.settings import get_settings
from metertwin.twin import keys
from metertwin.twin.dynsec import DynSec, concentrator_username, get_dynsec, new_password

#: Sets the route of one twin if it exists: ARGV[1] the concentrator ('' = direct). Returns the old one.
_ROUTE = f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local old = redis.call('HGET', KEYS[1], '{keys.ROUTE_FIELD}') or ''
if ARGV[1] == '' then redis.call('HDEL', KEYS[1], '{keys.ROUTE_FIELD}')
else redis.call('HSET', KEYS[1], '{keys.ROUTE_FIELD}', ARGV[1]) end
return old
"""

#: Meters per assignment request.
MAX_ASSIGN = 10_000
#: Above this many meters, an assignment rewrites the concentrator's role once
#: (:meth:`Concentrators.sync_relays`) instead of one broker command (one file rewrite) per meter.
RELAY_ONE_BY_ONE = 16


def check_id(concentrator_id: str) -> str:
    if not METER_ID_RE.match(concentrator_id):
        raise InvalidInput(f"concentrator id {concentrator_id!r} must be 1-64 letters, digits or _.:- "
                           "starting with a letter or digit", field="concentrator_id")
    return concentrator_id


class Concentrators:
    """Provision concentrators and move meters between them (and to direct)."""

    def __init__(self, client: StrRedis, dynsec: DynSec | None) -> None:
        self._r = client
        self._dynsec = dynsec
        self._route = client.register_script(_ROUTE)

    def _acl(self) -> DynSec:
        if self._dynsec is None:
            raise BackendUnavailable("no MQTT broker administration configured for concentrator accounts")
        return self._dynsec

    def create(self, concentrator_id: str, password: str) -> dict[str, Any]:
        """Create the record and the account (a new password replaces an existing account's)."""
        check_id(concentrator_id)
        try:
            self._r.hsetnx(keys.concentrator(concentrator_id), "created_at", repr(time.time()))
            self._r.sadd(keys.CONCENTRATOR_INDEX, concentrator_id)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        error = self._acl().create_concentrator(concentrator_id, password)
        if error:
            raise BackendUnavailable(f"MQTT account of concentrator {concentrator_id!r} not created: {error}")
        if self.meters(concentrator_id):  # a replaced account gets its meters' ACLs back
            self.sync_relays(concentrator_id)
        return {"concentrator_id": concentrator_id, "username": concentrator_username(concentrator_id)}

    def exists(self, concentrator_id: str) -> bool:
        try:
            return bool(self._r.exists(keys.concentrator(concentrator_id)))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc

    def meters(self, concentrator_id: str) -> list[str]:
        try:
            return sorted(self._r.smembers(keys.concentrator_meters(concentrator_id)))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc

    def get(self, concentrator_id: str) -> dict[str, Any]:
        check_id(concentrator_id)
        try:
            record = self._r.hgetall(keys.concentrator(concentrator_id))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        if not record:
            raise NotFound(f"concentrator {concentrator_id!r} is not provisioned in this zone")
        return {"concentrator_id": concentrator_id, "username": concentrator_username(concentrator_id),
                "created_at": float(record.get("created_at") or 0), "meters": self.meters(concentrator_id)}

    def delete(self, concentrator_id: str) -> None:
        """Remove an empty concentrator (its meters must be moved first: 409 otherwise)."""
        self.get(concentrator_id)
        if self.meters(concentrator_id):
            raise Conflict(f"concentrator {concentrator_id!r} still has meters; move them first")
        self._acl().delete_concentrator(concentrator_id)
        try:
            self._r.srem(keys.CONCENTRATOR_INDEX, concentrator_id)
            self._r.delete(keys.concentrator(concentrator_id), keys.concentrator_rejections(concentrator_id))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc

    def sync_relays(self, concentrator_id: str) -> None:
        """Rewrite the concentrator's relay ACLs from its meter set in one broker command
        (:meth:`DynSec.set_relays`), again until the set read after a rewrite is the one written: a
        concurrent change of the set (another worker's assignment) is never left out of the ACLs."""
        sent: list[str] | None = None
        for _attempt in range(8):
            members = self.meters(concentrator_id)
            if members == sent:
                return
            error = self._acl().set_relays(concentrator_id, members)
            if error:
                raise BackendUnavailable(f"relay ACLs of concentrator {concentrator_id!r} not written: {error}")
            sent = members
        raise BackendUnavailable(f"meters of concentrator {concentrator_id!r} changed too often; retry")

    def route(self, meter_id: str) -> str | None:
        """The concentrator the meter is behind, or None (direct)."""
        try:
            value = self._r.hget(keys.twin(meter_id), keys.ROUTE_FIELD)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        return value or None

    def assign(self, meter_ids: list[str], concentrator_id: str | None) -> dict[str, Any]:
        """Put ``meter_ids`` behind ``concentrator_id`` (None: direct). Idempotent; see the module doc."""
        if len(meter_ids) > MAX_ASSIGN:
            raise InvalidInput(f"{len(meter_ids)} meters exceed {MAX_ASSIGN} per request", field="meter_ids")
        for m in meter_ids:
            if not METER_ID_RE.match(m):
                raise InvalidInput(f"meter id {m!r} is not valid", field="meter_ids")
        target = concentrator_id or ""
        if target and not self.exists(check_id(target)):
            raise NotFound(f"concentrator {target!r} is not provisioned in this zone")
        try:
            pipe = self._r.pipeline(transaction=False)
            for m in meter_ids:
                pipe.exists(keys.twin(m))
            known = [m for m, e in zip(meter_ids, pipe.execute(), strict=True) if e]
            missing = sorted(set(meter_ids) - set(known))
            if target and len(known) > RELAY_ONE_BY_ONE:  # one role rewrite, not one per meter
                self._r.sadd(keys.concentrator_meters(target), *known)
                self.sync_relays(target)
            elif target and known:
                failed = self._acl().relay(target, add=known)
                if failed:
                    raise BackendUnavailable(f"concentrator ACLs not added: {failed}")
                self._r.sadd(keys.concentrator_meters(target), *known)
            pipe = self._r.pipeline(transaction=False)
            for m in known:
                self._route(keys=[keys.twin(m)], args=[target], client=pipe)
            olds = pipe.execute()
            moved_from: dict[str, list[str]] = {}
            for m, old in zip(known, olds, strict=True):
                if old and old != target:
                    moved_from.setdefault(str(old), []).append(m)
            for old, ms in moved_from.items():
                if len(ms) > RELAY_ONE_BY_ONE:
                    self._r.srem(keys.concentrator_meters(old), *ms)
                    self.sync_relays(old)
                else:
                    self._acl().relay(old, remove=ms)
                    self._r.srem(keys.concentrator_meters(old), *ms)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        if len(meter_ids) == 1 and missing:
            raise UnknownMeter(f"meter {missing[0]!r} has no twin in this zone", meter_id=missing[0])
        return {"concentrator_id": concentrator_id, "assigned": len(known), "unknown": missing,
                "moved_from": {k: len(v) for k, v in moved_from.items()}}

    def forget(self, meter_ids: list[str]) -> None:
        """Before twins are removed: take the meters off their concentrators (ACL and set)."""
        by: dict[str, list[str]] = {}
        for m in meter_ids:
            c = self.route(m)
            if c:
                by.setdefault(c, []).append(m)
        for c, ms in by.items():
            if self._dynsec is not None:
                self._dynsec.relay(c, remove=ms)
            self._r.srem(keys.concentrator_meters(c), *ms)

    def record_rejections(self, concentrator_id: str, rejected: list[dict[str, Any]]) -> None:
        """Keep the readings refused from the concentrator's batch, with their reason (capped stream)."""
        if not rejected:
            return
        pipe = self._r.pipeline(transaction=False)
        for r in rejected:
            pipe.xadd(keys.concentrator_rejections(concentrator_id),
                      {k: str(v) for k, v in r.items() if v is not None},
                      maxlen=keys.CONCENTRATOR_REJECTIONS_MAXLEN, approximate=True)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable recording rejections: {exc}") from exc

    def rejections(self, concentrator_id: str, limit: int = 100) -> list[dict[str, Any]]:
        try:
            entries = self._r.xrevrange(keys.concentrator_rejections(concentrator_id), count=limit)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        return [{"id": i, **f} for i, f in entries]


def downlink(client: StrRedis, meter_id: str, kind: str) -> tuple[str, dict[str, Any]]:
    """(topic, extra payload) of a ``kind`` (``read`` or ``cmd``) message for ``meter_id``.

    Direct: the meter's own topic. Behind a concentrator: the concentrator's topic, addressed
    by ``meter_id`` in the payload.
    """
    try:
        via = client.hget(keys.twin(meter_id), keys.ROUTE_FIELD)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
    if not via:
        return (topics.read_requests(meter_id) if kind == "read" else topics.commands(meter_id)), {}
    topic = topics.concentrator_read_requests(via) if kind == "read" else topics.concentrator_commands(via)
    return topic, {"meter_id": meter_id}


class NewConcentrator(BaseModel):
    model_config = ConfigDict(extra="forbid")

    concentrator_id: str = Field(min_length=1, max_length=64)


class Assignment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meter_ids: list[str] = Field(min_length=1, max_length=MAX_ASSIGN)


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: The concentrator the meter goes behind; null: direct.
    concentrator_id: str | None = Field(default=None, min_length=1, max_length=64)


def register_concentrator_routes(router: Router, operators: set[str]) -> None:
    """The registry's concentrator routes (see the module doc and the README's API table)."""
    def service() -> Concentrators:
        return Concentrators(get_redis(), get_dynsec())

    @router.post("/concentrators", scopes=operators)
    def create(req: Request) -> Response:
        body = req.json(NewConcentrator)
        password = new_password()
        created = service().create(body.concentrator_id, password)
        s = get_settings()
        cid = body.concentrator_id
        return json_response({**created, "password": password, "zone": s.zone,
                              "mqtt": {"host": s.mqtt_host, "port": s.mqtt_port, "username": created["username"]},
                              "topics": {"publish": f"{topics.concentrator_root(cid)}/up/#",
                                         "subscribe": f"{topics.concentrator_root(cid)}/down/#"}}, 201)

    @router.get("/concentrators/{concentrator_id}", scopes=operators)
    def get(req: Request) -> Response:
        return json_response(service().get(req.params["concentrator_id"]))

    @router.delete("/concentrators/{concentrator_id}", scopes={"admin"})
    def delete(req: Request) -> Response:
        service().delete(check_id(req.params["concentrator_id"]))
        return json_response({"concentrator_id": req.params["concentrator_id"], "removed": True})

    @router.post("/concentrators/{concentrator_id}/meters", scopes=operators)
    def assign(req: Request) -> Response:
        body = req.json(Assignment)
        return json_response(service().assign(body.meter_ids, check_id(req.params["concentrator_id"])))

    @router.get("/concentrators/{concentrator_id}/rejected", scopes=operators)
    def rejected(req: Request) -> Response:
        cid = check_id(req.params["concentrator_id"])
        return json_response({"concentrator_id": cid, "rejected": service().rejections(cid)})

    @router.put("/meters/{meter_id}/route", scopes=operators)
    def route(req: Request) -> Response:
        body = req.json(Route)
        return json_response(service().assign([req.params["meter_id"]], body.concentrator_id))
