"""/async-function: 202 + X-Call-Id, durable queue in Redis, result POSTed to X-Callback-Url, survives restarts."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import redis

from gateway import keys
from gateway.server import GatewayProcess
from tests.fixtures.gateway_support import STACK, CallbackReceiver, gateway_client, write_basic_auth
from tests.redis_backends import redis_client
from tests.waiting import await_until, wait_until


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[CallbackReceiver]:
    # The receiver listens on loopback, which the callback destination policy refuses by default.
    monkeypatch.setenv("DESTINATION_ALLOWED_CIDRS", "127.0.0.1/32")
    rx = CallbackReceiver()
    yield rx
    rx.close()


def queue_state(redis_url: str, zone: str = "edge") -> tuple[int, int]:
    """(entries in the stream, entries pending in the group)."""
    r = redis_client(redis_url)
    length = r.xlen(keys.async_queue(zone))
    try:
        pending = r.xpending(keys.async_queue(zone), keys.ASYNC_GROUP)["pending"]
    except redis.ResponseError:
        pending = 0
    return length, pending


async def test_async_call_is_accepted_and_result_is_posted_back(
    env: dict[str, str], redis_url: str, receiver: CallbackReceiver
) -> None:
    write_basic_auth(env)
    async with gateway_client("edge") as (app, client):
        resp = await client.post("/async-function/edge-echo/meters/m-1?x=1", content=b'{"a": 1}',
                                 headers={"X-Callback-Url": receiver.url, "Content-Type": "application/json"})
        assert resp.status_code == 202
        call_id = resp.headers["x-call-id"]
        assert call_id

        async def called_back() -> bool:
            return call_id in receiver.call_ids()

        await await_until(called_back, 10, "callback")
        callback = receiver.calls[0]
        assert callback.headers["x-function-status"] == "200"
        assert callback.headers["x-function-name"] == "edge-echo"
        assert callback.headers["content-type"] == "application/json"
        echo = json.loads(callback.body)
        assert echo["method"] == "POST"
        assert echo["path"] == "/meters/m-1"
        assert echo["query"] == {"x": "1"}
        assert echo["body"] == '{"a": 1}'
        assert echo["headers"]["x-call-id"] == call_id

        async def acked() -> bool:
            return queue_state(redis_url) == (0, 0)

        await await_until(acked, 5, "entry acknowledged and deleted")
        assert (await app.invocation_counts())["edge-echo"] == 1


async def test_async_errors(env: dict[str, str], receiver: CallbackReceiver) -> None:
    write_basic_auth(env)
    async with gateway_client("edge") as (_, client):
        resp = await client.post("/async-function/nope", headers={"X-Callback-Url": receiver.url})
        assert resp.status_code == 404
        resp = await client.post("/async-function/edge-echo", content=b"x" * 5000)
        assert resp.status_code == 413
        assert "4096" in resp.json()["message"]
        resp = await client.get("/async-function/edge-echo")
        assert resp.status_code == 405


async def test_failing_handler_and_callback_retries(
    env: dict[str, str], redis_url: str, receiver: CallbackReceiver
) -> None:
    write_basic_auth(env)
    receiver.status = 503
    async with gateway_client("edge", callback_attempts=2) as (_, client):
        resp = await client.post("/async-function/edge-echo/raise", headers={"X-Callback-Url": receiver.url})
        call_id = resp.headers["x-call-id"]

        async def retried() -> bool:
            return len(receiver.calls) == 2

        await await_until(retried, 10, "two callback attempts")
        assert {c.headers["x-call-id"] for c in receiver.calls} == {call_id}
        assert receiver.calls[0].headers["x-function-status"] == "500"

        async def given_up() -> bool:
            return queue_state(redis_url) == (0, 0)

        await await_until(given_up, 5, "entry acknowledged after bounded retries")


async def test_call_without_callback_url_runs_and_is_acked(env: dict[str, str], redis_url: str) -> None:
    write_basic_auth(env)
    async with gateway_client("edge") as (app, client):
        resp = await client.post("/async-function/edge-echo-two")
        assert resp.status_code == 202

        async def done() -> bool:
            return app.queue is not None and app.queue.processed == 1 and queue_state(redis_url) == (0, 0)

        await await_until(done, 10, "call processed")


def _enqueue(url: str, n: int, callback: str) -> list[str]:
    ids = []
    for _ in range(n):
        resp = httpx.post(f"{url}/async-function/edge-echo/sleep?s=0.4", headers={"X-Callback-Url": callback},
                          timeout=5)
        assert resp.status_code == 202
        ids.append(resp.headers["x-call-id"])
    return ids


@pytest.mark.slow
def test_accepted_calls_survive_a_gateway_crash(
    env: dict[str, str], redis_url: str, receiver: CallbackReceiver
) -> None:
    """SIGKILL a gateway mid-queue; a new process with the same --instance finishes every accepted call."""
    secrets = write_basic_auth(env)
    args = ["--instance", "gw-crash-test", "--async-concurrency", "1", "--log-level", "warning"]
    first = GatewayProcess(STACK, "edge", secrets_dir=secrets, args=args)
    try:
        ids = _enqueue(first.url, 5, receiver.url)
        wait_until(lambda: len(receiver.calls) >= 1, 15, "first callback")
        first.kill()  # one call in flight, several queued; no shutdown code runs
    finally:
        first.kill()
    assert len(receiver.call_ids()) < 5
    with GatewayProcess(STACK, "edge", secrets_dir=secrets, args=args) as second:
        wait_until(lambda: receiver.call_ids() >= set(ids), 20, f"all callbacks (log: {second.log_path})")
        wait_until(lambda: queue_state(redis_url) == (0, 0), 10, "queue empty")


@pytest.mark.slow
def test_another_worker_claims_calls_of_a_dead_one(
    env: dict[str, str], redis_url: str, receiver: CallbackReceiver
) -> None:
    """A worker under a different name takes over entries idle longer than --claim-idle (XAUTOCLAIM)."""
    secrets = write_basic_auth(env)
    common = ["--async-concurrency", "1", "--claim-idle", "0.5", "--log-level", "warning"]
    dead = GatewayProcess(STACK, "edge", secrets_dir=secrets, args=["--instance", "gw-dead", *common])
    try:
        ids = _enqueue(dead.url, 3, receiver.url)
        wait_until(lambda: queue_state(redis_url)[1] >= 1, 10, "a call in flight")
    finally:
        dead.kill()
    with GatewayProcess(STACK, "edge", secrets_dir=secrets, args=["--instance", "gw-alive", *common]):
        wait_until(lambda: receiver.call_ids() >= set(ids), 20, "all callbacks")
        wait_until(lambda: queue_state(redis_url) == (0, 0), 10, "queue empty")
