"""Twin changes append events to the zone's stream: readings, settings and delta, commands, status."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from metertwin.core import topics
from metertwin.core.auth import issue_token
from metertwin.core.clients import get_redis
from metertwin.stream import events, keys
from metertwin.stream.settings import get_stream_settings
from metertwin.twin.commands import CommandService
from metertwin.twin.messages import CommandAck
from metertwin.twin.state import twin_store
from metertwin.upgrade.inbox import v1_ingest
from tests.conftest import TEST_SIGNING_KEY
from tests.invoke import call, load_handler

ingest = load_handler("ingest")
KEY = keys.zone_events("edge")


def entries(client: Any) -> list[events.Event]:
    return [events.Event.from_entry(i, f) for i, f in client.xrange(KEY)]


def measurement(ts: float) -> str:
    return json.dumps({"ts": ts, "import_kwh": 1.5, "export_kwh": 0.0, "power_w": 800.0, "voltage_v": 230.0})


@pytest.fixture
def twin(stream_env: dict[str, str], meter_id: str) -> str:
    assert twin_store(get_redis()).create(meter_id, "edge", {})
    get_redis().delete(KEY)
    return meter_id


def test_an_applied_reading_is_one_event_a_duplicate_none(twin: str) -> None:
    script = v1_ingest(get_redis())
    now = time.time()
    assert script.run(twin, measurement(now), now, 7).result == "applied"
    assert script.run(twin, measurement(now), now, 7).result == "duplicate"
    got = entries(get_redis())
    assert [(e.type, e.meter, e.topic) for e in got] == [("reading", twin, f"meters/{twin}/reading")]
    payload = json.loads(got[0].to_json())
    assert payload["data"] == {"seq": 7, "measurement": json.loads(measurement(now))}
    assert payload["id"] == got[0].id


def test_reported_and_desired_changes_carry_the_delta(twin: str) -> None:
    store = twin_store(get_redis())
    store.set_desired(twin, {"tariff": "night"})
    store.report(twin, {"tariff": "night"})
    got = entries(get_redis())
    assert [e.type for e in got] == ["desired", "delta", "reported", "delta"]
    assert json.loads(got[1].data)["delta"] == {"tariff": "night"}
    assert json.loads(got[3].data)["delta"] == {}
    # A reported field nobody desires moves no delta.
    store.report(twin, {"firmware": "1.2"})
    assert [e.type for e in entries(get_redis())][4:] == ["reported"]


def test_command_status_transitions_are_events(twin: str) -> None:
    service = CommandService(get_redis())
    out = service.submit(twin, "relay", {"state": "open"})
    service.on_ack(twin, CommandAck(id=out["id"], status="applied", ts=time.time()))
    got = [e for e in entries(get_redis()) if e.type == "command"]
    assert [(e.sub, json.loads(e.data)["id"]) for e in got] == [
        ("pending", out["id"]), ("delivered", out["id"]), ("acknowledged", out["id"])]
    assert got[0].topic == f"meters/{twin}/command/pending"


def test_online_offline_from_the_status_topic(twin: str) -> None:
    service = issue_token("connector", {"service"}, key=TEST_SIGNING_KEY)
    status, body = call(ingest, "POST", "/", body=b"offline", token=service,
                        headers={"X-Topic": topics.status(twin)})
    assert status == 200, body
    got = [e for e in entries(get_redis()) if e.type == "status"]
    assert [(e.topic, json.loads(e.data)) for e in got] == [(f"meters/{twin}/status/offline", {"online": False})]


def test_stream_is_trimmed_by_length_and_by_age(twin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_MAXLEN", "100")
    get_stream_settings.cache_clear()
    client = get_redis()
    for i in range(1000):
        events.emit(client, events.Event("reading", twin, f'{{"seq":{i}}}'))
    assert client.xlen(KEY) <= 300  # approximate: whole radix-tree nodes (100 entries) are dropped
    # Entries older than the retention go on the next append once a second is up.
    client.delete(KEY)
    for i in range(1, 301):
        client.xadd(KEY, {"t": "reading", "m": twin, "s": "", "d": "{}"}, id=f"1-{i}")
    events.emitter(client)._last_trim = 0.0
    events.emit(client, events.Event("reading", twin))
    assert client.xlen(KEY) < 100


def test_emission_never_fails_the_change(twin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = get_redis()
    client.set(KEY, "not a stream")  # every XADD now fails with WRONGTYPE
    script = v1_ingest(client)
    now = time.time()
    assert script.run(twin, measurement(now), now, 1).result == "applied"
    assert events.emitter(client).failed == 1
    with pytest.raises(redis.ResponseError):
        client.xlen(KEY)


def test_emission_can_be_switched_off(twin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_ENABLED", "false")
    get_stream_settings.cache_clear()
    now = time.time()
    assert v1_ingest(get_redis()).run(twin, measurement(now), now, 1).result == "applied"
    assert get_redis().xlen(KEY) == 0
