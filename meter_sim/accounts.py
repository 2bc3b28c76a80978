"""Meter accounts for tests and benchmarks: bulk dynamic-security provisioning over MQTT.

Each meter gets a role ``meter-<id>`` whose ACLs name its own topics literally
(Mosquitto 2.0.11's dynamic security does not substitute ``%u``) and a client
``<id>`` holding that role. Commands are sent as JSON batches
``{"commands": [...]}`` to ``$CONTROL/dynamic-security/v1`` with an account that
may administer the plugin (the twin-service account), and the answers are read
from ``$CONTROL/dynamic-security/v1/response`` — much faster than one
``mosquitto_ctrl`` process per command. The production registry
(``metertwin.twin.dynsec``) does the same.

Credentials files are JSON ``{"meters": [{"meter_id": "...", "password": "..."}]}``,
the shape the twin registry's bulk provisioning returns.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiomqtt

from metertwin.twin.dynsec import BATCH, CONTROL_TOPIC, RESPONSE_TOPIC, meter_acls, role_name

# One definition of the meter's account, shared with the twin registry (metertwin.twin.dynsec).
# Mosquitto 2.0 rewrites its whole JSON config after each command, so a batch of BATCH
# commands takes a while on a large config: size timeouts accordingly.


class ProvisioningError(RuntimeError):
    """The broker refused or did not answer a dynamic-security command."""


def new_meter_ids(count: int, prefix: str = "sim") -> list[str]:
    """``count`` fresh meter ids ``<prefix>-<run>-<n>`` (unique per call)."""
    run = uuid.uuid4().hex[:6]
    return [f"{prefix}-{run}-{n:05d}" for n in range(count)]


def create_commands(credentials: dict[str, str]) -> list[dict[str, Any]]:
    commands: list[dict[str, Any]] = []
    for meter_id, password in credentials.items():
        commands.append({"command": "createRole", "rolename": role_name(meter_id), "acls": meter_acls(meter_id)})
        commands.append({
            "command": "createClient", "username": meter_id, "password": password,
            "roles": [{"rolename": role_name(meter_id)}],
        })
    return commands


def delete_commands(meter_ids: Iterable[str]) -> list[dict[str, Any]]:
    commands: list[dict[str, Any]] = []
    for meter_id in meter_ids:
        commands.append({"command": "deleteClient", "username": meter_id})
        commands.append({"command": "deleteRole", "rolename": role_name(meter_id)})
    return commands


async def run_dynsec(
    host: str,
    port: int,
    username: str,
    password: str,
    commands: Sequence[dict[str, Any]],
    *,
    batch: int = BATCH,
    timeout_s: float = 60.0,
    ignore_errors: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Run dynamic-security ``commands`` in batches; return one response per command.

    Raises :class:`ProvisioningError` naming the first failed command unless its
    error text is in ``ignore_errors`` (e.g. ``"Role already exists"``).
    """
    ignored = set(ignore_errors)
    results: list[dict[str, Any]] = []
    client_id = f"meter-sim-accounts-{secrets.token_hex(4)}"
    async with aiomqtt.Client(
        host, port, username=username, password=password, identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5, timeout=timeout_s,
    ) as client:
        await client.subscribe(RESPONSE_TOPIC, qos=1)
        for start in range(0, len(commands), batch):
            chunk = [dict(cmd) for cmd in commands[start : start + batch]]
            tag = secrets.token_hex(4)
            for i, cmd in enumerate(chunk):
                cmd["correlationData"] = f"{tag}:{i}"
            await client.publish(CONTROL_TOPIC, json.dumps({"commands": chunk}).encode(), qos=1)
            answers: dict[int, dict[str, Any]] = {}
            try:
                async with asyncio.timeout(timeout_s):
                    async for msg in client.messages:
                        for resp in _responses(msg.payload):
                            corr = str(resp.get("correlationData", ""))
                            if corr.startswith(tag + ":"):
                                answers[int(corr.split(":", 1)[1])] = resp
                        if len(answers) == len(chunk):
                            break
            except TimeoutError:
                raise ProvisioningError(
                    f"dynamic security answered {len(answers)} of {len(chunk)} commands within {timeout_s} s"
                ) from None
            for i, cmd in enumerate(chunk):
                resp = answers[i]
                err = resp.get("error")
                if err and err not in ignored:
                    target = cmd.get("username") or cmd.get("rolename")
                    raise ProvisioningError(f"dynsec {cmd['command']} {target!r} failed: {err}")
                results.append(resp)
    return results


def _responses(payload: Any) -> list[dict[str, Any]]:
    try:
        data = json.loads(payload)
        responses = data["responses"]
    except (ValueError, TypeError, KeyError):
        return []
    return [r for r in responses if isinstance(r, dict)] if isinstance(responses, list) else []


async def create_meter_accounts(
    host: str, port: int, admin_user: str, admin_password: str, meter_ids: Iterable[str], **kw: Any
) -> dict[str, str]:
    """Create an account per meter id with a fresh password; return ``{meter_id: password}``."""
    credentials = {meter_id: secrets.token_urlsafe(12) for meter_id in meter_ids}
    await run_dynsec(host, port, admin_user, admin_password, create_commands(credentials), **kw)
    return credentials


async def delete_meter_accounts(
    host: str, port: int, admin_user: str, admin_password: str, meter_ids: Iterable[str], **kw: Any
) -> None:
    """Delete meters' clients and roles; missing ones are not an error."""
    await run_dynsec(
        host, port, admin_user, admin_password, delete_commands(meter_ids),
        ignore_errors=("Client not found", "Role not found"), **kw,
    )


def provision(
    host: str, port: int, admin_user: str, admin_password: str, meter_ids: Iterable[str], **kw: Any
) -> dict[str, str]:
    """Synchronous :func:`create_meter_accounts` (runs its own event loop)."""
    return asyncio.run(create_meter_accounts(host, port, admin_user, admin_password, list(meter_ids), **kw))


def deprovision(
    host: str, port: int, admin_user: str, admin_password: str, meter_ids: Iterable[str], **kw: Any
) -> None:
    """Synchronous :func:`delete_meter_accounts`."""
    asyncio.run(delete_meter_accounts(host, port, admin_user, admin_password, list(meter_ids), **kw))


def save_credentials(path: str | Path, credentials: dict[str, str]) -> None:
    """Write ``{"meters": [{"meter_id", "password"}]}`` readable only by the owner."""
    body = {"meters": [{"meter_id": m, "password": p} for m, p in credentials.items()]}
    target = Path(path)
    target.write_text(json.dumps(body, indent=1))
    target.chmod(0o600)


def load_credentials(path: str | Path) -> dict[str, str]:
    """Read a credentials file; raise ``ValueError`` naming what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"credentials file {str(path)!r} is unreadable: {exc}") from exc
    meters = data.get("meters") if isinstance(data, dict) else None
    if not isinstance(meters, list):
        raise ValueError(f"credentials file {str(path)!r} has no 'meters' list")
    out: dict[str, str] = {}
    for i, entry in enumerate(meters):
        if not (isinstance(entry, dict) and isinstance(entry.get("meter_id"), str)
                and isinstance(entry.get("password"), str) and entry["meter_id"]):
            raise ValueError(f"credentials file {str(path)!r}: meters[{i}] needs string meter_id and password")
        out[entry["meter_id"]] = entry["password"]
    return out
