"""The SSE service against real Redis: scopes, filters, resume, heartbeats, slow clients, one Redis reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from metertwin.core.auth import issue_token
from metertwin.core.clients import get_redis
from metertwin.stream import events, keys
from storage.embedded import free_port, wait_for_port
from tests.conftest import TEST_SIGNING_KEY
from tests.stream.sse_client import SSE
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
KEY = keys.zone_events("edge")


def token(*scopes: str, meter: str | None = None) -> str:
    return issue_token("tester", set(scopes), meter=meter, key=TEST_SIGNING_KEY)


@pytest.fixture
def serve(stream_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Start ``python -m metertwin.stream`` on a free port (extra ``STREAM_*`` variables as keywords)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(**extra: str) -> int:
        port = free_port()
        env = {**os.environ, **{f"STREAM_{k.upper()}": v for k, v in extra.items()}}
        log = open(tmp_path / f"stream-{port}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "metertwin.stream", "--port", str(port),
                                 "--log-level", "warning"], cwd=ROOT, env=env, stdout=log, stderr=log)
        procs.append(proc)
        wait_for_port(port, proc=proc)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def emit(meter: str, kind: str = events.READING, sub: str = "", data: dict[str, Any] | None = None) -> None:
    events.emit(get_redis(), events.Event(kind, meter, json.dumps(data or {}), sub))


def test_consumer_sees_only_its_own_meter(serve: Callable[..., int]) -> None:
    port = serve()
    mine = SSE(port, token=token("consumer", meter="m-a"))
    assert mine.frames(0) == []
    emit("m-b", data={"n": 1})
    emit("m-a", data={"n": 2})
    emit("m-a", events.COMMAND, "pending", {"n": 3})
    got = [f.json() for f in mine.frames(2)]
    assert [(g["meter"], g["type"], g["data"]["n"]) for g in got] == [("m-a", "reading", 2), ("m-a", "command", 3)]
    other = SSE(port, query="meter=m-b", token=token("consumer", meter="m-a"))
    status, body = other.head()
    assert status == 403
    assert "m-b" in json.loads(body)["message"]


def test_ems_sees_only_ems_and_reading_events_of_its_meter(serve: Callable[..., int]) -> None:
    port = serve()
    denied = SSE(port, query="type=command", token=token("ems", meter="m-a"))
    assert denied.head()[0] == 403
    ems = SSE(port, token=token("ems", meter="m-a"))
    assert ems.frames(0) == []
    for kind in (events.COMMAND, events.DESIRED, events.READING, events.EMS):
        emit("m-a", kind)
    emit("m-b", events.READING)
    assert [f.json()["type"] for f in ems.frames(2)] == ["reading", "ems"]


def test_utility_filters_by_topic_wildcard_type_and_meter(serve: Callable[..., int]) -> None:
    port = serve()
    by_topic = SSE(port, query="topic=meters/%2B/command/%23", token=token("utility"))
    by_type = SSE(port, query="type=status&meter=m-b,m-c", token=token("mdms"))
    for s in (by_topic, by_type):
        assert s.frames(0) == []
    emit("m-a", events.READING)
    emit("m-a", events.COMMAND, "delivered")
    emit("m-b", events.STATUS, "offline")
    emit("m-a", events.STATUS, "online")
    emit("m-c", events.COMMAND, "acknowledged")
    assert [f.json()["topic"] for f in by_topic.frames(2)] == ["meters/m-a/command/delivered",
                                                              "meters/m-c/command/acknowledged"]
    assert [f.json()["topic"] for f in by_type.frames(1)] == ["meters/m-b/status/offline"]
    assert SSE(port, query="topic=meters/%23/x", token=token("utility")).head()[0] == 400
    assert SSE(port, query="type=nonsense", token=token("utility")).head()[0] == 400


def test_no_token_is_401(serve: Callable[..., int]) -> None:
    port = serve()
    status, body = SSE(port).head()
    assert status == 401
    assert "Authorization" in json.loads(body)["message"]


def test_resume_with_last_event_id_has_no_gap_and_no_duplicate(serve: Callable[..., int]) -> None:
    port = serve()
    first = SSE(port, query="meter=m-a", token=token("utility"))
    assert first.frames(0) == []
    for n in range(3):
        emit("m-a", data={"n": n})
    seen = first.frames(3)
    first.close()
    for n in range(3, 1203):  # more than one backfill batch while away
        emit("m-a" if n % 2 else "m-z", data={"n": n})
    again = SSE(port, query="meter=m-a", token=token("utility"), last_event_id=seen[-1].id)
    backfilled = [f.json()["data"]["n"] for f in again.frames(600)]
    emit("m-a", data={"n": 9999})
    assert backfilled == list(range(3, 1203, 2))
    assert again.frames(1)[0].json()["data"]["n"] == 9999
    ids = [f.id for f in seen]
    assert ids == sorted(ids)


def test_resume_past_the_retention_says_there_is_a_gap(serve: Callable[..., int]) -> None:
    port = serve()
    client = get_redis()
    for i in range(1, 201):
        client.xadd(KEY, {"t": "reading", "m": "m-a", "s": "", "d": "{}"}, id=f"5-{i}")
    client.xtrim(KEY, minid="5-150", approximate=False)
    resumed = SSE(port, token=token("utility"), last_event_id="5-10")
    gap, first = resumed.frames(2)
    assert gap.event == "gap"
    assert gap.json()["after"] == "5-10"
    assert first.id == "5-150"


def test_heartbeats_keep_an_idle_stream_alive(serve: Callable[..., int]) -> None:
    port = serve(heartbeat_s="0.2")
    idle = SSE(port, token=token("utility"))
    got = idle.frames(3, comments=True)
    assert [f.comment for f in got] == ["connected", "heartbeat", "heartbeat"]


def test_a_slow_client_is_cut_off_with_a_reason(serve: Callable[..., int]) -> None:
    port = serve(client_queue_max="1000", read_count="100", send_timeout_s="30")
    slow = SSE(port, token=token("utility"), rcvbuf=4096)
    reader = SSE(port, token=token("utility"))
    assert slow.frames(0) == []
    assert reader.frames(0) == []
    data = {"pad": "x" * 2000}
    batch = [events.Event(events.READING, "m-a", json.dumps(data)) for _ in range(500)]
    for _ in range(20):  # ~20 MB in all: more than the slow client's socket buffers and queue hold
        events.emit(get_redis(), *batch)
        assert len(reader.frames(500, timeout_s=30)) == 500  # a client that reads keeps its stream
    health = f"http://127.0.0.1:{port}/healthz"
    import httpx

    wait_until(lambda: httpx.get(health).json()["clients_cut"] >= 1, 30, "the slow client cut off")
    slow.sock.settimeout(10)
    tail = b""
    while b"event: close" not in tail:
        chunk = slow.sock.recv(1 << 20)
        assert chunk, "stream ended without a close reason"
        tail = (tail + chunk)[-4096:]
    assert b"slow consumer" in tail


def test_one_redis_reader_for_every_client(serve: Callable[..., int]) -> None:
    port = serve()
    client = get_redis()
    before = len(client.client_list())
    many = [SSE(port, query=f"meter=m-{i}", token=token("utility")) for i in range(50)]
    for s in many:
        assert s.frames(0) == []
    # The hub's reader, the backfill pool and the revocation check's pool: a few, not one per client.
    assert len(client.client_list()) - before <= 10
    emit("m-7")
    assert many[7].frames(1)[0].json()["meter"] == "m-7"


def test_metrics_count_clients_and_events(serve: Callable[..., int]) -> None:
    import httpx

    port = serve()
    clients = [SSE(port, token=token("utility")) for _ in range(2)]
    for s in clients:
        assert s.frames(0) == []
    emit("m-a")
    assert len(clients[0].frames(1)) == 1
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert "# TYPE metertwin_stream_clients gauge" in text
    assert "\nmetertwin_stream_clients 2\n" in text
    assert "\nmetertwin_stream_events_read_total 1\n" in text
    assert "\nmetertwin_stream_clients_cut_total 0\n" in text
