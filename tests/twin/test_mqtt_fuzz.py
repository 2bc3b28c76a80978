"""MQTT fuzz (issue 10): hypothesis-generated payloads and topics through a real Mosquitto into ingest.

Two gateway processes subscribe as in production: the edge's (edge-ingest, ``meters/+/up/reading`` and
``.../up/status``) and the fog's (fog-mdms-ingest, ``meters/+/up/reading``), each in its own shared
group on a broker of this test's own (no session left by another test can take a share of the
messages). Payloads: valid readings (with duplicates and backwards registers), random JSON, wrong
types, huge numbers, deep nesting, non-UTF-8 bytes, oversized bodies; topics: twins, a meter
without a twin, and meter ids no twin can have. Checked: no 5xx at either gateway, every message
published is answered by each subscribed function exactly once (gateway metrics), and every reading
is accounted for at the fog as accepted, duplicate or dead-lettered.

Bounded: a fixed number of examples, derandomized, no example database, so CI runs the same cases.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from gateway.server import GatewayProcess
from metertwin.mdms import keys as mdms_keys
from metertwin.twin import keys as twin_keys
from metertwin.twin.state import TwinStore
from storage.embedded import Mosquitto
from tests.conftest import TEST_SIGNING_KEY
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
EXAMPLES = 600
TWINS = [f"fz-{i}" for i in range(3)]
PROBE = "fz-probe"
NOW = time.time()


@pytest.fixture
def zones(redis_url: str, tmp_path: Path) -> Iterator[tuple[Mosquitto, GatewayProcess, GatewayProcess]]:
    with Mosquitto() as broker:
        secrets = tmp_path / "secrets"
        secrets.mkdir()
        (secrets / "token-signing-key").write_text(TEST_SIGNING_KEY)
        (secrets / "mqtt-password").write_text(broker.service_password)
        base = {"REDIS_URL": redis_url, "MQTT_HOST": broker.host, "MQTT_PORT": str(broker.port),
                "MQTT_USERNAME": broker.service_user}
        gateways = []
        for zone, name, handler, topic in (
            ("edge", "edge-ingest", "ingest", "meters/+/up/reading,meters/+/up/status"),
            ("fog", "fog-mdms-ingest", "mdms-ingest", "meters/+/up/reading"),
        ):
            env = {**base, "ZONE": zone}
            stack = {"version": "1.0", "provider": {"name": "openfaas", "gateway": "http://127.0.0.1:8080"},
                     "functions": {name: {"lang": "python3-http", "handler": str(ROOT / "functions" / handler),
                                          "environment": env, "annotations": {"topic": topic}}}}
            path = tmp_path / f"{zone}.yml"
            path.write_text(json.dumps(stack))
            gateways.append(GatewayProcess(path, zone, secrets_dir=secrets, env=env, start_timeout_s=60))
        try:
            yield broker, gateways[0], gateways[1]
        finally:
            for gw in gateways:
                gw.stop()


class Publisher:
    """QoS1 publisher with the service account; counts what the broker accepted (PUBACK < 0x80)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.acks: dict[int, int] = {}
        self.done = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(broker.service_user, broker.service_password)
        self.client.on_publish = self._on_publish
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self.done:
            self.acks[mid] = int(getattr(reason, "value", reason))
            self.done.notify_all()

    def publish(self, topic: str, payload: bytes) -> bool:
        """True if the broker took the message (a topic it refuses is not a message sent)."""
        info = self.client.publish(topic, payload, qos=1)
        with self.done:
            assert self.done.wait_for(lambda: info.mid in self.acks, timeout=10), f"no PUBACK for {topic!r}"
            return self.acks.pop(info.mid) < 0x80

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def reading(seq: int, ts: float, imp: float) -> dict[str, Any]:
    return {"seq": seq, "ts": ts, "import_kwh": imp, "export_kwh": 0.0, "power_w": 500.0, "voltage_v": 231.0}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["seq", "ts", "import_kwh", "export_kwh", "power_w", "voltage_v"]
HUGE = ["1e17", str(2**63), str(2**64), "1" + "0" * 400, "1e400", "-1e400", "1e-400", str(2**53 + 1), '"3"']
VALID = st.builds(lambda seq, age, imp: json.dumps(reading(seq, NOW - age, imp)).encode(),
                  st.integers(0, 30), st.floats(0, 3600), st.floats(0, 1000))
PAYLOADS = st.one_of(
    VALID,
    JSON.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda f, v: json.dumps({**reading(1, NOW, 1.0), f: v}).encode(), st.sampled_from([*FIELDS, "x"]), JSON),
    st.builds(lambda f, text: json.dumps({**reading(1, NOW, 1.0), f: "@"}).replace('"@"', text).encode(),
              st.sampled_from(FIELDS), st.sampled_from(HUGE)),
    st.integers(50, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(50, 1500).map(lambda n: json.dumps(reading(2, NOW, 2.0))[:-1].encode() + b', "x": '
                              + b"[" * n + b"]" * n + b"}"),
    st.binary(max_size=300),
    st.integers(4097, 12_000).map(lambda n: b'{"pad": "' + b"x" * n + b'"}'),
)
ODD_IDS = st.text(st.characters(blacklist_characters="/+#\x00", blacklist_categories=("Cs", "Cc", "Cn")), min_size=1,
                  max_size=80)
