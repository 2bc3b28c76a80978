"""The gateway answers like the python3-http template; the shared package imports in the image layout.

The stand-in (tests/python3_http.py) is pinned to the template's own index.py by the
``test_template_*`` tests below; every function then answers errors as JSON through it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import GatewayApp
from gateway.stack import load_stack
from storage.embedded import free_port
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
    "path", ["/text", "/html", "/none", "/status?code=201", "/status?code=409", "/bytes", "/list",
             "/octet",
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


VOLATILE = {"elapsed_ms", "ts", "age_s", "received_at", "request_id", "now", "run_id", "seconds", "dead_letter_id"}
PROBES = [
    ("GET", "/", None, None),
    ("GET", "/meters/m-parity-1/reading", None, None),
    ("POST", "/", "service", b"{not json"),
    ("POST", "/meters", "admin", b'{"meter_id": 12}'),
    ("GET", "/no/such/route", "admin", None),
    ("DELETE", "/meters/m-parity-1", "utility", None),
]


def _without_volatile(value: object) -> object:
    """``value`` with every key that differs between two identical calls dropped, at any depth."""
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE}
    return value


def _comparable(status: int, content_type: str, body: bytes) -> tuple[int, str, object]:
    if content_type.startswith("application/json"):
        value = json.loads(body)
        return status, "json", _without_volatile(value)
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


# ------------------------------------------------------------------ the stand-in is the template


def _app(handle: Any) -> Any:
    """A test client of the stand-in serving ``handle``, recording every event it was given."""
    module = types.ModuleType("_p3http_inline")
    module.events = []  # type: ignore[attr-defined]

    def recording(event: Any, context: Any) -> Any:
        module.events.append(event)
        return handle(event, context)

    module.handle = recording  # type: ignore[attr-defined]
    client = python3_http.create_app(module).test_client()
    client.events = module.events  # type: ignore[attr-defined]
    return client


def test_template_exception_is_flasks_html_500() -> None:
    def boom(event: Any, context: Any) -> Any:
        raise RuntimeError("boom")

    answer = _app(boom).get("/meters/m-1")
    assert answer.status_code == 500
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"Internal Server Error" in answer.data
    assert b"boom" not in answer.data  # no traceback to the caller


@pytest.mark.parametrize(
    ("body", "sent", "content_type"),
    [
        ({"a": 1}, b'{"a":1}\n', "application/json"),
        ("text", b"text", "text/html; charset=utf-8"),
        (b"raw", b"b'raw'", "text/html; charset=utf-8"),
        ([1, 2], b"[1, 2]", "text/html; charset=utf-8"),
        (3.5, b"3.5", "text/html; charset=utf-8"),
        (None, b"None", "text/html; charset=utf-8"),
    ],
)
def test_template_body_rules(body: Any, sent: bytes, content_type: str) -> None:
    answer = _app(lambda e, c: {"statusCode": 201, "body": body}).get("/")
    assert (answer.status_code, answer.data, answer.headers["Content-Type"]) == (201, sent, content_type)


def test_template_json_only_for_an_exact_dict() -> None:
    class Sub(dict):  # type: ignore[type-arg]
        pass

    answer = _app(lambda e, c: {"body": Sub(a=1)}).get("/")
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    assert answer.data == b"{'a': 1}"


def test_template_has_no_octet_stream_pass_through() -> None:
    answer = _app(lambda e, c: {"body": b"\x00\x01", "headers": {"Content-type": "application/octet-stream"}}).get("/")
    assert answer.headers["Content-Type"] == "application/octet-stream"
    assert answer.data == b"b'\\x00\\x01'"


def test_template_headers_status_and_empty_answers() -> None:
    client = _app(lambda e, c: {"statusCode": 202, "body": "{}", "headers": {"Content-Type": "application/json",
                                                                             "X-Custom": "yes"}})
    answer = client.get("/")
    assert (answer.status_code, answer.headers["Content-Type"], answer.headers["X-Custom"]) == (
        202, "application/json", "yes")
    listed = _app(lambda e, c: {"body": "x", "headers": [("X-A", "1"), ("X-A", "2")]}).get("/")
    assert listed.headers.getlist("X-A") == ["1", "2"]
    none = _app(lambda e, c: None).get("/")
    assert (none.status_code, none.data, none.headers["Content-Type"]) == (200, b"", "text/html; charset=utf-8")
    nobody = _app(lambda e, c: {"statusCode": 204}).get("/")
    assert (nobody.status_code, nobody.data) == (204, b"")
    # A non-dict answer goes to Flask as it is: a (body, status) tuple works, Flask 3 sends a list as JSON.
    assert _app(lambda e, c: ("made", 203)).get("/").status_code == 203
    listed_answer = _app(lambda e, c: [1, 2]).get("/")
    assert (listed_answer.headers["Content-Type"], listed_answer.json) == ("application/json", [1, 2])


def test_template_options_head_and_other_methods() -> None:
    client = _app(lambda e, c: {"body": {"method": e.method}})
    options = client.open("/meters/m-1", method="OPTIONS")
    assert (options.status_code, options.data) == (200, b"")
    assert set(options.headers["Allow"].split(", ")) == {"DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"}
    assert client.events == []  # Flask answered OPTIONS itself
    head = client.head("/meters/m-1")
    assert (head.status_code, head.data) == (200, b"")
    assert client.events[-1].method == "HEAD"  # the handler ran
    for method in ("TRACE", "PROPFIND"):
        other = client.open("/meters/m-1", method=method)
        assert other.status_code == 405
        assert other.headers["Content-Type"] == "text/html; charset=utf-8"
    assert len(client.events) == 1


def test_template_event_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTNAME", "edge-read-7d9f")
    seen: dict[str, Any] = {}

    def handle(event: Any, context: Any) -> Any:
        seen.update(body=event.body, method=event.method, path=event.path, first=event.query.get("a"),
                    all=event.query.getlist("a"), ctype=event.headers.get("content-type"),
                    hostname=context.hostname)
        return {"body": "ok"}

    client = _app(handle)
    client.post("/meters/a%2Fb/x?a=1&a=2", data=b"k=v&k=w", content_type="application/x-www-form-urlencoded")
    assert seen == {"body": b"k=v&k=w", "method": "POST", "path": "/meters/a/b/x", "first": "1", "all": ["1", "2"],
                    "ctype": "application/x-www-form-urlencoded", "hostname": "edge-read-7d9f"}
    client.get("/")
    assert (seen["path"], seen["body"]) == ("/", b"")
    monkeypatch.delenv("HOSTNAME")
    client.get("/")
    assert seen["hostname"] == "localhost"


# ------------------------------------------------------------------ every error leaves as JSON


@pytest.fixture
def dead_backends(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Settings whose Redis, broker and S3 are closed ports (a zone whose backends are down)."""
    from metertwin.core import clients
    from metertwin.core.settings import reset_settings
    from tests.conftest import TEST_SIGNING_KEY

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "token-signing-key").write_text(TEST_SIGNING_KEY)
    (secrets / "mqtt-password").write_text("unused")
    closed = free_port()
    for key, value in {"REDIS_URL": f"redis://127.0.0.1:{closed}/0", "HOT_REDIS_URL": f"redis://127.0.0.1:{closed}/0",
                       "MQTT_HOST": "127.0.0.1", "MQTT_PORT": str(closed), "MQTT_CONNECT_TIMEOUT_S": "1",
                       "S3_ENDPOINT_URL": f"http://127.0.0.1:{closed}", "SECRETS_DIR": str(secrets),
                       "REDIS_TIMEOUT_S": "0.5", "GATEWAY_URL": f"http://127.0.0.1:{closed}"}.items():
        monkeypatch.setenv(key, value)
    clients.close_all()
    reset_settings()
    yield
    clients.close_all()
    reset_settings()


