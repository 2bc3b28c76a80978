"""Shared helpers of the fleet tests: tokens and provisioning through the registry."""

from __future__ import annotations

from typing import Any

from metertwin.core.auth import issue_token
from tests.conftest import TEST_SIGNING_KEY
from tests.invoke import call, load_handler

registry = load_handler("registry")
fleet = load_handler("fleet")


def token(*scopes: str, meter: str | None = None) -> str:
    return issue_token("tester", set(scopes), meter=meter, key=TEST_SIGNING_KEY)


def provision(meters: list[dict[str, Any]]) -> dict[str, Any]:
    """Provision ``[{meter_id, profile}]`` with the bulk route; every one must be created."""
    status, body = call(registry, "POST", "/meters/bulk", body={"meters": meters}, token=token("admin"))
    assert status == 201, body
    assert not body["conflicts"], body
    return dict(body)


def search(token_: str | None = None, **query: Any) -> tuple[int, Any]:
    return call(fleet, "GET", "/meters", token=token_ or token("utility"),
                query={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in query.items()})
