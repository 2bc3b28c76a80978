"""Twin registry: provision and remove twins, singly and in bulk, with their meters' MQTT accounts.

Routes (after ``/function/<zone>-registry``):

* ``POST /meters`` — provision one twin; returns the meter's MQTT credentials once.
* ``POST /meters/bulk`` — provision up to ``max_bulk_meters`` twins.
* ``GET /meters?cursor=&count=`` — list provisioned meter ids.
* ``GET /meters/{meter_id}`` — the registry record (zone, profile, topology, created).
* ``DELETE /meters/{meter_id}`` — remove the twin and the meter's account (also an orphaned
  account whose twin is gone; 404 only when neither exists).
* ``POST /meters/bulk-delete`` — remove many.
* ``POST /reconcile?fix=false|true`` — twins without accounts and accounts without twins
  (``metertwin.twin.reconcile``); ``fix=true`` repairs both.

A profile may carry the twin's topology (region, substation, feeder, transformer, phase,
location, tariff, customer_class, groups, tags: ``metertwin.fleet.topology``); it is stored as
the twin's fleet record (indexed for search, changed later with ``edge-fleet``), not in the profile.

Provisioning a meter whose twin is gone but whose account remains replaces the account
(new password; the old one stops working).
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from metertwin.core import topics
from metertwin.core.clients import get_redis
from metertwin.core.errors import BackendUnavailable, Conflict, InvalidInput, MeterTwinError, UnknownMeter
from metertwin.core.http import (
    METER_ID_RE,
    Context,
    Event,
    Request,
    Response,
    Router,
    json_response,
    query_bool,
    query_float,
)
from metertwin.core.settings import get_settings
from metertwin.fleet.topology import TOPOLOGY_FIELDS, TopologyFields, public, topology_store
from metertwin.twin import keys
from metertwin.twin.bulk import register_bulk_route
from metertwin.twin.concentrators import Concentrators, register_concentrator_routes
from metertwin.twin.dynsec import get_dynsec, new_password
from metertwin.twin.reconcile import reconcile
from metertwin.twin.state import TwinStore, twin_store

router = Router()
OPERATORS = {"admin", "utility"}
register_concentrator_routes(router, OPERATORS)  # POST /concentrators, PUT /meters/{id}/route, ...


class Profile(TopologyFields):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["household", "prosumer", "commercial"] = "household"
    pv_kwp: float = Field(default=0.0, ge=0, le=1000, allow_inf_nan=False)
    battery_kwh: float = Field(default=0.0, ge=0, le=1000, allow_inf_nan=False)
    tariff_id: str | None = Field(default=None, max_length=64)
    link: Literal["lan", "wifi", "nbiot", "plc", "cellular"] = "wifi"


class NewMeter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meter_id: str
    profile: Profile = Field(default_factory=Profile)

    @field_validator("meter_id")
    @classmethod
    def _meter_id(cls, value: str) -> str:
        if not METER_ID_RE.match(value):
            raise ValueError("must be 1-64 letters, digits or _.:- starting with a letter or digit")
        return value


class BulkNew(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meters: list[NewMeter] = Field(min_length=1)


class BulkDelete(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meter_ids: list[str] = Field(min_length=1)


register_bulk_route(router, OPERATORS, NewMeter)  # POST /concentrators/{id}/twins: many twins, no accounts


def _store() -> TwinStore:
    return twin_store(get_redis())


def _credentials(meter_id: str, password: str) -> dict[str, Any]:
    s = get_settings()
    return {
        "meter_id": meter_id,
        "password": password,
        "mqtt": {"host": s.mqtt_host, "port": s.mqtt_port, "username": meter_id, "client_id": meter_id},
        "topics": {
            "publish": f"{topics.meter_root(meter_id)}/up/#",
            "subscribe": f"{topics.meter_root(meter_id)}/down/#",
        },
    }


def _actor(req: Request) -> str:
    return req.principal.subject if req.principal else "anonymous"


def _drop(meter_ids: list[str]) -> list[str]:
    """Delete twins, then their fleet records; returns the ids that had a twin."""
    store = _store()
    removed = [m for m in meter_ids if store.delete(m)]
    topology_store(get_redis()).remove(meter_ids, actor="registry")
    return removed


def _provision(meters: list[NewMeter], actor: str) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Create twins, then accounts; a twin whose account fails is rolled back."""
    limit = get_settings().max_bulk_meters
    if len(meters) > limit:
        raise InvalidInput(f"{len(meters)} meters exceed the bulk limit of {limit}", field="meters")
    seen: set[str] = set()
    for m in meters:
        if m.meter_id in seen:
            raise InvalidInput(f"meter id {m.meter_id!r} appears twice in the request", field="meters")
        seen.add(m.meter_id)
    store, zone = _store(), get_settings().zone
    created: list[NewMeter] = []
    conflicts: list[dict[str, str]] = []
    for m in meters:
        profile = m.profile.model_dump(exclude_defaults=True, exclude=set(TOPOLOGY_FIELDS))
        if not store.create(m.meter_id, zone, profile):
            conflicts.append({"meter_id": m.meter_id, "error": f"meter {m.meter_id!r} already has a twin"})
            continue
        try:  # the fleet record (topology and search indexes), even when the profile names no topology
            topology_store(get_redis()).patch(m.meter_id, m.profile.changes(), actor=actor, zone=zone)
        except MeterTwinError as exc:
            store.delete(m.meter_id)
            if isinstance(exc, BackendUnavailable):
                raise
            conflicts.append({"meter_id": m.meter_id, "error": exc.message})
            continue
        created.append(m)
    passwords = {m.meter_id: new_password() for m in created}
    try:
        errors = get_dynsec().create_meters(passwords) if passwords else {}
    except BackendUnavailable:
        _drop(list(passwords))
        raise
    out = []
    for meter_id, password in passwords.items():
        if errors.get(meter_id):
            _drop([meter_id])
            conflicts.append({"meter_id": meter_id, "error": f"MQTT account not created: {errors[meter_id]}"})
        else:
            out.append(_credentials(meter_id, password))
    return out, conflicts