def _route_paths(handler: types.ModuleType) -> list[tuple[str, str]]:
    """(method, concrete path) for every route of the handler's router, parameters filled in."""
    out = []
    for route in handler.router._routes:
        pattern = route.regex.pattern.removeprefix("^").removesuffix("/?$")
        path = re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)",
                      lambda m: "m-dead-1" if m.group(1) == "meter_id" else "x1", pattern)
        out.append((route.method, path or "/"))
    return out


def test_every_function_answers_json_when_its_backends_are_down(dead_backends: None) -> None:
    """Redis (and broker, S3) unreachable: every route of every function answers a JSON error, never HTML."""
    from metertwin.core import auth

    token = auth.issue_token("dead-backends", {"admin"})
    stack = load_stack(ROOT / "stack.yml")
    handler_dirs = sorted({fn.handler_dir for fn in stack.functions.values()})
    assert len(handler_dirs) == len(list((ROOT / "functions").glob("*/handler.py")))
    for handler_dir in handler_dirs:
        module_name = f"_p3http_dir_{handler_dir.name.replace('-', '_')}"
        handler = python3_http.import_handler(handler_dir / "handler.py", module_name)
        client = python3_http.create_app(handler).test_client()
        statuses = []
        for method, path in _route_paths(handler):
            answer = client.open(path, method=method, data=b"{}",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            where = f"{handler_dir.name} {method} {path}"
            assert answer.headers["Content-Type"] == "application/json", (
                f"{where}: {answer.status_code} {answer.data[:200]!r}")
            body = json.loads(answer.data)
            statuses.append(answer.status_code)
            if answer.status_code >= 400:
                assert set(body) >= {"error", "message"}, where
        assert any(s >= 500 for s in statuses), f"{handler_dir.name}: no route reached a backend ({statuses})"


def _router_app(route: Any, *, wrap: Any = None) -> Any:
    from metertwin.core.http import Router

    router = Router()
    router.get("/x", scopes=None)(route)
    handle = router.dispatch if wrap is None else wrap(router)
    return _app(handle)


@pytest.mark.parametrize(
    ("route", "status", "code"),
    [
        (lambda r: 1 / 0, 500, "internal_error"),
        (lambda r: {"statusCode": 200, "body": b"bytes"}, 500, "internal_error"),
        (lambda r: {"statusCode": 200, "body": [1, 2]}, 500, "internal_error"),
        (lambda r: None, 500, "internal_error"),
        (lambda r: {"statusCode": "200", "body": "x"}, 500, "internal_error"),
        ("redis-down", 503, "backend_unavailable"),
        ("bad-details", 500, "internal_error"),
    ],
)
def test_router_boundary_answers_json_through_the_template(route: Any, status: int, code: str) -> None:
    import redis

    from metertwin.core.errors import InvalidInput

    if route == "redis-down":
        def route(r: Any) -> Any:
            raise redis.ConnectionError("Connection refused")
    elif route == "bad-details":
        class Broken(InvalidInput):
            def to_dict(self) -> dict[str, Any]:
                raise ValueError("cannot describe")

        def route(r: Any) -> Any:
            raise Broken("x")
    answer = _router_app(route).get("/x")
    assert (answer.status_code, answer.headers["Content-Type"], answer.json["error"]) == (
        status, "application/json", code)


def test_guard_catches_what_happens_outside_dispatch() -> None:
    """A ``handle`` that post-processes ``dispatch`` (as binding.serve forwards) is wrapped by ``guard``."""
    from metertwin.core.errors import BackendUnavailable
    from metertwin.core.http import guard, json_response

    def forward_after(router: Any) -> Any:
        def handle(event: Any, context: Any) -> Any:
            router.dispatch(event, context)
            raise BackendUnavailable("no forwarding slot free within 3.0 s")

        return guard(handle)

    answer = _router_app(lambda r: json_response({"ok": True}), wrap=forward_after).get("/x")
    assert (answer.status_code, answer.json["error"]) == (503, "backend_unavailable")
    unguarded = _router_app(lambda r: json_response({"ok": True}),
                            wrap=lambda router: forward_after(router).__wrapped__).get("/x")
    assert (unguarded.status_code, unguarded.headers["Content-Type"]) == (500, "text/html; charset=utf-8")
    ok = _router_app(lambda r: json_response({"ok": True}), wrap=lambda router: guard(router.dispatch)).get("/x")
    assert (ok.status_code, ok.json) == (200, {"ok": True})
