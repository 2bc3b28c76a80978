"""The MQTT connector's persistent session: resumed only by a gateway with the same subscriptions.

The flaky ``test_rejected_message_is_acknowledged_without_retry`` (issue 10, item 12) saw
``['done', 'rejected']`` where one message was published: a message from elsewhere reached the
function. The session key was ``gw-<zone>-<instance>`` alone, with ``clean_start=False``: a gateway
with other topic annotations (here: another test's topics) resumed an earlier gateway's session,
inherited its subscriptions and the messages queued for them, and routed them by subscription
identifier to its own functions. Reproduced here deterministically: a gateway is killed with its
session alive, a message is queued for that session, and a gateway with other topics starts with
the same instance name.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from gateway.connectors import session_client_id
from gateway.server import GatewayProcess
from storage.embedded import Mosquitto
from tests.fixtures.gateway_support import (
    PASSWORD,
    STACK,
    calls,
    gateway_client,
    publish,
    write_basic_auth,
)
from tests.waiting import await_until, wait_until


def use_topics(monkeypatch: pytest.MonkeyPatch) -> str:
    prefix = f"mt-test/{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TEST_TOPIC_A", f"{prefix}/a/+")
    monkeypatch.setenv("TEST_TOPIC_B", f"{prefix}/b/#")
    return prefix


def test_session_id_depends_on_the_subscriptions() -> None:
    one = session_client_id("gw-edge-host-1", ["meters/+/up/reading", "meters/+/up/status"])
    assert one == session_client_id("gw-edge-host-1", ["meters/+/up/reading", "meters/+/up/status"])
    assert one != session_client_id("gw-edge-host-1", ["meters/+/up/status", "meters/+/up/reading"])
    assert one != session_client_id("gw-edge-host-1", ["meters/+/up/reading"])
    assert one.startswith("gw-edge-host-1-")
    assert len(session_client_id("g" * 200, ["x"])) <= 23 + 200  # bounded, never the raw filter text


async def test_a_session_left_by_a_gateway_with_other_topics_delivers_nothing(
    env: dict[str, str], redis_url: str, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = write_basic_auth(env)
    instance = f"gw-stale-{uuid.uuid4().hex[:6]}"
    old = use_topics(monkeypatch)
    first = GatewayProcess(STACK, "mqtt", secrets_dir=secrets, args=["--instance", instance, "--log-level", "warning"])
    try:
        wait_until(lambda: httpx.get(f"{first.url}/system/info", auth=("admin", PASSWORD), timeout=5)
                   .json()["connectors"]["mqtt"] == "subscribed", 15, "MQTT subscriptions of the first gateway")
    finally:
        first.kill()  # its session (subscriptions to the old topics) stays for session_expiry_s
    publish(mosquitto, f"{old}/b/m-stale", b'{"stale": true}')  # queued for the dead session

    new = use_topics(monkeypatch)
    # One message in flight at a time: the queued one, had it come, would be handled before ours.
    async with gateway_client("mqtt", instance=instance, mqtt_concurrency=1) as (app, _):
        assert app.mqtt is not None
        await await_until(lambda: _ready(app), 10, "MQTT subscriptions")
        publish(mosquitto, f"{new}/b/m-8", b'{"reject-me": true}')

        async def rejected() -> bool:
            return any(c["phase"] == "rejected" for c in calls(redis_url))

        await await_until(rejected, 10, "the test's own message handled")
        # Only this test's topics: a handler thread another test's in-process gateway left
        # running may still write to the shared Redis (see test_gateway_connectors).
        ours = [(c["phase"], c["topic"]) for c in calls(redis_url) if c["topic"].startswith((old, new))]
        assert ours == [("rejected", f"{new}/b/m-8")]

        async def acked() -> bool:
            return app.mqtt is not None and app.mqtt.delivered == 1

        await await_until(acked, 5, "the message acknowledged")
        assert app.mqtt.delivered == 1


async def test_a_session_with_the_same_topics_is_resumed(
    env: dict[str, str], redis_url: str, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tradeoff kept: same instance, same topics (a restart) still gets the queued QoS1 messages."""
    secrets = write_basic_auth(env)
    instance = f"gw-resume-{uuid.uuid4().hex[:6]}"
    prefix = use_topics(monkeypatch)
    first = GatewayProcess(STACK, "mqtt", secrets_dir=secrets, args=["--instance", instance, "--log-level", "warning"])
    try:
        wait_until(lambda: httpx.get(f"{first.url}/system/info", auth=("admin", PASSWORD), timeout=5)
                   .json()["connectors"]["mqtt"] == "subscribed", 15, "MQTT subscriptions of the first gateway")
    finally:
        first.kill()
    publish(mosquitto, f"{prefix}/b/m-queued", b'{"queued": true}')
    async with gateway_client("mqtt", instance=instance):

        async def delivered() -> list[dict[str, Any]]:
            return [c for c in calls(redis_url) if c["phase"] == "done" and c["topic"].startswith(prefix)]

        got = await await_until(delivered, 10, "the queued message delivered to the restarted gateway")
        assert [c["topic"] for c in got] == [f"{prefix}/b/m-queued"]


async def _ready(app: Any) -> bool:
    return bool(app.connectors_ready())
