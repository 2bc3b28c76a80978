"""Per-meter MQTT accounts in Mosquitto's dynamic-security plugin.

Each meter gets a client (username = meter id) and a role of its own whose ACLs
confine it to ``meters/<id>/`` (Mosquitto 2.0's dynsec does not substitute ``%u``
in ACLs, so the role names the topics literally). Commands go to
``$CONTROL/dynamic-security/v1`` in batches; each carries ``correlationData`` so
that concurrent registry workers each find their own answers.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterable
from typing import Any

from metertwin.core import topics
from metertwin.core.errors import BackendUnavailable
from metertwin.core.mqtt import TwinMqtt

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
#: Commands per MQTT message: keeps a bulk provisioning of 10,000 meters to a few hundred messages.
BATCH = 200
#: Extra wait per command. Mosquitto 2.0's plugin rewrites its whole JSON file after every
#: command, so each one gets slower as accounts accumulate (measured: 1,000 accounts in 10 s,
#: the next 2,000 in 70 s); a fixed timeout per batch would fail past a few thousand meters.
PER_COMMAND_TIMEOUT_S = 0.25
#: Extra wait for a role rewrite (:meth:`DynSec.set_relays`): the plugin then saves its whole file,
#: ~120 bytes per relayed meter (measured ~0.02 s per MB here; 1,000,000 relays ~120 MB).
ROLE_REWRITE_TIMEOUT_S = 60.0
#: The plugin's answer to createClient for a username it already has.
CLIENT_EXISTS = "Client already exists"
#: Names per listClients/listRoles page.
LIST_PAGE = 1000


def role_name(meter_id: str) -> str:
    return f"meter-{meter_id}"


def meter_acls(meter_id: str) -> list[dict[str, Any]]:
    up = f"{topics.meter_root(meter_id)}/up/#"
    down = f"{topics.meter_root(meter_id)}/down/#"
    return [
        {"acltype": "publishClientSend", "topic": up, "allow": True},
        {"acltype": "subscribePattern", "topic": down, "allow": True},
        {"acltype": "unsubscribePattern", "topic": down, "allow": True},
        {"acltype": "publishClientReceive", "topic": down, "allow": True},
    ]


def concentrator_username(concentrator_id: str) -> str:
    """The MQTT username of a concentrator: ``dcu/<id>`` (a ``/`` is in no meter id: no clash)."""
    return f"{topics.CONCENTRATOR_ROOT}/{concentrator_id}"


def concentrator_role(concentrator_id: str) -> str:
    return f"dcu-{concentrator_id}"


def concentrator_acls(concentrator_id: str) -> list[dict[str, Any]]:
    """The concentrator's own subtree: publish on ``dcu/<id>/up/#``, receive ``dcu/<id>/down/#``."""
    up = f"{topics.concentrator_root(concentrator_id)}/up/#"
    down = f"{topics.concentrator_root(concentrator_id)}/down/#"
    return [
        {"acltype": "publishClientSend", "topic": up, "allow": True},
        {"acltype": "subscribePattern", "topic": down, "allow": True},
        {"acltype": "unsubscribePattern", "topic": down, "allow": True},
        {"acltype": "publishClientReceive", "topic": down, "allow": True},
    ]


def relay_acl(meter_id: str) -> dict[str, Any]:
    """What a concentrator may do for one assigned meter: publish on its ``up`` topics (acks, read
    answers, status, single readings). Its downlink comes through the concentrator's own topics."""
    return {"acltype": "publishClientSend", "topic": f"{topics.meter_root(meter_id)}/up/#", "allow": True}


def new_password() -> str:
    return secrets.token_urlsafe(18)


