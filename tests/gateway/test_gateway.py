"""The gateway's HTTP surface, in-process through httpx's ASGITransport (real Redis)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest
import redis

from gateway import keys
from gateway.app import GatewayApp
from tests.fixtures.gateway_support import PASSWORD, gateway_client, write_basic_auth
from tests.waiting import await_until

AUTH = ("admin", PASSWORD)


@pytest.fixture
async def gw(env: dict[str, str]) -> AsyncIterator[tuple[GatewayApp, httpx.AsyncClient]]:
    write_basic_auth(env)
    async with gateway_client("edge", background=False) as pair:
        yield pair


async def test_function_call_builds_the_template_event(gw: tuple[GatewayApp, httpx.AsyncClient]) -> None:
    _, client = gw
    resp = await client.post("/function/edge-echo/a/b?x=1&y=2", content=b'{"k": 1}',
                             headers={"Content-Type": "application/json", "X-Thing": "v"})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    echo = resp.json()
    assert echo["method"] == "POST"
    assert echo["path"] == "/a/b"
    assert echo["query"] == {"x": "1", "y": "2"}
    assert echo["body"] == '{"k": 1}'
    assert echo["headers"]["x-thing"] == "v"
    assert echo["greeting"] == "hello"  # the stack's environment reached the handler
    assert echo["hostname"]
    # The gateway's headers: a call id (also passed to the function), start time (ns), duration.
    assert resp.headers["x-call-id"] == echo["headers"]["x-call-id"]
    assert int(resp.headers["x-start-time"]) > 1_600_000_000 * 10**9
    assert float(resp.headers["x-duration-seconds"]) >= 0


async def test_path_is_slash_without_suffix_and_call_id_is_kept(gw: tuple[GatewayApp, httpx.AsyncClient]) -> None:
    _, client = gw
    for url in ("/function/edge-echo", "/function/edge-echo/"):
        resp = await client.get(url, headers={"X-Call-Id": "given-id"})
        assert resp.json()["path"] == "/"
        assert resp.headers["x-call-id"] == "given-id"


@pytest.mark.parametrize(
    ("path", "status", "content_type", "body"),
    [
        ("/text", 200, "text/plain", "plain text"),
        ("/html", 200, "text/html; charset=utf-8", "<b>default type</b>"),
        ("/none", 200, "text/html; charset=utf-8", ""),
        ("/status?code=201", 201, "application/json", '{"ok": true}'),
        ("/bytes", 200, "text/html; charset=utf-8", "b'raw'"),  # str(bytes), as the template does
        ("/list", 200, "text/html; charset=utf-8", "[1, 2]"),
        # No octet-stream pass-through (python3-http-debian has one, python3-http does not): str(bytes).
        ("/octet", 200, "application/octet-stream", "b'\\x00\\x01'"),
        ("/nobody", 204, "text/html; charset=utf-8", ""),
    ],
)
async def test_return_values_are_converted_like_the_template(
    gw: tuple[GatewayApp, httpx.AsyncClient], path: str, status: int, content_type: str, body: str
) -> None:
    _, client = gw
    resp = await client.get(f"/function/edge-echo{path}")
    assert resp.status_code == status
    assert resp.headers["content-type"] == content_type
    assert resp.text == body


async def test_handler_headers_pass_through(gw: tuple[GatewayApp, httpx.AsyncClient]) -> None:
    _, client = gw
    resp = await client.get("/function/edge-echo/status?code=202")
    assert resp.status_code == 202
    assert resp.headers["x-custom"] == "yes"


async def test_unknown_function_is_404_text(gw: tuple[GatewayApp, httpx.AsyncClient]) -> None:
    _, client = gw
    for url in ("/function/nope", "/function/nope/x", "/function/fog-echo"):  # fog-echo: other zone
        resp = await client.get(url)
        assert resp.status_code == 404
        assert resp.text == f"error finding function {url.split('/')[2]}: not found"


async def test_methods_like_the_template(gw: tuple[GatewayApp, httpx.AsyncClient]) -> None:
    _, client = gw
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        resp = await client.request(method, "/function/edge-echo/m")
        assert resp.status_code == 200
        assert resp.json()["method"] == method
    resp = await client.request("TRACE", "/function/edge-echo")
    assert resp.status_code == 405
    assert "GET" in resp.headers["allow"]
    resp = await client.request("OPTIONS", "/function/edge-echo")
    assert resp.status_code == 200
    assert "POST" in resp.headers["allow"]
    resp = await client.head("/function/edge-echo")
    assert resp.status_code == 200
    assert resp.content == b""


async def test_oversized_body_is_413_before_the_handler(gw: tuple[GatewayApp, httpx.AsyncClient]) -> None:
    app, client = gw
    assert app.max_body_bytes == 4096  # MAX_BODY_BYTES from the stack's environment
    resp = await client.post("/function/edge-echo/x", content=b"x" * 5000)
    assert resp.status_code == 413
    error = resp.json()
    assert error["error"] == "payload_too_large"
    assert "5000" in error["message"]
    assert "4096" in error["message"]
    assert app.metrics.pending["edge-echo"] == 0  # the handler never ran

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit applies while reading
        for _ in range(5):
            yield b"y" * 1000

    resp = await client.post("/function/edge-echo/x", content=chunks())
    assert resp.status_code == 413
    assert "4096" in resp.json()["message"]
    resp = await client.post("/function/edge-echo/x", content=b"z" * 4096)
    assert resp.status_code == 200


async def test_raising_handler_is_500_json_and_gateway_keeps_serving(
    gw: tuple[GatewayApp, httpx.AsyncClient],
) -> None:
    _, client = gw
    resp = await client.get("/function/edge-echo/raise")
    assert resp.status_code == 500
    assert resp.json()["error"] == "function_error"
    assert "RuntimeError: boom" in resp.json()["message"]
    assert (await client.get("/function/edge-echo")).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/system/functions"),
        ("POST", "/system/functions"),
        ("PUT", "/system/functions"),
        ("DELETE", "/system/functions"),
        ("GET", "/system/function/edge-echo"),
        ("POST", "/system/scale-function/edge-echo"),
        ("GET", "/system/info"),
        ("GET", "/system/unknown"),
    ],
)
async def test_every_system_route_needs_basic_auth(
    gw: tuple[GatewayApp, httpx.AsyncClient], method: str, path: str
) -> None:
    _, client = gw
    bad = [
        {},
        {"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()},
        {"Authorization": "Basic " + base64.b64encode(f"root:{PASSWORD}".encode()).decode()},
        {"Authorization": "Basic !!!notbase64"},
        {"Authorization": f"Bearer {PASSWORD}"},
    ]
    for headers in bad:
        resp = await client.request(method, path, headers=headers)
        assert resp.status_code == 401, headers
        assert resp.headers["www-authenticate"] == 'Basic realm="OpenFaaS API"'
    resp = await client.request(method, path, auth=AUTH)
    assert resp.status_code != 401


async def test_system_routes_without_a_configured_password_refuse_everyone(env: dict[str, str]) -> None:
    async with gateway_client("edge", background=False) as (_, client):
        resp = await client.get("/system/functions", auth=("admin", ""))
        assert resp.status_code == 401


async def test_system_functions_lists_the_zone_with_counts(
    gw: tuple[GatewayApp, httpx.AsyncClient], redis_url: str
) -> None:
    app, client = gw
    for _ in range(3):
        await client.get("/function/edge-echo")
    await client.get("/function/edge-echo-two")
    resp = await client.get("/system/functions", auth=AUTH)
    assert resp.status_code == 200
    listing = {f["name"]: f for f in resp.json()}
    assert set(listing) == {"edge-echo", "edge-echo-two"}
    echo = listing["edge-echo"]
    assert echo["invocationCount"] == 3
    assert listing["edge-echo-two"]["invocationCount"] == 1
    assert echo["image"] == "local/echo"
    assert echo["replicas"] == 1
    assert echo["availableReplicas"] == 1
    assert echo["envProcess"] == ""
    assert echo["labels"] == {"com.openfaas.scale.min": "1"}
    assert echo["annotations"] == {"description": "echoes the request"}
    # Counts are flushed to the zone's Redis hash, shared by its workers.
    assert app.redis is not None
    await app.metrics.flush(app.redis)
    stored = redis.Redis.from_url(redis_url).hgetall(keys.invocation_counts("edge"))
    assert stored == {b"edge-echo": b"3", b"edge-echo-two": b"1"}
    resp = await client.get("/system/functions", auth=AUTH)
    assert {f["name"]: f["invocationCount"] for f in resp.json()} == {"edge-echo": 3, "edge-echo-two": 1}


async def test_counts_are_flushed_every_second_in_the_background(env: dict[str, str], redis_url: str) -> None:
    write_basic_auth(env)
    async with gateway_client("edge", background=False, flush_interval_s=0.1) as (_, client):
        await client.get("/function/edge-echo")
        r = redis.Redis.from_url(redis_url)

        async def flushed() -> bool:
            return r.hget(keys.invocation_counts("edge"), "edge-echo") == b"1"

        await await_until(flushed, 5.0, "count flushed to Redis")


async def test_system_function_one_and_unknown(gw: tuple[GatewayApp, httpx.AsyncClient]) -> None:
    _, client = gw
    resp = await client.get("/system/function/edge-echo", auth=AUTH)
    assert resp.status_code == 200
    assert resp.json()["name"] == "edge-echo"
    resp = await client.get("/system/function/fog-echo", auth=AUTH)
    assert resp.status_code == 404
    resp = await client.get("/system/info", auth=AUTH)
    assert resp.json()["provider"]["provider"] == "metertwin-local"
    resp = await client.post("/system/functions", auth=AUTH)
    assert resp.status_code == 501


async def test_healthz_is_open(gw: tuple[GatewayApp, httpx.AsyncClient]) -> None:
    _, client = gw
    resp = await client.get("/healthz")
    assert resp.status_code == 200
    assert resp.text == "OK"


async def test_metrics_text(gw: tuple[GatewayApp, httpx.AsyncClient]) -> None:
    _, client = gw
    await client.get("/function/edge-echo")
    await client.get("/function/edge-echo")
    await client.get("/function/edge-echo/raise")
    text = (await client.get("/metrics")).text
    assert 'gateway_function_invocation_total{code="200",function_name="edge-echo"} 2.0' in text
    assert 'gateway_function_invocation_total{code="500",function_name="edge-echo"} 1.0' in text
    assert 'gateway_functions_seconds_count{function_name="edge-echo"} 3.0' in text
    assert 'gateway_functions_seconds_bucket{function_name="edge-echo",le="+Inf"} 3.0' in text
    assert 'gateway_service_count{function_name="edge-echo-two"} 1.0' in text
    assert re.search(r"^gateway_async_queue_depth 0\.0$", text, re.M)  # read from the zone's Redis at scrape


async def test_openapi_documents_gateway_and_function_paths(gw: tuple[GatewayApp, httpx.AsyncClient]) -> None:
    _, client = gw
    doc = (await client.get("/openapi.json")).json()
    paths = doc["paths"]
    for route in ("/system/functions", "/system/function/{name}", "/async-function/{name}", "/healthz",
                  "/metrics", "/function/{name}"):
        assert route in paths, route
    # Handler OPENAPI_PATHS merged under /function/<name><path>, per function.
    assert paths["/function/edge-echo/echo"]["post"]["summary"] == "Echo the request back as JSON"
    assert paths["/function/edge-echo-two/echo"]["post"]["operationId"] == "edge-echo-two-echo"
    assert "Echo" in doc["components"]["schemas"]
    assert "HTTPBasic" in json.dumps(doc["components"]["securitySchemes"])
    assert (await client.get("/docs")).status_code == 200


async def test_async_lane_and_fallback_to_the_thread_pool(
    gw: tuple[GatewayApp, httpx.AsyncClient], redis_url: str
) -> None:
    app, client = gw
    assert app.functions["edge-echo"].handle_async is not None
    redis.Redis.from_url(redis_url).hset("mt:test:gateway-hash", mapping={"a": "1"})
    sync = await client.get("/function/edge-echo/redis")  # handle_async answers NotImplemented
    served_async = await client.get("/function/edge-echo/redis-async")
    assert sync.status_code == served_async.status_code == 200
    assert sync.json() == served_async.json() == {"hash": {"a": "1"}}
    assert (await client.get("/function/edge-echo/text-async")).text == "plain text"


async def test_handler_pool_delivers_results_and_errors() -> None:
    import asyncio

    from gateway.pool import HandlerPool

    pool = HandlerPool(3)
    try:
        results = await asyncio.gather(*(pool.submit(pow, i, 2) for i in range(200)))
        assert results == [i * i for i in range(200)]
        with pytest.raises(ZeroDivisionError):
            await pool.submit(divmod, 1, 0)
    finally:
        pool.shutdown(wait=True)
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(int)


async def test_slow_handler_is_answered_504_after_the_exec_timeout(env: dict[str, str]) -> None:
    write_basic_auth(env)
    async with gateway_client("edge", background=False, exec_timeout_s=0.2) as (app, client):
        resp = await client.get("/function/edge-echo/sleep?s=1")
        assert resp.status_code == 504
        assert resp.json()["error"] == "function_timeout"
        assert "edge-echo did not answer within 0.2 s" in resp.json()["message"]
        assert (await client.get("/function/edge-echo/text")).status_code == 200
        assert 'code="504"' in app.metrics.render().decode()
