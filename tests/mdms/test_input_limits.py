"""Fog input limits (issue 10, items 5-7): what the edge rejects, VEE rejects and dead-letters with its reason.

Sequence numbers, timestamps and JSON depth through fog-mdms-ingest (``handle`` and the gateway's
async lane), against real Redis; a normal reading is accepted afterwards.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from starlette.datastructures import Headers, QueryParams

from metertwin.core import json_limits
from metertwin.mdms import hot_store, keys
from metertwin.twin.messages import MAX_SEQ
from tests.invoke import Context, Event, call
from tests.mdms.mdms_fixtures import counters, dead_letters, hot, ingest_handler, mdms_env, publish, token
from tests.twin.test_input_limits import BAD_SEQS, body_with

__all__ = ["mdms_env"]
pytestmark = pytest.mark.usefixtures("mdms_env")


def assert_accepts_next(meter_id: str, seq: int = 1) -> None:
    status, body = publish(meter_id, body_with(str(seq)))
    assert (status, body["status"]) == (200, "accepted"), body


@pytest.mark.parametrize(("seq_json", "shown"), BAD_SEQS)
def test_bad_seq_is_dead_lettered_naming_the_value(meter_id: str, seq_json: str, shown: str) -> None:
    payload = body_with(seq_json)
    status, body = publish(meter_id, payload)
    assert status == 400, body
    assert body["details"]["rule"] in ("schema", "range")
    assert shown in body["details"]["reason"], body
    [entry] = dead_letters(meter_id)
    assert entry["id"] == body["details"]["dead_letter_id"]
    assert entry["payload"] == payload.decode()
    assert shown in entry["reason"]
    assert_accepts_next(meter_id)


def test_highest_seq_is_accepted_at_the_fog_too(meter_id: str) -> None:
    assert_accepts_next(meter_id, MAX_SEQ - 1)
    [row] = hot_store.rows(meter_id, 0, 2**62)
    assert row[1].seq == MAX_SEQ - 1


@pytest.mark.parametrize(("ts", "rule", "shown"), [
    (99_999_999_999.0, "future", "99999999999.0"),
    (86_400.0, "too_old", "86400.0"),
    (1e300, "future", "1e+300"),
])
def test_timestamps_the_edge_rejects_are_dead_lettered(meter_id: str, ts: float, rule: str, shown: str) -> None:
    status, body = publish(meter_id, body_with("1", ts))
    assert status == 400, body
    assert body["details"]["rule"] == rule
    assert shown in body["details"]["reason"]
    assert [d["rule"] for d in dead_letters(meter_id)] == [rule]
    assert_accepts_next(meter_id, 2)


def test_deep_reading_is_dead_lettered_whole(meter_id: str) -> None:
    nested = "[" * 1500 + "]" * 1500
    payload = body_with(f"1, \"x\": {nested}")
    assert 3000 < len(payload) < 4096
    status, body = publish(meter_id, payload)
    assert status == 400, body
    assert body["details"]["rule"] == "depth"
    assert f"limit of {json_limits.MAX_DEPTH}" in body["details"]["reason"]
    [entry] = dead_letters(meter_id)
    assert (entry["rule"], entry["truncated"], entry["payload"]) == ("depth", False, payload.decode())
    assert counters(meter_id)["rejected"] == 1
    assert_accepts_next(meter_id)


@pytest.mark.parametrize("topic", ["nonsense", "meters/bad id/up/reading", "meters/x/up/status",
                                   "meters/" + "a" * 80 + "/up/reading"])
def test_message_on_a_topic_naming_no_meter_is_dead_lettered(topic: str) -> None:
    status, body = _call(ingest_handler(), topic, b'{"seq": 1}')
    assert status == 400, body
    assert body["details"]["rule"] == "topic"
    assert "X-Topic" in body["message"]
    entries = [e for e in _all_dead_letters() if e["id"] == body["details"]["dead_letter_id"]]
    assert [(e["rule"], e["topic"], e["payload"]) for e in entries] == [("topic", topic, '{"seq": 1}')]


async def test_async_lane_dead_letters_the_same(meter_id: str) -> None:
    h = ingest_handler()

    def event(payload: bytes, topic: str = f"meters/{meter_id}/up/reading") -> Event:
        return Event(payload, Headers({"Authorization": f"Bearer {token('service')}", "X-Topic": topic}), "POST",
                     QueryParams({}), "/")

    try:
        deep = await h.handle_async(event(body_with("1, \"x\": " + "[" * 1500 + "]" * 1500)), Context())
        assert (deep["statusCode"], deep["body"]["details"]["rule"]) == (400, "depth")
        seq = await h.handle_async(event(body_with("1e17")), Context())
        assert (seq["statusCode"], seq["body"]["details"]["rule"]) == (400, "schema")
        topic = await h.handle_async(event(b"{}", "meters/bad id/up/reading"), Context())
        assert (topic["statusCode"], topic["body"]["details"]["rule"]) == (400, "topic")
        assert topic["body"]["details"]["dead_letter_id"]
        ok = await h.handle_async(event(body_with("1")), Context())
        assert (ok["statusCode"], ok["body"]["status"]) == (200, "accepted")
        assert [d["rule"] for d in dead_letters(meter_id)] == ["schema", "depth"]
    finally:
        await hot_store.get_hot_redis_async().aclose()


def test_batch_seq_follows_the_same_rule(meter_id: str) -> None:
    now = time.time() - 60
    items = [{"meter_id": meter_id, "seq": s, "ts": now + i, "import": 1.0 + i, "power": 1.0}
             for i, s in enumerate([1, "2", 2**63, 1e17])]
    status, body = call(ingest_handler(), "POST", "/readings/batch", body={"readings": items}, token=token("mdms"))
    assert status == 200, body
    assert (body["accepted"], body["rejected"]) == (1, 3)
    assert sorted(d["rule"] for d in dead_letters(meter_id)) == ["range", "schema", "schema"]


def _call(h: Any, topic: str, payload: bytes) -> tuple[int, Any]:
    return call(h, "POST", "/", body=payload, token=token("service"), headers={"X-Topic": topic})


def _all_dead_letters() -> list[dict[str, Any]]:
    entries: list[tuple[str, dict[str, str]]] = hot().xrange(keys.MDMS_DEAD_LETTERS)  # type: ignore[assignment]
    return [{"id": i, **f} for i, f in entries]
