"""Provisioning at scale: many twins behind one concentrator per call, no broker account per meter.

``POST /concentrators/{id}/twins`` (registry) takes up to :data:`MAX_PROVISION` meters
``{"meters": [{"meter_id": ..., "profile": {...}}]}`` and, for the ones without a twin:

1. adds them to the concentrator's set and rewrites its role's relay ACLs in **one** broker command
   (:meth:`Concentrators.sync_relays`): Mosquitto 2.0's dynamic security rewrites its whole JSON
   file after every command, so one command per meter (or two, with an account each) is quadratic
   (10,000 ``addRoleACL`` ~90 s here), one per call is not;
2. creates the twins already behind the concentrator (the route is set by the create script itself)
   with one pipelined round trip, then indexes them (:meth:`TwinStore.create_many`);
3. writes their fleet records with one pipelined round trip (:meth:`TopologyStore.create_many`).

The ACL comes before the twin's route (the switch), as in a move. A call that fails half-way is
repaired by repeating it: a meter whose twin is already behind this concentrator counts as
``existing`` and gets its index entry and fleet record again (both idempotent); a twin that exists
elsewhere (direct, or behind another concentrator) is a conflict, left as it is.
"""

from __future__ import annotations

from typing import Any

import redis
from pydantic import BaseModel, Field, create_model

from metertwin.core.clients import get_redis
from metertwin.core.errors import BackendUnavailable, InvalidInput, NotFound
from metertwin.core.http import Request, Response, Router, json_response
from metertwin.core.settings import get_settings
from metertwin.fleet.topology import TOPOLOGY_FIELDS, topology_store
from metertwin.twin import keys
from metertwin.twin.concentrators import MAX_ASSIGN, Concentrators, check_id
from metertwin.twin.dynsec import get_dynsec
from metertwin.twin.state import twin_store

#: Meters per call (one role rewrite and two pipelines of this many scripts).
MAX_PROVISION = MAX_ASSIGN


def provision_behind(service: Concentrators, concentrator_id: str, meters: list[Any], *, zone: str,
                     actor: str) -> dict[str, Any]:
    """Provision ``meters`` (objects with ``meter_id`` and a registry ``profile``) behind the concentrator."""
    check_id(concentrator_id)
    if len(meters) > MAX_PROVISION:
        raise InvalidInput(f"{len(meters)} meters exceed {MAX_PROVISION} per request", field="meters")
    ids = [m.meter_id for m in meters]
    if len(set(ids)) != len(ids):
        twice = next(m for m in ids if ids.count(m) > 1)
        raise InvalidInput(f"meter id {twice!r} appears twice in the request", field="meters")
    if not service.exists(concentrator_id):
        raise NotFound(f"concentrator {concentrator_id!r} is not provisioned in this zone")
    r = get_redis()
    try:
        pipe = r.pipeline(transaction=False)
        for m in ids:
            pipe.exists(keys.twin(m))
            pipe.hget(keys.twin(m), keys.ROUTE_FIELD)
        found = pipe.execute()
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
    new, existing, conflicts = [], [], []
    for i, m in enumerate(meters):
        there, route = found[2 * i], found[2 * i + 1]
        if not there:
            new.append(m)
        elif route == concentrator_id:
            existing.append(m)
        else:
            where = f"behind concentrator {route!r}" if route else "direct"
            conflicts.append({"meter_id": m.meter_id, "error": f"meter {m.meter_id!r} already has a twin ({where})"})
    ours = new + existing
    if new:
        try:
            r.sadd(keys.concentrator_meters(concentrator_id), *(m.meter_id for m in new))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
        service.sync_relays(concentrator_id)
    profiles = {m.meter_id: m.profile.model_dump(exclude_defaults=True, exclude=set(TOPOLOGY_FIELDS)) for m in ours}
    created = set(twin_store(r).create_many(profiles, zone, concentrator_id))
    raced = {m.meter_id for m in new} - created  # got a twin between the check and the create
    conflicts += [{"meter_id": m, "error": f"meter {m!r} already has a twin"} for m in sorted(raced)]
    fleet_errors = topology_store(r).create_many(
        {m.meter_id: m.profile.changes() for m in ours if m.meter_id not in raced}, actor=actor, zone=zone)
    conflicts += [{"meter_id": m, "error": f"fleet record not written: {e}"} for m, e in fleet_errors.items()]
    return {"concentrator_id": concentrator_id, "created": len(created), "existing": len(existing),
            "conflicts": conflicts}


def register_bulk_route(router: Router, operators: set[str], new_meter: type[BaseModel]) -> None:
    """``POST /concentrators/{concentrator_id}/twins``; ``new_meter`` is the registry's meter model."""
    body_model = create_model("BulkBehind", meters=(list[new_meter], Field(min_length=1,  # type: ignore[valid-type]
                                                                          max_length=MAX_PROVISION)))

    @router.post("/concentrators/{concentrator_id}/twins", scopes=operators)
    def provision(req: Request) -> Response:
        body = req.json(body_model)
        actor = req.principal.subject if req.principal else "anonymous"
        done = provision_behind(Concentrators(get_redis(), get_dynsec()), req.params["concentrator_id"],
                                list(body.meters), zone=get_settings().zone, actor=actor)  # type: ignore[attr-defined]
        return json_response(done, 201 if done["created"] or done["existing"] else 409)
