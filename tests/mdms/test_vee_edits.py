"""VEE editing and dead letters of the MDMS ingest: audited edits, replay, edits during an archive (real Redis)."""

from __future__ import annotations

import time

import pytest

from metertwin.mdms.settings import reset_mdms_settings
from tests.invoke import call
from tests.mdms.mdms_fixtures import (
    INTERVAL_S,
    day_start,
    dead_letters,
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


def test_edit_with_audit_trail(meter_id: str) -> None:
    register(meter_id)
    t0 = day_start(1) + 3600
    for i in range(3):
        publish(meter_id, reading(i, t0 + i * INTERVAL_S, 10.0 + i))
    tok = token("mdms", sub="operator-anna")
    status, body = call(ingest_handler(), "POST", f"/meters/{meter_id}/edits", token=tok,
                        body={"ts": t0 + INTERVAL_S, "import_kwh": 11.25, "reason": "meter swap correction"})
    assert status == 201, body
    assert body["old"]["import_kwh"] == 11.0
    assert body["new"]["import_kwh"] == 11.25
    rows = query_rows(meter_id, t0, t0 + 2 * INTERVAL_S)
    assert [(r["import_kwh"], r["quality"]) for r in rows] == [(10.0, "valid"), (11.25, "edited"), (12.0, "valid")]
    status, trail = call(ingest_handler(), "GET", f"/meters/{meter_id}/edits", token=token("billing"))
    assert status == 200
    [entry] = trail["edits"]
    assert entry["who"] == "operator-anna"
    assert entry["reason"] == "meter swap correction"
    assert (entry["old"]["import_kwh"], entry["new"]["import_kwh"]) == (11.0, 11.25)
    assert abs(entry["at"] - time.time()) < 60
    # An edit may not make the registers go backwards.
    status, body = call(ingest_handler(), "POST", f"/meters/{meter_id}/edits", token=tok,
                        body={"ts": t0 + INTERVAL_S, "import_kwh": 12.5, "reason": "typo"})
    assert status == 400
    assert "backwards" in body["message"]


def test_edit_needs_mdms_scope_an_existing_row_and_a_reason(meter_id: str) -> None:
    register(meter_id)
    t = time.time() - 100
    publish(meter_id, reading(1, t, 1.0))
    h = ingest_handler()
    body = {"ts": t, "import_kwh": 1.0, "reason": "fix"}
    assert call(h, "POST", f"/meters/{meter_id}/edits", body=body, token=token("consumer", meter=meter_id))[0] == 403
    assert call(h, "POST", f"/meters/{meter_id}/edits", body=body)[0] == 401
    status, resp = call(h, "POST", f"/meters/{meter_id}/edits", body={**body, "ts": t + 7}, token=token("mdms"))
    assert status == 404
    assert "no interval row" in resp["message"]
    status, resp = call(h, "POST", f"/meters/{meter_id}/edits", body={"ts": t, "import_kwh": 1.0},
                        token=token("mdms"))
    assert (status, resp["error"]) == (400, "invalid_input")
    assert "reason" in resp["message"]
    status, resp = call(h, "POST", f"/meters/{meter_id}/edits", body={"ts": t, "reason": "nothing"},
                        token=token("mdms"))
    assert status == 400


def test_dead_letter_list_replay_with_correction_and_discard(meter_id: str) -> None:
    register(meter_id)
    h = ingest_handler()
    t = time.time() - 600
    publish(meter_id, {**reading(1, t, 1.0), "voltage_v": "high"})
    publish(meter_id, reading(2, t + 7200, 2.0))  # future
    entries = dead_letters(meter_id)
    assert [e["rule"] for e in entries] == ["future", "schema"]  # newest first
    status, page = call(h, "GET", "/dead-letters", token=token("mdms"), query={"meter_id": meter_id, "limit": "1"})
    assert len(page["dead_letters"]) == 1
    status, page2 = call(h, "GET", "/dead-letters", token=token("mdms"),
                         query={"meter_id": meter_id, "limit": "1", "cursor": page["next_cursor"]})
    assert page2["dead_letters"][0]["rule"] == "schema"
    fixed = reading(1, t, 1.0)
    status, body = call(h, "POST", f"/dead-letters/{entries[1]['id']}/replay", token=token("mdms"),
                        body={"reading": fixed})
    assert (status, body["status"]) == (200, "accepted")
    status, body = call(h, "DELETE", f"/dead-letters/{entries[0]['id']}", token=token("mdms"))
    assert status == 200
    assert body["discarded"]["rule"] == "future"
    assert dead_letters(meter_id) == []
    assert call(h, "DELETE", f"/dead-letters/{entries[0]['id']}", token=token("mdms"))[0] == 404
    assert call(h, "POST", "/dead-letters/not-an-id/replay", token=token("mdms"))[0] == 400
    assert call(h, "GET", "/dead-letters", token=token("mdms"), query={"limit": "0"})[0] == 400
    assert call(h, "GET", "/dead-letters", token=token("billing"))[0] == 403
    assert call(h, "POST", "/dead-letters/replay", token=token("mdms"), body={})[0] == 400
    assert call(h, "POST", "/dead-letters/replay", token=token("mdms"), body=b"[")[0] == 400


def test_replay_many_by_rule(meter_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MDMS_REQUIRE_REGISTERED_METER", "true")
    reset_mdms_settings()
    t = time.time() - 600
    for i in range(3):
        publish(meter_id, reading(i, t + i * 60, 1.0 + i))
    register(meter_id)
    status, body = call(ingest_handler(), "POST", "/dead-letters/replay", token=token("mdms"),
                        body={"meter_id": meter_id, "rule": "unknown_meter"})
    assert status == 200, body
    assert (body["replayed"], body["accepted"]) == (3, 3)
    status, body = call(ingest_handler(), "POST", "/dead-letters/replay", token=token("mdms"),
                        body={"ids": [r["id"] for r in body["results"]]})
    assert (status, body["skipped"]) == (200, 3)
    assert "does not exist" in body["results"][0]["reason"]
    assert [r["seq"] for r in query_rows(meter_id, t - 1, t + 600)] == [0, 1, 2]


def test_edit_routes_bad_input(meter_id: str) -> None:
    register(meter_id)
    h, tok = ingest_handler(), token("mdms")
    path = f"/meters/{meter_id}/edits"
    for body, needle in [
        (b"{", "not valid JSON"),
        (b"", "empty"),
        ({"ts": "noon", "import_kwh": 1.0, "reason": "x" * 5}, "ts"),
        ({"ts": 1.0, "import_kwh": "a lot", "reason": "fix it"}, "import_kwh"),
        ({"ts": 1.0, "import_kwh": -1, "reason": "fix it"}, "import_kwh"),
        ({"ts": 1.0, "import_kwh": 1.0, "reason": "fix it", "who": "me"}, "who"),
        ([1, 2], "body"),
    ]:
        status, resp = call(h, "POST", path, body=body, token=tok)
        assert status == 400, (body, resp)
        assert needle in resp["message"], resp
    status, resp = call(h, "POST", path, body=b"{" + b" " * 2_000_000 + b"}", token=tok)
    assert status == 413
    status, resp = call(h, "POST", "/meters/nobody-here/edits", token=tok,
                        body={"ts": 1.0, "import_kwh": 1.0, "reason": "fix it"})
    assert (status, resp["error"]) == (404, "unknown_meter")
    assert call(h, "GET", "/meters/nobody-here/edits", token=tok)[0] == 404
    assert call(h, "GET", path, token=tok, query={"limit": "many"})[0] == 400
    assert call(h, "PUT", path, token=tok, body={})[0] == 405


def test_rows_changed_while_the_archive_runs_stay_hot(meter_id: str) -> None:
    from metertwin.mdms import tiering

    register(meter_id)
    d = day_start(4)
    upload([reading(i, d + i * INTERVAL_S, 10.0 + i) for i in range(4)], meter_id)

    def meanwhile(step: str) -> None:
        if step == "verify":  # after the snapshot was written and checked, before the trim
            publish(meter_id, reading(100, d + 3 * INTERVAL_S + 60, 13.5))
            call(ingest_handler(), "POST", f"/meters/{meter_id}/edits", token=token("mdms"),
                 body={"ts": d + INTERVAL_S, "import_kwh": 11.5, "reason": "concurrent fix"})

    assert tiering.archive(fault=meanwhile)["rows_archived"] == 3
    rows = query_rows(meter_id, d, d + 4 * INTERVAL_S)
    assert [(r["import_kwh"], r["quality"], r["tier"]) for r in rows] == [
        (10.0, "valid", "cold"), (11.5, "edited", "hot"), (12.0, "valid", "cold"), (13.0, "valid", "cold"),
        (13.5, "valid", "hot")]
    assert tiering.archive()["rows_archived"] == 2
    assert [(r["import_kwh"], r["tier"]) for r in query_rows(meter_id, d, d + 4 * INTERVAL_S)] == [
        (10.0, "cold"), (11.5, "cold"), (12.0, "cold"), (13.0, "cold"), (13.5, "cold")]
