"""Issue 10, item 11: every route of every function is in its zone's /openapi.json, and the document validates.

Built from the repository's stack.yml, one zone at a time, as the gateway serves it; the
405 of a function's router carries an ``Allow`` header.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from gateway.app import GatewayApp, create_app
from gateway.openapi import ERRORS, route_template
from metertwin.core.http import METER_ID_RE, Router
from metertwin.core.settings import reset_settings
from tests.fixtures.gateway_support import saved_environ

ROOT = Path(__file__).resolve().parents[2]
ZONES = ("edge", "fog", "cloud")


@pytest.fixture(scope="module")
def zone_apps() -> Iterator[dict[str, GatewayApp]]:
    # Loading handlers connects to nothing: no services needed to build the documents.
    with saved_environ():
        apps = {zone: create_app(ROOT / "stack.yml", zone) for zone in ZONES}
        yield apps
    reset_settings()


def _routes(app: GatewayApp) -> Iterator[tuple[str, str, str, Any]]:
    for name, fn in app.functions.items():
        router = fn.module.router
        assert isinstance(router, Router), name
        for route in router._routes:
            yield name, route.method.lower(), route_template(route.regex.pattern), route


@pytest.mark.parametrize("zone", ZONES)
def test_zone_document_validates_and_declares_every_route(zone_apps: dict[str, GatewayApp], zone: str) -> None:
    app = zone_apps[zone]
    doc = app.api.openapi()
    validate(doc)
    paths = doc["paths"]
    count = 0
    for name, method, template, route in _routes(app):
        full = f"/function/{name}{template.rstrip('/') if template != '/' else ''}"
        assert full in paths, f"{full} is not documented"
        assert method in paths[full], f"{method.upper()} {full} is not documented"
        op = paths[full][method]
        declared = {p["name"]: p for p in op.get("parameters", []) if p["in"] == "path"}
        assert set(declared) == set(re.findall(r"\{(\w+)\}", template)), (full, method)
        if "meter_id" in declared:
            assert declared["meter_id"]["schema"]["pattern"] == METER_ID_RE.pattern, full
            assert declared["meter_id"]["required"] is True
        if method in ("post", "put", "patch"):
            # A JSON body, or the media type the route takes instead (CSV import).
            assert {"application/json", "text/csv"} & set(op["requestBody"]["content"]), (full, method)
        for code in ERRORS:
            assert code in op["responses"], (full, method, code)
        if route.scopes is not None:
            assert op["security"] == [{"bearerAuth": []}], full
        count += 1
    assert count >= {"edge": 60, "fog": 15, "cloud": 3}[zone]
    errors = doc["components"]["schemas"]["Error"]
    assert errors["required"] == ["error", "message"]


def test_edge_document_has_registry_write_and_forward(zone_apps: dict[str, GatewayApp]) -> None:
    paths = zone_apps["edge"].api.openapi()["paths"]
    assert "post" in paths["/function/edge-registry/meters"]
    assert "patch" in paths["/function/edge-write/meters/{meter_id}/desired"]
    route = paths["/function/edge-forward/meters/{meter_id}/ems/route"]["put"]
    body = route["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["kind"]["enum"] == ["mqtt", "webhook"]
    read = paths["/function/edge-read/meters/{meter_id}/reading"]["get"]
    assert {p["name"] for p in read["parameters"]} >= {"meter_id", "max_age", "live", "timeout"}


async def test_function_405_carries_allow(zone_apps: dict[str, GatewayApp]) -> None:
    app = zone_apps["edge"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        resp = await client.delete("/function/edge-forward/meters/m-1/ems/messages")
    assert resp.status_code == 405
    assert resp.headers["allow"] == "GET, POST"
    assert resp.json()["details"]["allowed"] == ["GET", "POST"]