class DynSec:
    """Administer meter accounts through the twin services' MQTT session."""

    def __init__(self, mqtt: TwinMqtt, *, timeout_s: float = 5.0) -> None:
        self._mqtt = mqtt
        self.mqtt = mqtt
        self._timeout_s = timeout_s
        self._waiting: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        mqtt.listen(RESPONSE_TOPIC, self._on_response)

    def create_meters(self, accounts: dict[str, str]) -> dict[str, str | None]:
        """Create accounts ``{meter_id: password}``; returns ``{meter_id: error or None}``.

        Call it only for meters that have just been given a twin: an account that already
        exists then belongs to no twin (an orphan, e.g. after the zone's Redis lost its
        data) and is replaced, so its old password stops working and its sessions are
        disconnected (``deleteClient`` kicks them).
        """
        results = self._create(accounts)
        orphans = {m: accounts[m] for m, err in results.items() if err == CLIENT_EXISTS}
        if orphans:
            self.delete_meters(orphans)
            results.update(self._create(orphans))
        return results

    def _create(self, accounts: dict[str, str]) -> dict[str, str | None]:
        commands: list[dict[str, Any]] = []
        for meter_id, password in accounts.items():
            commands += [
                {"command": "createRole", "rolename": role_name(meter_id), "acls": meter_acls(meter_id)},
                {"command": "createClient", "username": meter_id, "password": password,
                 "clientid": meter_id, "roles": [{"rolename": role_name(meter_id)}]},
            ]
        results = self._run(commands)
        out: dict[str, str | None] = {}
        for cmd, res in zip(commands, results, strict=True):
            meter_id = cmd.get("username") or cmd["rolename"].removeprefix("meter-")
            err = res.get("error")
            # A role left over from an earlier, interrupted provisioning is fine to reuse.
            if err and not (cmd["command"] == "createRole" and err == "Role already exists"):
                out[meter_id] = out.get(meter_id) or err
            else:
                out.setdefault(meter_id, None)
        return out

    def delete_meters(self, meter_ids: Iterable[str]) -> dict[str, bool]:
        """Remove accounts and roles; missing ones are ignored (idempotent).

        Returns ``{meter_id: True if an account or a role existed and was removed}``.
        """
        ids = list(meter_ids)
        commands: list[dict[str, Any]] = []
        for meter_id in ids:
            commands += [
                {"command": "deleteClient", "username": meter_id},
                {"command": "deleteRole", "rolename": role_name(meter_id)},
            ]
        results = self._run(commands)
        return {m: not results[2 * i].get("error") or not results[2 * i + 1].get("error")
                for i, m in enumerate(ids)}

    def create_concentrator(self, concentrator_id: str, password: str) -> str | None:
        """Create (or replace, with a new password) a concentrator's account and role; error or None.

        The role starts with the concentrator's own topics only; :meth:`relay` adds its meters.
        """
        role, user = concentrator_role(concentrator_id), concentrator_username(concentrator_id)
        self._run([{"command": "deleteClient", "username": user}])
        res = self._run([
            {"command": "createRole", "rolename": role, "acls": concentrator_acls(concentrator_id)},
            {"command": "createClient", "username": user, "password": password, "roles": [{"rolename": role}]},
        ])
        errors = [r["error"] for r in res if r.get("error") and r["error"] != "Role already exists"]
        return errors[0] if errors else None

    def delete_concentrator(self, concentrator_id: str) -> None:
        self._run([{"command": "deleteClient", "username": concentrator_username(concentrator_id)},
                   {"command": "deleteRole", "rolename": concentrator_role(concentrator_id)}])

    def relay(self, concentrator_id: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> dict[str, str]:
        """Let the concentrator publish for ``add``'s meters and no longer for ``remove``'s (batched).

        Returns ``{meter_id: error}`` for commands that failed (an ACL already there, or already
        gone, is no failure: moves are retried).
        """
        role = concentrator_role(concentrator_id)
        commands: list[dict[str, Any]] = [{"command": "addRoleACL", "rolename": role, **relay_acl(m)} for m in add]
        commands += [{"command": "removeRoleACL", "rolename": role, "acltype": "publishClientSend",
                      "topic": relay_acl(m)["topic"]} for m in remove]
        failed: dict[str, str] = {}
        for cmd, res in zip(commands, self._run(commands), strict=True):
            err = str(res.get("error") or "")
            if err and "already" not in err.lower() and "not found" not in err.lower():
                failed[cmd["topic"].split("/")[1]] = err
        return failed

    def set_relays(self, concentrator_id: str, meter_ids: Iterable[str]) -> str | None:
        """Make ``meter_ids`` the whole relay list of the concentrator's role in one command; error or None.

        ``modifyRole`` with ``acls`` replaces the role's list, so the broker rewrites its JSON file
        once, not once per meter as :meth:`relay`'s commands do (Mosquitto 2.0: 10,000 ``addRoleACL``
        take ~90 s and grow quadratically; one ``modifyRole`` of 5,000 ACLs ~0.1 s). Callers pass
        the full list (:meth:`metertwin.twin.concentrators.Concentrators.sync_relays`).
        """
        acls = concentrator_acls(concentrator_id) + [relay_acl(m) for m in sorted(meter_ids)]
        res = self._run([{"command": "modifyRole", "rolename": concentrator_role(concentrator_id), "acls": acls}],
                        timeout_s=ROLE_REWRITE_TIMEOUT_S)[0]
        return str(res["error"]) if res.get("error") else None

    def meter_accounts(self) -> set[str]:
        """Meter ids that have an account in the broker, known by their own role (``meter-<id>``).

        The role tells a meter's account from the platform's own (service, admin) accounts;
        a role left without its client by an interrupted provisioning counts too.
        """
        return {r.removeprefix("meter-") for r in self._list("listRoles", "roles") if r.startswith("meter-")}

    def _list(self, command: str, field: str) -> list[str]:
        names: list[str] = []
        while True:
            res = self._run([{"command": command, "verbose": False, "count": LIST_PAGE, "offset": len(names)}])[0]
            if res.get("error"):
                raise BackendUnavailable(f"dynamic security {command} failed: {res['error']}")
            page = [str(x) for x in (res.get("data") or {}).get(field, [])]
            names += page
            if len(page) < LIST_PAGE:
                return names

    def _run(self, commands: list[dict[str, Any]], timeout_s: float = 0.0) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        for start in range(0, len(commands), BATCH):
            results += self._send(commands[start : start + BATCH], timeout_s)
        return results

    def _send(self, batch: list[dict[str, Any]], extra_timeout_s: float = 0.0) -> list[dict[str, Any]]:
        tag = secrets.token_hex(6)
        for i, cmd in enumerate(batch):
            cmd["correlationData"] = f"{tag}:{i}"
        done = threading.Event()
        answers: list[dict[str, Any]] = []
        with self._lock:
            self._waiting[tag] = (done, answers)
        try:
            # The PUBACK waits too while the broker saves its file for an earlier command.
            self._mqtt.publish(CONTROL_TOPIC, {"commands": batch}, timeout_s=self._timeout_s + extra_timeout_s)
            timeout_s = self._timeout_s + PER_COMMAND_TIMEOUT_S * len(batch) + extra_timeout_s
            if not done.wait(timeout_s):
                raise BackendUnavailable(
                    f"MQTT broker's dynamic-security plugin did not answer {len(batch)} commands "
                    f"within {timeout_s:.0f} s"
                )
        finally:
            with self._lock:
                self._waiting.pop(tag, None)
        by_index = {int(a["correlationData"].split(":")[1]): a for a in answers}
        return [by_index.get(i, {"error": "no answer"}) for i in range(len(batch))]

    def _on_response(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            responses = json.loads(msg.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            return
        tags = {str(r.get("correlationData", "")).split(":")[0] for r in responses}
        for tag in tags:
            with self._lock:
                entry = self._waiting.get(tag)
            if entry is None:
                continue
            done, answers = entry
            answers.extend(r for r in responses if str(r.get("correlationData", "")).startswith(tag + ":"))
            done.set()


_dynsec: DynSec | None = None
_dynsec_lock = threading.Lock()


def get_dynsec() -> DynSec:
    """The process's :class:`DynSec`, bound to the process's MQTT session.

    Built under a lock: two handler threads building one each at once would each replace the
    other's response listener, and the loser's commands would wait for answers it never gets.
    """
    global _dynsec
    from metertwin.core.clients import get_mqtt

    mqtt = get_mqtt()
    with _dynsec_lock:
        if _dynsec is None or _dynsec.mqtt is not mqtt:
            _dynsec = DynSec(mqtt)
        return _dynsec
