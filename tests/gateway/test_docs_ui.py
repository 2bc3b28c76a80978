"""Issue 17 item 3: each zone's ``/docs`` works offline and covers the zone, with a bearer scheme.

The page names no other host (its assets come from the pinned ``swagger-ui-dist`` the gateway
serves), every asset it references answers 200, its CSP allows only the gateway's origin, and the
document it loads declares ``bearerAuth`` on every function route that checks scopes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.app import GatewayApp, create_app
from gateway.docs_ui import ASSETS, DIST
from metertwin.core.settings import reset_settings
from tests.fixtures.gateway_support import saved_environ

ROOT = Path(__file__).resolve().parents[2]
ZONES = ("edge", "fog", "cloud")
pytestmark = pytest.mark.skipif(not (DIST / "swagger-ui-bundle.js").is_file(),
                                reason="make setup installs swagger-ui-dist (npm ci in gateway/swagger-ui)")


@pytest.fixture(scope="module")
def zone_apps() -> Iterator[dict[str, GatewayApp]]:
    with saved_environ():  # loading handlers connects to nothing
        yield {zone: create_app(ROOT / "stack.yml", zone) for zone in ZONES}
    reset_settings()


def _client(app: GatewayApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app.api), base_url="http://gw")


@pytest.mark.parametrize("zone", ZONES)
async def test_docs_page_is_offline_and_its_assets_answer(zone_apps: dict[str, GatewayApp], zone: str) -> None:
    async with _client(zone_apps[zone]) as client:
        page = await client.get("/docs")
        assert page.status_code == 200
        html = page.text
        assert not re.search(r"(https?:)?//[a-z0-9.-]+", html.replace("http://gw", "")), "an external host"
        assert "default-src 'self'" in page.headers["content-security-policy"]
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert len(refs) >= 3, refs
        for ref in [*refs, "/openapi.json"]:
            answer = await client.get(ref)
            assert answer.status_code == 200, ref
        assert (await client.get("/docs-assets/package.json")).status_code == 404
        assert (await client.get("/redoc")).status_code == 404  # ReDoc would load from a CDN


@pytest.mark.parametrize("zone", ZONES)
async def test_document_declares_bearer_auth_for_function_routes(
        zone_apps: dict[str, GatewayApp], zone: str) -> None:
    async with _client(zone_apps[zone]) as client:
        doc = (await client.get("/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    secured = [op for path, item in doc["paths"].items() if path.startswith("/function/") and path.count("/") > 2
               for op in item.values() if isinstance(op, dict) and "security" in op]
    assert len(secured) >= {"edge": 50, "fog": 10, "cloud": 2}[zone]
    assert all(op["security"] == [{"bearerAuth": []}] for op in secured)


def test_assets_are_the_pinned_package() -> None:
    import json

    lock = json.loads((ROOT / "gateway" / "swagger-ui" / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/swagger-ui-dist"]["version"]
    installed = json.loads((DIST / "package.json").read_text())["version"]
    assert installed == pinned
    assert set(ASSETS) <= {p.name for p in DIST.iterdir()}