@router.post("/meters", scopes=OPERATORS)
def provision_one(req: Request) -> Response:
    body = req.json(NewMeter)
    created, conflicts = _provision([body], _actor(req))
    if conflicts:
        raise Conflict(conflicts[0]["error"], meter_id=body.meter_id)
    return json_response({**created[0], "zone": get_settings().zone}, 201)


@router.post("/meters/bulk", scopes={"admin"})
def provision_bulk(req: Request) -> Response:
    body = req.json(BulkNew)
    created, conflicts = _provision(body.meters, _actor(req))
    return json_response(
        {"zone": get_settings().zone, "created": len(created), "meters": created, "conflicts": conflicts},
        201 if created else 409,
    )


@router.get("/meters", scopes=OPERATORS | {"billing"})  # billing apps find their meters (read-only)
def list_meters(req: Request) -> Response:
    cursor = int(query_float(req.query, "cursor", 0, lo=0, hi=2**63))
    count = int(query_float(req.query, "count", 100, lo=1, hi=1000))
    try:
        next_cursor, ids = get_redis().sscan(keys.TWIN_INDEX, cursor=cursor, count=count)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable: {exc}") from exc
    return json_response({"meters": sorted(ids), "next_cursor": next_cursor or None})


@router.get("/meters/{meter_id}", scopes=OPERATORS)
def get_meter(req: Request) -> Response:
    twin = _store().get(req.params["meter_id"])
    return json_response(
        {"meter_id": twin.meter_id, "zone": twin.zone, "profile": twin.profile, "created_at": twin.created_at,
         "topology": public(topology_store(get_redis()).get(twin.meter_id))}
    )


def _remove(meter_ids: list[str]) -> list[str]:
    """Remove twins and accounts; returns the ids that had a twin or an (orphaned) account."""
    Concentrators(get_redis(), get_dynsec()).forget(meter_ids)  # off their concentrators first
    removed = set(_drop(meter_ids))
    accounts = get_dynsec().delete_meters(meter_ids)
    return [m for m in meter_ids if m in removed or accounts.get(m)]


@router.delete("/meters/{meter_id}", scopes={"admin"})
def remove_one(req: Request) -> Response:
    meter_id = req.params["meter_id"]
    if not _remove([meter_id]):
        raise UnknownMeter(f"meter {meter_id!r} has no twin and no account in this zone", meter_id=meter_id)
    return json_response({"meter_id": meter_id, "removed": True})


@router.post("/meters/bulk-delete", scopes={"admin"})
def remove_bulk(req: Request) -> Response:
    body = req.json(BulkDelete)
    for meter_id in body.meter_ids:
        if not METER_ID_RE.match(meter_id):
            raise InvalidInput(f"meter id {meter_id!r} is not valid", field="meter_ids")
    removed = _remove(body.meter_ids)
    return json_response({"removed": removed, "not_found": sorted(set(body.meter_ids) - set(removed))})


@router.post("/reconcile", scopes={"admin"})
def reconcile_accounts(req: Request) -> Response:
    report = reconcile(get_redis(), get_dynsec(), fix=query_bool(req.query, "fix"))
    return json_response({"zone": get_settings().zone, **report.as_dict()})


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
