"""The MQTT connector's batch delivery (annotation ``mqtt-batch``) through a real gateway and Mosquitto:
messages reach the function in batch calls, each is acknowledged only once its batch answered it
finally (a message answered 503 in its batch is invoked again, the others are not), and readings
and a concentrator's batch flow through the real edge-ingest this way."""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from metertwin.core import topics
from metertwin.core.clients import get_redis
from storage.embedded import Mosquitto
from tests.concentrator.support import batch, provision, reading, twin_hash
from tests.fixtures.gateway_support import gateway_client, write_basic_auth
from tests.waiting import await_until

ROOT = Path(__file__).resolve().parents[2]
CALLS = "mt:test:batch-calls"

#: A batch function: records each call's topics; answers 503 once for a payload containing "flaky".
FLAKY = '''
import json
from metertwin.core import clients, mqtt_batch

def handle(event, context):
    messages = mqtt_batch.decode(event.body)
    r = clients.get_redis()
    r.rpush("mt:test:batch-calls", json.dumps({"path": event.path, "topics": [t for t, _ in messages]}))
    out = []
    for topic, payload in messages:
        first = b"flaky" in payload and r.set("mt:test:batch-flaky", "1", nx=True)
        out.append((503, {"error": "backend_unavailable"}) if first else (200, {"ok": True}))
    return {"statusCode": 200, "body": mqtt_batch.answer(out)}
'''


def _stack(tmp_path: Path, prefix: str) -> Path:
    fn = tmp_path / "flaky"
    fn.mkdir()
    (fn / "handler.py").write_text(FLAKY)
    env = textwrap.indent(textwrap.dedent("""\
        REDIS_URL: ${REDIS_URL}
        MQTT_HOST: ${MQTT_HOST}
        MQTT_PORT: ${MQTT_PORT}
        MQTT_USERNAME: ${MQTT_USERNAME}"""), " " * 6)
    stack = tmp_path / "stack.yml"
    stack.write_text(f"""version: 1.0
provider: {{name: openfaas, gateway: http://127.0.0.1:8080}}
functions:
  mqtt-flaky:
    lang: python3-http
    handler: {fn}
    environment:
{env}
    secrets: [token-signing-key, mqtt-password]
    annotations:
      topic: {prefix}/+
      mqtt-batch: "25/100"
  mqtt-ingest:
    lang: python3-http
    handler: {ROOT / "functions" / "ingest"}
    environment:
{env}
    secrets: [token-signing-key, mqtt-password]
    annotations:
      topic: meters/+/up/reading,dcu/+/up/readings
      mqtt-batch: "50/50"
""")
    return stack


def _publish_all(broker: Mosquitto, messages: list[tuple[str, bytes]], user: str | None = None,
                 password: str | None = None) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(user or broker.service_user, password or broker.service_password)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=1) for t, p in messages]
        for info in infos:
            info.wait_for_publish(timeout=5)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def stack(env: dict[str, str], tmp_path: Path) -> tuple[Path, str]:
    write_basic_auth(env)
    prefix = f"mt-batch/{uuid.uuid4().hex[:8]}"
    return _stack(tmp_path, prefix), prefix


async def test_messages_are_batched_and_acked_after_their_batch(
    stack: tuple[Path, str], mosquitto: Mosquitto
) -> None:
    path, prefix = stack
    async with gateway_client("mqtt", stack=path) as (app, _):
        assert app.mqtt is not None
        connector = app.mqtt

        async def ready() -> bool:
            return app.connectors_ready()

        await await_until(ready, 10, "MQTT subscriptions")
        sent = [(f"{prefix}/{i}", b"flaky" if i == 7 else b'{"n": %d}' % i) for i in range(60)]
        _publish_all(mosquitto, sent)

        async def all_acked() -> bool:
            return connector.delivered == len(sent)

        await await_until(all_acked, 15, "every message acknowledged")
        calls: list[dict[str, Any]] = [json.loads(c) for c in get_redis().lrange(CALLS, 0, -1)]
        seen = [t for c in calls for t in c["topics"]]
        assert all(c["path"] == "/mqtt-batch" for c in calls)
        assert len(calls) < len(sent) / 5  # batches, not a call per message
        assert max(len(c["topics"]) for c in calls) <= 25  # the size bound
        # Each message exactly once, except the one answered 503, invoked again before its ack.
        assert sorted(seen) == sorted([t for t, _ in sent] + [f"{prefix}/7"])
        assert connector.inflight == 0
        assert connector.batchers["mqtt-flaky"].calls == len(calls)


async def test_readings_and_a_concentrator_batch_through_edge_ingest(
    stack: tuple[Path, str], mosquitto: Mosquitto
) -> None:
    path, _ = stack
    tag = uuid.uuid4().hex[:8]
    direct = [f"bd-{tag}-{i}" for i in range(10)]
    behind = [f"bc-{tag}-{i}" for i in range(10)]
    dcu = f"dcu-{tag}"
    provision(direct)
    creds = provision(behind, dcu)
    assert creds is not None
    async with gateway_client("mqtt", stack=path) as (app, _):
        assert app.mqtt is not None

        async def ready() -> bool:
            return app.connectors_ready()

        await await_until(ready, 10, "MQTT subscriptions")
        _publish_all(mosquitto, [(topics.readings(m), json.dumps(reading(seq)).encode())
                                 for seq in (1, 2) for m in direct])
        _publish_all(mosquitto, [(topics.concentrator_readings(dcu),
                                  batch(*[{"meter_id": m, **reading(1)} for m in behind]))],
                     creds["username"], creds["password"])

        async def applied() -> bool:
            return (all(twin_hash(get_redis(), m).get("s") == "2" for m in direct)
                    and all(twin_hash(get_redis(), m).get("s") == "1" for m in behind))

        await await_until(applied, 15, "every reading applied")
        assert app.mqtt.batchers["mqtt-ingest"].calls < 21
