"""The connector's dead letters: refused MQTT messages kept before they are acknowledged."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from gateway.dead_letters import PAYLOAD_MAX_BYTES, ConnectorDeadLetters, kept_by_function
from storage.embedded import free_port


def _answer(**details: object) -> bytes:
    return json.dumps({"error": "invalid_input", "message": "bad", "details": details}).encode()


def test_an_answer_naming_its_own_dead_letter_is_not_kept_twice() -> None:
    assert kept_by_function(_answer(dead_letter_id="1700000000000-0"))
    assert not kept_by_function(_answer(rule="depth"))
    assert not kept_by_function(_answer(dead_letter_id=""))
    assert not kept_by_function(b"dead_letter_id but not JSON")
    assert not kept_by_function(b'["dead_letter_id"]')


async def test_kept_listed_newest_first_with_a_cursor(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        letters = ConnectorDeadLetters("edge", client)
        for i in range(3):
            assert await letters.keep("edge-ingest", f"meters/m-{i}/up/status", b"\xff\xfe" if i == 2 else b"{}",
                                      400, _answer(field="state"))
        assert await letters.keep("fog-mdms-ingest", "meters/m-9/up/reading", b"{}", 400,
                                  _answer(dead_letter_id="1-0"))  # the function kept it
        assert letters.kept == 3
        first, cursor = await letters.newest(2)
        assert [e.topic for e in first] == ["meters/m-2/up/status", "meters/m-1/up/status"]
        assert first[0].to_dict()["payload_base64"] == "//4="
        assert first[1].to_dict()["payload"] == "{}"
        assert first[1].reason.startswith('{"error": "invalid_input"')
        rest, end = await letters.newest(2, cursor)
        assert [e.topic for e in rest] == ["meters/m-0/up/status"]
        assert end is None
    finally:
        await client.aclose()


async def test_a_large_payload_is_cut_and_flagged(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        letters = ConnectorDeadLetters("edge", client)
        assert await letters.keep("edge-ingest", "meters/m-1/up/reading", b"x" * (PAYLOAD_MAX_BYTES + 10), 413,
                                  b"too large")
        [entry], _ = await letters.newest(10)
        assert entry.truncated
        assert len(entry.payload) == PAYLOAD_MAX_BYTES
        assert entry.status == 413
    finally:
        await client.aclose()


async def test_an_unreachable_redis_is_reported_so_the_message_stays_unacknowledged() -> None:
    client = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        letters = ConnectorDeadLetters("edge", client)
        assert not await letters.keep("edge-ingest", "meters/m-1/up/status", b"{}", 400, b"bad")
        assert letters.kept == 0
    finally:
        await client.aclose()
