"""The gateway answers like the python3-http template; the shared package imports in the image layout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.app import GatewayApp
from tests import python3_http
from tests.fixtures.gateway_support import ECHO_DIR, gateway_client, write_basic_auth

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def gw(env: dict[str, str]) -> AsyncIterator[tuple[GatewayApp, httpx.AsyncClient]]:
    write_basic_auth(env)
    async with gateway_client("edge", background=False) as pair:
        yield pair


@pytest.fixture
def flask_client(gw: tuple[GatewayApp, httpx.AsyncClient]):  # after gw: the zone's environment is applied
    handler = python3_http.import_handler(ECHO_DIR / "handler.py", "_p3http_echo")
    return python3_http.create_app(handler).test_client()


@pytest.mark.parametrize(
    "path", ["/text", "/html", "/none", "/status?code=201", "/status?code=409", "/bytes", "/list", "/octet",
             "/nobody"],
)
async def test_same_status_type_and_body_as_the_template(
    gw: tuple[GatewayApp, httpx.AsyncClient], flask_client, path: str
) -> None:
    _, client = gw
    ours = await client.get(f"/function/edge-echo{path}")
    theirs = flask_client.get(path)
    assert ours.status_code == theirs.status_code
    assert ours.headers["content-type"] == theirs.headers["Content-Type"]
    if theirs.headers["Content-Type"] == "application/json":
        # jsonify sorts keys and drops spaces; the gateway uses json.dumps: same JSON value.
        assert ours.json() == json.loads(theirs.data)
    else:
        assert ours.content == theirs.data
    for name in ("X-Custom",):
        assert ours.headers.get(name) == theirs.headers.get(name)


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
async def test_same_event_fields_as_the_template(
    gw: tuple[GatewayApp, httpx.AsyncClient], flask_client, method: str
) -> None:
    _, client = gw
    body = b'{"reading": 1.5}'
    ours = (await client.request(method, "/function/edge-echo/meters/m-1?max_age=60&live=1", content=body,
                                 headers={"X-Test": "1"})).json()
    theirs = json.loads(flask_client.open("/meters/m-1?max_age=60&live=1", method=method, data=body,
                                          headers={"X-Test": "1"}).data)
    for key in ("method", "path", "query", "body", "greeting"):
        assert ours[key] == theirs[key], key
    assert ours["headers"]["x-test"] == theirs["headers"]["x-test"] == "1"


def test_handler_runs_in_the_python3_http_image_layout(tmp_path: Path) -> None:
    """``/home/app/function/handler.py`` + ``configuration.copy`` of metertwin/, imported as ``function.handler``."""
    function_dir = tmp_path / "function"
    function_dir.mkdir()
    shutil.copy(ECHO_DIR / "handler.py", function_dir / "handler.py")
    shutil.copytree(ROOT / "metertwin", function_dir / "metertwin",
                    ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        "import json, sys\n"
        "from function import handler\n"
        "import metertwin\n"
        "class E:\n"
        "    body = b'{}'; headers = {}; method = 'GET'; query = {}; path = '/text'\n"
        "class C:\n"
        "    hostname = 'image'\n"
        "print(json.dumps({'answer': handler.handle(E(), C()), 'metertwin': metertwin.__file__}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["answer"] == {"statusCode": 200, "body": "plain text", "headers": {"Content-Type": "text/plain"}}
    # The copy beside the handler was imported, not the repository's package.
    assert Path(out["metertwin"]).resolve() == (function_dir / "metertwin" / "__init__.py").resolve()


VOLATILE = {"elapsed_ms", "ts", "age_s", "received_at", "request_id", "now", "run_id", "seconds"}
PROBES = [
    ("GET", "/", None, None),
    ("GET", "/meters/m-parity-1/reading", None, None),
    ("POST", "/", "service", b"{not json"),
    ("POST", "/meters", "admin", b'{"meter_id": 12}'),
    ("GET", "/no/such/route", "admin", None),
    ("DELETE", "/meters/m-parity-1", "utility", None),
]


def _comparable(status: int, content_type: str, body: bytes) -> tuple[int, str, object]:
    if content_type.startswith("application/json"):
        value = json.loads(body)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in VOLATILE}
        return status, "json", value
    return status, content_type, body


@pytest.mark.parametrize("zone", ["edge", "fog", "cloud"])
async def test_repo_functions_answer_the_same_through_gateway_and_template(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, zone: str
) -> None:
    """Every function of the real stack.yml, on requests that need no meter: same status and body both ways."""
    from metertwin.core import auth
    from metertwin.core.settings import reset_settings

    for prefix in ("EDGE", "FOG", "CLOUD"):
        monkeypatch.setenv(f"{prefix}_REDIS_URL", env["REDIS_URL"])
        monkeypatch.setenv(f"{prefix}_MQTT_HOST", env["MQTT_HOST"])
        monkeypatch.setenv(f"{prefix}_MQTT_PORT", env["MQTT_PORT"])
    write_basic_auth(env)
    async with gateway_client(zone, stack=ROOT / "stack.yml", background=False) as (app, client):
        reset_settings()
        tokens = {scope: auth.issue_token(f"parity-{scope}", {scope}) for scope in ("service", "admin", "utility")}
        for name, fn in app.functions.items():
            flask_client = python3_http.create_app(
                python3_http.import_handler(fn.spec.handler_dir / "handler.py", f"_p3http_{name.replace('-', '_')}")
            ).test_client()
            for method, path, scope, body in PROBES:
                headers = {"Content-Type": "application/json"}
                if scope:
                    headers["Authorization"] = f"Bearer {tokens[scope]}"
                ours = await client.request(method, f"/function/{name}{path}", content=body, headers=headers)
                theirs = flask_client.open(path, method=method, data=body, headers=headers)
                assert _comparable(ours.status_code, ours.headers["content-type"], ours.content) == _comparable(
                    theirs.status_code, theirs.headers["Content-Type"], theirs.data
                ), f"{name} {method} {path}"
