"""Running a job's action on one twin, and reading back the outcome of the ones still in progress.

An action either finishes at once (``topology``, ``dr_preferences``: succeeded, failed or
rejected) or sends a command (``command``, ``desired``) through :mod:`metertwin.twin.commands`
— the same path as ``edge-write`` — and stays in progress until ``edge-write`` records the
meter's ack on that command (``acknowledged`` -> succeeded, ``rejected`` -> rejected, ``expired``
-> timed_out). Every command a job sends carries the actor ``job:<id>``: after a runner crash
between sending and recording the command id, the command is found again by its actor, so the
twin is never sent a second one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from metertwin.core.clients import StrRedis
from metertwin.core.errors import BackendUnavailable, Conflict, InvalidInput, MeterTwinError, NotFound, VersionMismatch
from metertwin.dr.decisions import Preferences
from metertwin.dr.schedule import opt_out_events
from metertwin.dr.store import DrStore
from metertwin.fleet.topology import topology_store
from metertwin.twin import keys as twin_keys
from metertwin.twin.commands import get_commands
from metertwin.twin.state import twin_store

#: Actions whose outcome is a command's status (the meter's ack).
COMMANDING = ("command", "desired")


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # succeeded, failed, rejected, or in_progress (a command was sent: ``ref`` is its id)
    reason: str = ""
    ref: str = ""


def actor(job_id: str) -> str:
    return f"job:{job_id}"


def run(client: StrRedis, action: dict[str, Any], job_id: str, meter_id: str, timeout_s: int) -> Outcome:
    """Do ``action`` on one twin. Never raises a :class:`MeterTwinError`: it is the outcome."""
    who = actor(job_id)
    try:
        kind = action["type"]
        if kind == "command":
            cmd = get_commands().submit(meter_id, action["kind"], action["params"], expiry_s=timeout_s, actor=who)
            return Outcome("in_progress", ref=cmd["id"])
        if kind == "desired":
            twin_store(client).set_desired(meter_id, action["fields"])
            cmd = get_commands().submit(meter_id, "desired", {"fields": action["fields"]}, expiry_s=timeout_s,
                                        actor=who)
            return Outcome("in_progress", ref=cmd["id"])
        if kind == "topology":
            doc = topology_store(client).patch(meter_id, action["patch"], actor=who)
            return Outcome("succeeded", f"topology version {doc.get('v') if doc else 0}")
        if kind == "dr_preferences":
            if not twin_store(client).exists(meter_id):
                raise NotFound(f"meter {meter_id!r} has no twin in this zone")
            store = DrStore(client)
            prefs = Preferences.model_validate(action["preferences"])
            store.set_preferences(meter_id, prefs)
            stopped = opt_out_events(store, meter_id) if prefs.opt_out else []
            return Outcome("succeeded", f"preferences set; {len(stopped)} events opted out" if stopped else "")
        return Outcome("failed", f"action type {kind!r} is not run per twin")
    except MeterTwinError as exc:
        return _failure(exc)


def _failure(exc: MeterTwinError) -> Outcome:
    if isinstance(exc, (InvalidInput, VersionMismatch, Conflict)):
        return Outcome("rejected", exc.message)
    return Outcome("failed", exc.message)  # NotFound, BackendUnavailable, ...


#: Runs a one-twin function over twins (the runner's thread pool) and returns the outcomes in order.
Each = Callable[[Callable[[str], Outcome], list[str]], list[Outcome]]


def run_many(client: StrRedis, action: dict[str, Any], job_id: str, meter_ids: list[str], timeout_s: int,
             each: Each) -> list[Outcome]:
    """Do ``action`` on every twin of ``meter_ids`` (outcomes in order; never raises a :class:`MeterTwinError`).

    A command goes to all of them in one batch (:meth:`CommandService.submit_many`: a few round
    trips and one PUBACK window for the lot, not ten round trips and a PUBACK wait per twin);
    other actions run per twin through ``each``."""
    kind = action["type"]
    if kind not in COMMANDING:
        return each(lambda m: run(client, action, job_id, m, timeout_s), meter_ids)
    outcomes: list[Outcome | None] = [None] * len(meter_ids)
    if kind == "desired":
        for i, o in enumerate(each(lambda m: _set_desired(client, action["fields"], m), meter_ids)):
            if o.status != "in_progress":
                outcomes[i] = o
        ckind, params = "desired", {"fields": action["fields"]}
    else:
        ckind, params = action["kind"], action["params"]
    todo = [i for i, o in enumerate(outcomes) if o is None]
    try:
        sent = get_commands().submit_many([meter_ids[i] for i in todo], ckind, params, expiry_s=timeout_s,
                                          actor=actor(job_id))
    except MeterTwinError as exc:
        sent = [exc] * len(todo)
    for i, got in zip(todo, sent, strict=True):
        outcomes[i] = Outcome("in_progress", ref=got) if isinstance(got, str) else _failure(got)
    return [o for o in outcomes if o is not None]


def _set_desired(client: StrRedis, fields: dict[str, Any], meter_id: str) -> Outcome:
    """The twin's desired settings (before its command); ``in_progress`` when set."""
    try:
        twin_store(client).set_desired(meter_id, fields)
    except MeterTwinError as exc:
        return _failure(exc)
    return Outcome("in_progress")


def command_outcomes(client: StrRedis, job_id: str, pending: list[tuple[str, str | None]], now: float,
                     deadlines: dict[str, float]) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """For in-progress twins ``(meter, command id or None)``: the finished ``(meter, status, reason)``
    and the ``(meter, command id)`` found again by the job's actor after a crash."""
    finished: list[tuple[str, str, str]] = []
    found: list[tuple[str, str]] = []
    pipe = client.pipeline(transaction=False)
    for meter_id, cid in pending:
        if cid:
            pipe.hmget(twin_keys.command(meter_id, cid), ("status", "reason"))
        else:
            pipe.zrevrange(twin_keys.command_log(meter_id), 0, 9)
    try:
        replies = pipe.execute()
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis unavailable reading job commands: {exc}") from exc
    for (meter_id, cid), reply in zip(pending, replies, strict=True):
        if not cid:
            cid = _by_actor(client, job_id, meter_id, list(reply))
            if cid:
                found.append((meter_id, cid))
                continue
            if now >= deadlines.get(meter_id, now):
                finished.append((meter_id, "timed_out", "the runner stopped before this twin's command was sent; "
                                 "not sent again (a twin never runs twice)"))
            continue
        status, reason = reply
        if status == "acknowledged":
            finished.append((meter_id, "succeeded", ""))
        elif status == "rejected":
            finished.append((meter_id, "rejected", f"the meter rejected command {cid}: {reason or 'no reason'}"))
        elif status == "expired" or (status is None and now >= deadlines.get(meter_id, now)):
            finished.append((meter_id, "timed_out", f"command {cid}: no ack before it expired"))
        elif now >= deadlines.get(meter_id, now):
            finished.append((meter_id, "timed_out", f"command {cid} still {status} after the job's timeout_s"))
    return finished, found


def _by_actor(client: StrRedis, job_id: str, meter_id: str, recent: list[str]) -> str | None:
    who = actor(job_id)
    for cid in recent:
        try:
            if client.hget(twin_keys.command(meter_id, cid), "actor") == who:
                return cid
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis unavailable reading job commands: {exc}") from exc
    return None
