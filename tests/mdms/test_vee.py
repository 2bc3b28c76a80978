"""VEE rules of the MDMS ingest: validation, estimation, editing, dead letters (real Redis)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from metertwin.mdms import keys
from metertwin.mdms.settings import reset_mdms_settings
from tests.invoke import call
from tests.mdms.mdms_fixtures import (
    INTERVAL_S,
    counters,
    day_start,
    dead_letters,
    hot,
    ingest_handler,
    mdms_env,
    publish,
    query_rows,
    reading,
    register,
    token,
    upload,
)

__all__ = ["mdms_env"]
pytestmark = pytest.mark.usefixtures("mdms_env")


def test_valid_reading_is_stored_with_latest_registers_andcounters(meter_id: str) -> None:
    register(meter_id)
    t = time.time() - 60
    status, body = publish(meter_id, reading(1, t, 12.5, 0.5))
    assert status == 200, body
    assert body["status"] == "accepted"
    assert body["quality"] == "valid"
    latest = hot().hgetall(keys.mdms_latest(meter_id))
    assert float(latest["import_kwh"]) == 12.5
    assert latest["seq"] == "1"
    assert counters(meter_id)["accepted"] == 1
    rows = query_rows(meter_id, t - 1, t + 1)
    assert [(r["seq"], r["import_kwh"], r["quality"], r["tier"]) for r in rows] == [(1, 12.5, "valid", "hot")]


def test_qos1_redelivery_is_idempotent_and_counted_once(meter_id: str) -> None:
    register(meter_id)
    t = time.time() - 60
    payload = reading(7, t, 3.0)
    first = publish(meter_id, payload)
    second = publish(meter_id, payload)
    assert first[1]["status"] == "accepted"
    assert second == (200, {"status": "duplicate", "meter_id": meter_id, "seq": 7,
                            "ts": second[1]["ts"]})
    seen = counters(meter_id)
    assert seen["accepted"] == 1
    assert seen["duplicates"] == 1
    assert len(query_rows(meter_id, t - 10, t + 10)) == 1
    assert dead_letters(meter_id) == []


def test_sequence_number_reused_for_another_timestamp_is_rejected(meter_id: str) -> None:
    register(meter_id)
    t = time.time() - 120
    publish(meter_id, reading(5, t, 1.0))
    status, body = publish(meter_id, reading(5, t + 30, 1.1))
    assert status == 400
    assert body["error"] == "reading_rejected"
    assert body["details"]["rule"] == "sequence_reused"
    dl = dead_letters(meter_id)
    assert [d["rule"] for d in dl] == ["sequence_reused"]
    assert json.loads(dl[0]["payload"])["ts"] == t + 30


@pytest.mark.parametrize(
    ("payload", "rule", "needle"),
    [
        (b"{not json", "json", "not valid JSON"),
        (b"[1, 2]", "schema", "expected an object"),
        (json.dumps({"ts": 1.0, "seq": 1}).encode(), "schema", "import_kwh"),
        (json.dumps({**reading(1, 0, 1.0), "extra": 1}).encode(), "schema", "extra"),
        (json.dumps({**reading(1, 0, 1.0), "import_kwh": "lots"}).encode(), "schema", "import_kwh"),
        (json.dumps({**reading(1, 0, 1.0), "import_kwh": -1}).encode(), "range", "import_kwh"),
        (json.dumps({**reading(1, 0, 1.0), "voltage_v": 5000}).encode(), "range", "voltage_v"),
        (json.dumps({**reading(1, 0, 1.0), "seq": -3}).encode(), "range", "seq"),
    ],
)
def test_schema_and_range_violations_are_dead_lettered(meter_id: str, payload: bytes, rule: str, needle: str) -> None:
    register(meter_id)
    body = payload.replace(b'"ts": 0', f'"ts": {time.time() - 5}'.encode())
    status, resp = publish(meter_id, body)
    assert status == 400, resp
    assert resp["details"]["rule"] == rule
    assert needle in resp["message"]
    dl = dead_letters(meter_id)
    assert len(dl) == 1
    assert dl[0]["rule"] == rule
    assert dl[0]["source"] == "mqtt"
    assert counters(meter_id) == {"rejected": 1}
    assert dl[0]["topic"] == f"meters/{meter_id}/up/reading"


def test_clock_skew_and_horizon(meter_id: str) -> None:
    register(meter_id)
    now = time.time()
    assert publish(meter_id, reading(1, now + 120, 1.0))[1]["status"] == "accepted"  # within 300 s skew
    status, body = publish(meter_id, reading(2, now + 3600, 2.0))
    assert status == 400
    assert body["details"]["rule"] == "future"
    assert "in the future" in body["message"]
    status, body = publish(meter_id, reading(3, now - 40 * 86_400, 0.5))
    assert status == 400
    assert body["details"]["rule"] == "too_old"


def test_cumulative_registers_never_go_backwards(meter_id: str) -> None:
    register(meter_id)
    t = time.time() - 3600
    assert publish(meter_id, reading(1, t, 10.0, 1.0))[1]["status"] == "accepted"
    assert publish(meter_id, reading(3, t + 600, 12.0, 1.0))[1]["status"] == "accepted"
    status, body = publish(meter_id, reading(4, t + 900, 11.9, 1.0))
    assert status == 400
    assert body["details"]["rule"] == "register_backwards"
    assert "11.9" in body["message"]
    status, body = publish(meter_id, reading(5, t + 1200, 12.5, 0.9))  # export went backwards
    assert body["details"]["rule"] == "register_backwards"
    # A late reading between two others must fit between them.
    status, body = publish(meter_id, reading(2, t + 300, 12.2, 1.0))
    assert body["details"]["rule"] == "register_backwards"
    assert "later read" in body["message"]
    assert publish(meter_id, reading(2, t + 300, 11.0, 1.0))[1]["status"] == "accepted"
    assert [r["seq"] for r in query_rows(meter_id, t, t + 2000)] == [1, 2, 3]


def test_second_reading_at_a_taken_timestamp_is_rejected(meter_id: str) -> None:
    register(meter_id)
    t = time.time() - 100
    publish(meter_id, reading(1, t, 1.0))
    _status, body = publish(meter_id, reading(2, t, 1.0))
    assert body["details"]["rule"] == "timestamp_taken"


def test_unknown_meter_is_dead_lettered_and_replayable_once_registered(
    meter_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MDMS_REQUIRE_REGISTERED_METER", "true")
    reset_mdms_settings()
    t = time.time() - 100
    status, body = publish(meter_id, reading(1, t, 1.0))
    assert status == 400
    assert body["details"]["rule"] == "unknown_meter"
    dl_id = body["details"]["dead_letter_id"]
    # Still unknown: a replay is rejected again and the entry is replaced (attempts counted).
    status, again = call(ingest_handler(), "POST", f"/dead-letters/{dl_id}/replay", token=token("mdms"))
    assert status == 200
    assert again["status"] == "rejected"
    [entry] = dead_letters(meter_id)
    assert entry["attempts"] == 2
    register(meter_id)
    status, done = call(ingest_handler(), "POST", f"/dead-letters/{entry['id']}/replay", token=token("mdms"))
    assert (status, done["status"]) == (200, "accepted")
    assert dead_letters(meter_id) == []
    assert len(query_rows(meter_id, t - 1, t + 1)) == 1


def test_suspect_flags_voltage_and_implausible_demand(meter_id: str) -> None:
    register(meter_id)
    t = time.time() - 3600
    assert publish(meter_id, reading(1, t, 1.0, volt=290.0))[1]["quality"] == "suspect"
    assert publish(meter_id, reading(2, t + 60, 1.1))[1]["quality"] == "valid"
    # 10 kWh in 60 s is 600 kW: above MDMS_MAX_DEMAND_KW (100).
    assert publish(meter_id, reading(3, t + 120, 11.1))[1]["quality"] == "suspect"
    assert counters(meter_id)["suspect"] == 2


def test_gaps_are_estimated_linearly_and_replaced_by_late_reads(meter_id: str) -> None:
    register(meter_id)
    t0 = day_start(1) + 8 * 3600  # on an interval boundary
    publish(meter_id, reading(1, t0, 100.0))
    _status, body = publish(meter_id, reading(2, t0 + 4 * INTERVAL_S, 104.0, power=4000.0))
    assert body["estimated"] == 3
    rows = query_rows(meter_id, t0, t0 + 4 * INTERVAL_S)
    assert [(r["ts_ms"], r["import_kwh"], r["quality"], r["seq"]) for r in rows] == [
        (int(t0 * 1000), 100.0, "valid", 1),
        (int((t0 + 900) * 1000), 101.0, "estimated", None),
        (int((t0 + 1800) * 1000), 102.0, "estimated", None),
        (int((t0 + 2700) * 1000), 103.0, "estimated", None),
        (int((t0 + 3600) * 1000), 104.0, "valid", 2),
    ]
    assert rows[1]["power_w"] == pytest.approx(4000.0)
    # A late actual read at t0+30 min replaces the estimate there; the neighbours are re-estimated.
    assert publish(meter_id, reading(3, t0 + 1800, 103.0))[1]["status"] == "accepted"
    rows = query_rows(meter_id, t0, t0 + 4 * INTERVAL_S)
    assert [(r["import_kwh"], r["quality"]) for r in rows] == [
        (100.0, "valid"), (101.5, "estimated"), (103.0, "valid"), (103.5, "estimated"), (104.0, "valid"),
    ]
    # Readings closer than 1.5 intervals are not a gap.
    publish(meter_id, reading(4, t0 + 3600 + 1200, 104.5))
    assert len(query_rows(meter_id, t0 + 3600, t0 + 3600 + 1200)) == 2


def test_batch_upload_units_iso_times_and_per_item_rejections(meter_id: str) -> None:
    register(meter_id)
    t = day_start(1) + 7200
    items = [
        {"meter_id": meter_id, "seq": 2, "ts": t + 900, "import": 5250.0, "power": 1.0},
        {"meter_id": meter_id, "seq": 1, "ts": "{}".format(
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))), "import": 5000.0, "power": 1.0},
        {"meter_id": meter_id, "seq": 3, "ts": t + 1800, "import": "x", "power": 1.0},
        {"meter_id": meter_id, "seq": 4, "ts": t + 2700, "import": 5100.0, "power": 1.0},
    ]
    status, body = call(ingest_handler(), "POST", "/readings/batch", token=token("mdms"), body={
        "source": "hes-a", "units": {"energy": "Wh", "power": "kW"}, "readings": items})
    assert status == 200, body
    assert (body["received"], body["accepted"], body["rejected"]) == (4, 2, 2)
    rules = sorted(p["rule"] for p in body["not_accepted"])
    assert rules == ["register_backwards", "schema"]
    rows = query_rows(meter_id, t, t + 3600)
    assert [(r["seq"], r["import_kwh"], r["power_w"]) for r in rows] == [(1, 5.0, 1000.0), (2, 5.25, 1000.0)]
    assert {d["source"] for d in dead_letters(meter_id)} == {"batch:hes-a"}
    # Re-uploading the same file is idempotent.
    status, again = call(ingest_handler(), "POST", "/readings/batch", token=token("mdms"), body={
        "source": "hes-a", "units": {"energy": "Wh", "power": "kW"}, "readings": items[:2]})
    assert (again["accepted"], again["duplicate"]) == (0, 2)
    assert counters(meter_id)["accepted"] == 2


def test_batch_bad_input(meter_id: str) -> None:
    h = ingest_handler()
    tok = token("mdms")
    status, body = call(h, "POST", "/readings/batch", body=b"{oops", token=tok)
    assert (status, body["error"]) == (400, "invalid_input")
    assert "not valid JSON" in body["message"]
    status, body = call(h, "POST", "/readings/batch", body={"readings": "all of them"}, token=tok)
    assert status == 400
    assert "readings" in body["message"]
    status, body = call(h, "POST", "/readings/batch", body={"readings": []}, token=tok)
    assert status == 400
    status, body = call(h, "POST", "/readings/batch", token=tok,
                        body={"units": {"energy": "BTU"}, "readings": [{"meter_id": meter_id}]})
    assert status == 400
    assert "units.energy" in body["message"]
    too_many = [{"meter_id": meter_id, "seq": i, "ts": 1.0, "import": 1.0, "power": 1.0} for i in range(10_001)]
    status, body = call(h, "POST", "/readings/batch", body={"readings": too_many}, token=tok)
    assert (status, body["error"]) == (413, "payload_too_large")
    status, body = call(h, "POST", "/readings/batch", body=b"{" + b" " * (5 * 1_048_576) + b"}", token=tok)
    assert (status, body["error"]) == (413, "payload_too_large")
    consumer = token("consumer", meter=meter_id)
    assert call(h, "POST", "/readings/batch", body={"readings": [{}]}, token=consumer)[0] == 403


def test_mqtt_route_bad_input(meter_id: str) -> None:
    register(meter_id)
    h = ingest_handler()
    body = json.dumps(reading(1, time.time(), 1.0)).encode()
    status, resp = call(h, "POST", "/", body=body, token=token("service"), headers={"X-Topic": "nonsense"})
    assert status == 400
    assert "X-Topic" in resp["message"]
    status, resp = call(h, "POST", "/", body=body, token=token("service"),
                        headers={"X-Topic": f"meters/{meter_id}/up/status"})
    assert status == 400
    status, resp = call(h, "POST", "/", body=body, token=token("service"),
                        headers={"X-Topic": "meters/bad id/up/reading"})
    assert status == 400
    assert call(h, "POST", "/", body=body, headers={"X-Topic": f"meters/{meter_id}/up/reading"})[0] == 401
    assert publish(meter_id, body, tok=token("mdms"))[0] == 403
    status, resp = publish(meter_id, b"{" + b" " * 10_000 + b"}")
    assert (status, resp["error"]) == (413, "payload_too_large")
    [entry] = dead_letters(meter_id)
    assert (entry["rule"], entry["truncated"]) == ("oversized", True)


def test_meters_are_enrolled_by_their_first_reading_unless_registration_is_required(meter_id: str) -> None:
    assert publish(meter_id, reading(1, time.time() - 10, 1.0))[1]["status"] == "accepted"
    status, body = call(load_query(), "GET", f"/meters/{meter_id}/latest", token=token("mdms"))
    assert (status, body["registers"]["seq"]) == (200, 1)


def load_query() -> Any:
    from tests.mdms.mdms_fixtures import query_handler

    return query_handler()


def test_upload_helper_round_trip(meter_id: str) -> None:
    register(meter_id)
    t = day_start(2)
    body = upload([reading(i, t + i * INTERVAL_S, 1.0 + i) for i in range(4)], meter_id)
    assert body["accepted"] == 4


async def test_async_lane_of_the_mqtt_path_means_what_handle_means(meter_id: str) -> None:
    from starlette.datastructures import Headers, QueryParams

    from metertwin.mdms import hot_store
    from tests.invoke import Context, Event

    register(meter_id)
    h = ingest_handler()

    def event(payload: dict[str, Any] | bytes, *, path: str = "/", tok: str | None = None) -> Event:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return Event(body, Headers({"Authorization": f"Bearer {tok or token('service')}",
                                    "X-Topic": f"meters/{meter_id}/up/reading"}), "POST", QueryParams({}), path)

    try:
        t = time.time() - 60
        first = await h.handle_async(event(reading(1, t, 2.0)), Context())
        again = await h.handle_async(event(reading(1, t, 2.0)), Context())
        assert (first["statusCode"], first["body"]["status"]) == (200, "accepted")
        assert again["body"]["status"] == "duplicate"
        bad = await h.handle_async(event(reading(2, t + 60, 1.0)), Context())
        assert bad["statusCode"] == 400
        assert bad["body"]["details"]["rule"] == "register_backwards"
        assert bad["body"]["details"]["dead_letter_id"]
        junk = await h.handle_async(event(b"{"), Context())
        assert junk["body"]["details"]["rule"] == "json"
        assert (await h.handle_async(event(reading(3, t, 3.0), tok=token("mdms")), Context()))["statusCode"] == 403
        assert await h.handle_async(event({}, path="/readings/batch"), Context()) is NotImplemented
        assert [d["rule"] for d in dead_letters(meter_id)] == ["json", "register_backwards"]
        assert counters(meter_id)["accepted"] == 1
        assert counters(meter_id)["duplicates"] == 1
    finally:
        await hot_store.get_hot_redis_async().aclose()
