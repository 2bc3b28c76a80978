"""Edge input limits (issue 10, items 5-7): sequence numbers, timestamps and JSON depth at twin ingest,
and twin documents that always decode. Against real Redis and Mosquitto, through the functions' handlers."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from metertwin.core import json_limits
from metertwin.core.clients import get_redis
from metertwin.core.errors import InvalidInput
from metertwin.mdms.settings import MdmsSettings
from metertwin.twin import keys
from metertwin.twin.messages import CLOCK_SKEW_S, MAX_AGE_S, MAX_SEQ, TimestampRejected, TimestampRule
from metertwin.twin.state import twin_store
from tests.invoke import call, load_handler
from tests.twin.test_functions import provisioned, read, registry, token

__all__ = ["provisioned"]
ingest = load_handler("ingest")

#: (raw JSON of seq, a fragment the rejection must show): each once bricked a twin or was coerced.
BAD_SEQS = [
    ("1e17", "1e+17"),
    ("100000000000000000", "100000000000000000"),
    (str(2**63), str(2**63)),
    (str(2**64), str(2**64)),
    ("1" + "0" * 400, "1000000000"),
    ("1e400", "Infinity"),
    (str(MAX_SEQ + 1), str(MAX_SEQ + 1)),
    ("-1", "-1"),
    ('"3"', '"3"'),  # strict: a string is not coerced, at the edge as at the fog
    ("3.0", "3.0"),
    ("true", "true"),
    ("null", "null"),
]


def body_with(seq_json: str, ts: float | None = None) -> bytes:
    return (f'{{"seq": {seq_json}, "ts": {ts or time.time()!r}, "import_kwh": 1.5, "export_kwh": 0.0, '
            f'"power_w": 500.0, "voltage_v": 230.0}}').encode()


def send(meter_id: str, body: bytes | dict[str, Any]) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return call(ingest, "POST", "/", body=raw, token=token("service"),
                headers={"X-Topic": f"meters/{meter_id}/up/reading"})


def assert_twin_usable(meter_id: str, *, last_seq: int) -> None:
    """A normal reading after the bad one is applied, and the twin reads and deletes with 200."""
    status, body = send(meter_id, body_with(str(last_seq + 1)))
    assert (status, body["result"]) == (200, "applied"), body
    status, doc = call(read, "GET", f"/meters/{meter_id}/twin", token=token("utility"))
    assert status == 200, doc
    assert doc["metadata"]["last_seq"] == last_seq + 1
    status, meta = call(registry, "GET", f"/meters/{meter_id}", token=token("admin"))
    assert status == 200, meta
    status, gone = call(registry, "DELETE", f"/meters/{meter_id}", token=token("admin"))
    assert (status, gone["removed"]) == (200, True)


@pytest.mark.parametrize(("seq_json", "shown"), BAD_SEQS)
def test_bad_seq_is_rejected_and_the_twin_keeps_working(
    provisioned: dict[str, Any], meter_id: str, seq_json: str, shown: str
) -> None:
    status, body = send(meter_id, body_with(seq_json))
    assert status == 400, body
    assert "seq" in body["message"], body["message"]
    assert shown in body["message"], body["message"]
    assert get_redis().hget(keys.twin(meter_id), "s") == "-1"
    assert_twin_usable(meter_id, last_seq=0)


def test_the_highest_seq_is_stored_exactly(provisioned: dict[str, Any], meter_id: str) -> None:
    status, body = send(meter_id, body_with(str(MAX_SEQ - 1)))
    assert (status, body["result"]) == (200, "applied"), body
    assert get_redis().hget(keys.twin(meter_id), "s") == str(MAX_SEQ - 1)
    assert_twin_usable(meter_id, last_seq=MAX_SEQ - 1)


def test_corrupt_stored_fields_read_as_null_and_the_twin_deletes(provisioned: dict[str, Any], meter_id: str) -> None:
    # What a twin looked like after a 1e17 seq (and worse): every read and the delete must still answer.
    get_redis().hset(keys.twin(meter_id), mapping={"s": "1e+17", "m": "{broken", "p": "[1]", "r": '{"x": 5}',
                                                   "d": "not json", "c": "yesterday"})
    status, doc = call(read, "GET", f"/meters/{meter_id}/twin", token=token("utility"))
    assert status == 200, doc
    assert doc["metadata"]["last_seq"] is None
    assert sorted(doc["metadata"]["corrupt"]) == ["c", "d", "m", "p", "r", "s"]
    assert "measurement" not in doc["state"]["reported"]
    assert doc["state"]["desired"] == {}
    status, meta = call(registry, "GET", f"/meters/{meter_id}", token=token("admin"))
    assert (status, meta["profile"], meta["created_at"]) == (200, {}, 0.0)
    assert twin_store(get_redis()).reading(meter_id).measurement is None
    status, gone = call(registry, "DELETE", f"/meters/{meter_id}", token=token("admin"))
    assert (status, gone["removed"]) == (200, True)
    assert not get_redis().exists(keys.twin(meter_id))


def test_sound_twin_has_no_corrupt_marker(provisioned: dict[str, Any], meter_id: str) -> None:
    send(meter_id, body_with("1"))
    status, doc = call(read, "GET", f"/meters/{meter_id}/twin", token=token("utility"))
    assert status == 200
    assert "corrupt" not in doc["metadata"]


# --- item 6: one timestamp rule --------------------------------------------------------------
@pytest.mark.parametrize(("ts", "rule", "shown"), [
    (99_999_999_999.0, "future", "99999999999.0"),  # the year 5138
    (86_400.0, "too_old", "86400.0"),  # 2 January 1970
    (1e300, "future", "1e+300"),  # beyond the calendar: still a 400 naming it
])
def test_edge_rejects_what_the_fog_rejects(
    provisioned: dict[str, Any], meter_id: str, ts: float, rule: str, shown: str
) -> None:
    send(meter_id, body_with("1"))
    before = twin_store(get_redis()).get(meter_id).measurement
    status, body = send(meter_id, body_with("2", ts))
    assert status == 400, body
    assert body["details"]["rule"] == rule, body
    assert shown in body["message"], body
    assert twin_store(get_redis()).get(meter_id).measurement == before  # the cache never holds it
    status, later = send(meter_id, body_with("3"))
    assert (status, later["result"]) == (200, "applied")


def test_the_cache_refuses_a_future_measurement(provisioned: dict[str, Any], meter_id: str) -> None:
    store = twin_store(get_redis())
    m = {"ts": time.time() + CLOCK_SKEW_S + 60, "import_kwh": 1.0, "export_kwh": 0.0, "power_w": 1.0,
         "voltage_v": 230.0}
    with pytest.raises(InvalidInput, match="clock skew"):
        store.report_measurement(meter_id, m, seq=None)
    with pytest.raises(InvalidInput, match="outside"):
        store.report_measurement(meter_id, {**m, "ts": time.time()}, seq=MAX_SEQ + 1)
    assert store.get(meter_id).measurement is None


def test_rule_is_the_fog_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MDMS_CLOCK_SKEW_S", raising=False)
    monkeypatch.delenv("MDMS_HORIZON_S", raising=False)
    fog = MdmsSettings()
    assert TimestampRule.from_env() == TimestampRule(fog.clock_skew_s, fog.horizon_s) == TimestampRule()
    assert (fog.clock_skew_s, fog.horizon_s) == (CLOCK_SKEW_S, MAX_AGE_S)
    monkeypatch.setenv("MDMS_CLOCK_SKEW_S", "30")
    monkeypatch.setenv("MDMS_HORIZON_S", "86400")
    fog = MdmsSettings()
    assert TimestampRule.from_env() == TimestampRule(fog.clock_skew_s, fog.horizon_s) == TimestampRule(30, 86400)
    now = time.time()
    with pytest.raises(TimestampRejected, match="in the future") as exc:
        TimestampRule.from_env().check(now + 31, now)
    assert exc.value.rule == "future"


# --- item 7: JSON depth ----------------------------------------------------------------------
def test_deep_rest_body_is_a_400_naming_the_depth(env: dict[str, str]) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    status, resp = call(registry, "POST", "/meters", body=body, token=token("admin"))
    assert (status, resp["error"]) == (400, "json_too_deep"), resp
    assert f"limit of {json_limits.MAX_DEPTH} levels" in resp["message"]
    deep_object = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    status, resp = call(registry, "POST", "/meters", body=deep_object, token=token("admin"))
    assert (status, resp["error"]) == (400, "json_too_deep"), resp


def test_deep_reading_is_a_400_at_the_edge(provisioned: dict[str, Any], meter_id: str) -> None:
    nested = "[" * 1500 + "]" * 1500
    body = body_with(f"1, \"x\": {nested}")
    assert 3000 < len(body) < 4096
    status, resp = send(meter_id, body)
    assert (status, resp["error"]) == (400, "json_too_deep"), resp
    # Brackets inside strings do not count; depth at the limit is still parsed (then judged by the schema).
    inside = json.dumps({"note": "[" * 2000})[1:-1]
    status, resp = send(meter_id, body_with(f"1, {inside}"))
    assert (status, resp["error"]) == (400, "invalid_input"), resp
    assert "note" in resp["message"], resp
    at_limit = "[" * (json_limits.MAX_DEPTH - 1) + "]" * (json_limits.MAX_DEPTH - 1)  # + the object: the limit
    status, resp = send(meter_id, body_with(f"1, \"x\": {at_limit}"))
    assert (status, resp["error"]) == (400, "invalid_input"), resp


def test_huge_integer_literal_is_a_400(env: dict[str, str]) -> None:
    body = b'{"meter_id": ' + b"9" * 5000 + b"}"
    status, resp = call(registry, "POST", "/meters", body=body, token=token("admin"))
    assert (status, resp["error"]) == (400, "invalid_input"), resp
    assert "number out of range" in resp["message"]


def test_non_finite_stored_numbers_read_as_null_not_as_invalid_json(provisioned: dict[str, Any],
                                                                     meter_id: str) -> None:
    """Found by the outside probe: a stored 'nan' created_at (or NaN inside a stored document) parsed
    as a float and went out as a bare NaN, which is not JSON (JSON.parse and strict parsers refuse)."""
    get_redis().hset(keys.twin(meter_id), mapping={"c": "nan", "r": '{"online": [true, NaN]}',
                                                   "m": '{"ts": Infinity, "import_kwh": 1}'})
    status, meta = call(registry, "GET", f"/meters/{meter_id}", token=token("admin"))
    assert (status, meta["created_at"]) == (200, 0.0)
    status, doc = call(read, "GET", f"/meters/{meter_id}/twin", token=token("utility"))
    assert status == 200, doc
    assert sorted(doc["metadata"]["corrupt"]) == ["c", "m", "r"]
    json.dumps(doc, allow_nan=False)
    json.dumps(meta, allow_nan=False)