TOPICS = st.one_of(
    st.sampled_from([*TWINS, "fz-no-twin"]).map(lambda m: f"meters/{m}/up/reading"),
    st.sampled_from([*TWINS, "fz-no-twin"]).map(lambda m: f"meters/{m}/up/reading"),
    ODD_IDS.map(lambda m: f"meters/{m}/up/reading"),
    st.sampled_from(TWINS).map(lambda m: f"meters/{m}/up/status"),
)


def invocations(gw: GatewayProcess, function: str) -> Counter[int]:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    out: Counter[int] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "gateway_function_invocation_total" and s.labels.get("function_name") == function:
                out[int(s.labels["code"])] += int(s.value)
    return out


def fog_accounted(r: redis.Redis) -> tuple[int, int, int]:
    """(accepted, duplicates, dead letters) over every meter the fog has seen."""
    accepted = duplicates = 0
    for key in r.scan_iter(match=mdms_keys.mdms_counters("*"), count=1000):
        c = r.hgetall(key)
        accepted += int(c.get("accepted", 0))
        duplicates += int(c.get("duplicates", 0))
    return accepted, duplicates, int(r.xlen(mdms_keys.MDMS_DEAD_LETTERS))


def dead_letter_rules(r: redis.Redis) -> Counter[str]:
    entries: list[tuple[str, dict[str, str]]] = r.xrange(mdms_keys.MDMS_DEAD_LETTERS)  # type: ignore[assignment]
    return Counter(f["rule"] for _, f in entries)


def test_fuzzed_mqtt_messages_are_all_accounted_for(
    zones: tuple[Mosquitto, GatewayProcess, GatewayProcess], redis_url: str
) -> None:
    broker, edge, fog = zones
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    store = TwinStore(r)
    for meter in [*TWINS, PROBE]:
        assert store.create(meter, "edge", {})
    pub = Publisher(broker)
    try:
        # The connectors subscribe asynchronously: probe (one reading at a time) until both zones got one.
        def seen(seq: int) -> bool:
            return r.hget(twin_keys.twin(PROBE), "s") == str(seq) and bool(
                r.hget(mdms_keys.mdms_counters(PROBE), "accepted"))

        for probe_seq in range(1, 60):
            pub.publish(f"meters/{PROBE}/up/reading", json.dumps(reading(probe_seq, time.time(), probe_seq)).encode())
            with contextlib.suppress(AssertionError):
                wait_until(functools.partial(seen, probe_seq), timeout_s=1, what="probe")
                break
        else:
            pytest.fail(f"connectors never delivered\n{edge.log_text()[-2000:]}\n{fog.log_text()[-2000:]}")

        sent: Counter[str] = Counter()

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(topic=TOPICS, payload=PAYLOADS)
        def publish_one(topic: str, payload: bytes) -> None:
            if pub.publish(topic, payload):
                sent["status" if topic.endswith("/status") else "reading"] += 1

        publish_one()
    finally:
        pub.close()

    # Probes count too: each one a zone received was applied (edge: twin version) or accepted (fog).
    def edge_expected() -> int:
        return sent["reading"] + sent["status"] + int(r.hget(twin_keys.twin(PROBE), "v") or 1) - 1

    def fog_expected() -> int:
        return sent["reading"] + int(r.hget(mdms_keys.mdms_counters(PROBE), "accepted") or 0)

    wait_until(lambda: invocations(edge, "edge-ingest").total() >= edge_expected(), 30,
               f"edge-ingest answering {edge_expected()} messages")
    wait_until(lambda: sum(fog_accounted(r)) >= fog_expected(), 30, f"fog accounting for {fog_expected()} readings")
    edge_codes, fog_codes = invocations(edge, "edge-ingest"), invocations(fog, "fog-mdms-ingest")
    accepted, duplicates, dead = fog_accounted(r)
    print(f"\nMQTT fuzz: sent {dict(sent)}; edge-ingest answers {dict(sorted(edge_codes.items()))}; "
          f"fog-mdms-ingest answers {dict(sorted(fog_codes.items()))}; fog accepted {accepted}, "
          f"duplicate {duplicates}, dead-lettered {dead} "
          f"{dict(dead_letter_rules(r))}")
    assert not [c for c in edge_codes if c >= 500], edge_codes
    assert not [c for c in fog_codes if c >= 500], fog_codes
    assert edge_codes.total() == edge_expected()
    assert fog_codes.total() == fog_expected()
    assert accepted + duplicates + dead == fog_expected()
    # Every twin still reads (GET twin decodes) after all of it.
    for meter in TWINS:
        assert store.get(meter).corrupt == ()
