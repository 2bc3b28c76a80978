"""Tiering and the archive protocol against real Redis and a real S3 endpoint (moto server)."""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import pyarrow.parquet as pq
import pytest

from metertwin.mdms import cold_store, hot_store, keys, tiering
from metertwin.mdms.intervals import day_of
from metertwin.mdms.settings import reset_mdms_settings
from storage.embedded import free_port
from tests.invoke import call
from tests.mdms.mdms_fixtures import (
    INTERVAL_S,
    archive_handler,
    day_series,
    day_start,
    hot,
    ingest_handler,
    mdms_env,
    query_rows,
    register,
    reset_mdms,
    token,
    upload,
)

__all__ = ["mdms_env"]
pytestmark = pytest.mark.usefixtures("mdms_env")

KEEP = ("seq", "ts_ms", "import_kwh", "export_kwh", "power_w", "voltage_v", "quality")


def _strip(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [tuple(r[k] for k in KEEP) for r in rows]


def _load(meter_id: str, days_ago: int, n: int = 96, seq0: int = 0, imp0: float = 100.0) -> list[dict[str, Any]]:
    """A day of 15-minute readings ``days_ago`` days back, ingested; returns them."""
    register(meter_id)
    rows = day_series(meter_id, day_start(days_ago), n, seq0=seq0, imp0=imp0)
    body = upload(rows, meter_id)
    assert body["accepted"] == n
    return rows


def _hot_count(meter_id: str) -> int:
    return int(hot().zcard(keys.mdms_intervals(meter_id)))


def _objects(prefix: str = "") -> list[str]:
    from metertwin.mdms.settings import get_mdms_settings

    return [k for k, _ in cold_store.list_keys(f"{get_mdms_settings().cold_prefix}/{prefix}")]


def test_rarely_read_days_go_cold_and_queries_return_exactly_what_went_in(meter_id: str) -> None:
    old = _load(meter_id, 5)
    recent = _load(meter_id, 1, n=8, seq0=1000, imp0=500.0)
    lo, hi = day_start(5), time.time()
    before = query_rows(meter_id, lo, hi)
    assert len(before) == 96 + 8

    report = tiering.archive()
    assert report["status"] == "ok", report
    assert report["decisions"] == {"archive:rarely_read": 1, "keep:young": 1}
    assert report["rows_archived"] == 96
    assert _hot_count(meter_id) == 8

    after = query_rows(meter_id, lo, hi)
    assert _strip(after) == _strip(before)
    assert {r["tier"] for r in after[:96]} == {"cold"}
    assert {r["tier"] for r in after[96:]} == {"hot"}
    assert [r["seq"] for r in after] == [r["seq"] for r in old + recent]
    # Partitioned by zone, date and meter bucket; one data object and one manifest.
    p = cold_store.partition_of(meter_id, day_of(int(day_start(5) * 1000)))
    assert p.zone == "fog-1"
    data = _objects("data/")
    assert len(data) == 1
    assert data[0].startswith(f"mdms/v1/data/{p.label()}/part-")
    manifest = cold_store.read_manifest(p)
    assert manifest is not None
    assert manifest["rows"] == 96
    assert manifest["meters"][meter_id]["rows"] == 96
    table = pq.read_table(io.BytesIO(cold_store.get(data[0]) or b""))
    assert table.num_rows == 96
    assert table.column_names == [f.name for f in cold_store.SCHEMA]


@pytest.mark.parametrize("step", tiering.STEPS)
def test_crash_at_each_archive_step_loses_and_duplicates_nothing(
    meter_id: str, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This test reads often to check; those reads must not keep data hot or bring them back.
    monkeypatch.setenv("MDMS_TIER_HOT_READS", "1000")
    monkeypatch.setenv("MDMS_REHYDRATE_READS", "1000")
    reset_mdms_settings()
    _load(meter_id, 4)
    lo, hi = day_start(4), day_start(3)
    before = _strip(query_rows(meter_id, lo, hi))
    # A first archive of the same partition so that a superseded object exists for cleanup.
    first_day = _load(meter_id, 8, n=4, seq0=5000, imp0=10.0)
    assert tiering.archive()["status"] == "ok"
    late = day_series(meter_id, day_start(8) + 4 * INTERVAL_S, 4, seq0=6000, imp0=11.0)
    assert upload(late, meter_id)["accepted"] == 4
    _load(meter_id, 1, n=2, seq0=9000, imp0=900.0)
    hot_before = _hot_count(meter_id)

    class Crash(Exception):
        pass

    def fault(at: str) -> None:
        if at == step:
            raise Crash(at)

    with pytest.raises(Crash):
        tiering.archive(fault=fault)
    # Whatever step it died at, every reading is still there exactly once.
    assert _strip(query_rows(meter_id, lo, hi)) == before
    six = query_rows(meter_id, day_start(8), day_start(7))
    assert [r["seq"] for r in six] == [r["seq"] for r in first_day + late]
    if tiering.STEPS.index(step) < tiering.STEPS.index("trim"):
        assert _hot_count(meter_id) == hot_before

    report = tiering.archive()
    assert report["status"] == "ok", report
    assert _hot_count(meter_id) == 2
    assert _strip(query_rows(meter_id, lo, hi)) == before
    assert [r["seq"] for r in query_rows(meter_id, day_start(8), day_start(7))] == [r["seq"] for r in first_day + late]
    assert {r["tier"] for r in query_rows(meter_id, lo, hi)} == {"cold"}
    # No orphan objects: one per partition.
    assert len(_objects("data/")) == 2


def test_s3_unreachable_leaves_data_hot_and_the_next_run_completes(
    meter_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _load(meter_id, 3)
    before = _strip(query_rows(meter_id, day_start(3), day_start(2)))
    url = os.environ["S3_ENDPOINT_URL"]
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MDMS_S3_TIMEOUT_S", "1")
    reset_mdms()
    status, body = call(archive_handler(), "POST", "/", token=token("service"),
                        headers={"X-Connector": "cron-connector"})
    assert status == 503
    assert body["status"] == "failed"
    assert "cold store" in body["failed"][0]["error"]
    assert _hot_count(meter_id) == 96
    assert _strip(query_rows(meter_id, day_start(3), day_start(2))) == before
    monkeypatch.setenv("S3_ENDPOINT_URL", url)
    reset_mdms()
    status, body = call(archive_handler(), "POST", "/", token=token("service"),
                        headers={"X-Connector": "cron-connector"})
    assert (status, body["status"], body["rows_archived"]) == (200, "ok", 96)
    assert _hot_count(meter_id) == 0
    assert _strip(query_rows(meter_id, day_start(3), day_start(2))) == before


def test_often_read_days_stay_hot_until_retention(meter_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _load(meter_id, 3)
    for _ in range(3):
        query_rows(meter_id, day_start(3), day_start(2) - 1)
    decisions = tiering.plan()
    assert [(d.action, d.reason) for d in decisions] == [("keep", "read_often")]
    assert tiering.archive()["rows_archived"] == 0
    monkeypatch.setenv("MDMS_HOT_RETENTION_S", str(2 * 86_400))
    reset_mdms_settings()
    assert [(d.action, d.reason) for d in tiering.plan()] == [("archive", "retention")]
    assert tiering.archive()["rows_archived"] == 96


def test_cold_data_read_again_come_back_hot_for_a_while(meter_id: str) -> None:
    _load(meter_id, 3)
    lo, hi = day_start(3), day_start(2) - 1
    tiering.archive()
    assert _hot_count(meter_id) == 0
    assert {r["tier"] for r in query_rows(meter_id, lo, hi)} == {"cold"}  # read 1: served cold
    assert {r["tier"] for r in query_rows(meter_id, lo, hi)} == {"cold"}  # read 2: rehydrates
    third = query_rows(meter_id, lo, hi)
    assert {r["tier"] for r in third} == {"hot"}
    assert len(third) == 96
    tiers = call(load_query(), "GET", f"/meters/{meter_id}/tiers", token=token("mdms"))[1]
    [day] = tiers["days"]
    assert (day["tier"], day["next_archive"]["reason"]) == ("hot+cold", "rehydrated")
    assert tiering.archive()["rows_archived"] == 0
    # Once the rehydration has expired, the day goes cold again without rewriting the object.
    objects = _objects("data/")
    report = tiering.archive(now=time.time() + 8 * 86_400)  # past the read window too
    assert report["rows_archived"] == 96
    assert report["bytes_written"] == 0
    assert _objects("data/") == objects
    assert _strip(query_rows(meter_id, lo, hi)) == _strip(third)


def load_query() -> Any:
    from tests.mdms.mdms_fixtures import query_handler

    return query_handler()


def test_memory_budget_moves_the_oldest_days_first(meter_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for days_ago in (1, 2, 3):
        _load(meter_id, days_ago, seq0=days_ago * 1000, imp0=1000.0 - days_ago * 100)
    for _ in range(3):  # every day read often: only the budget moves them
        for days_ago in (2, 3):
            query_rows(meter_id, day_start(days_ago), day_start(days_ago - 1) - 1)
    monkeypatch.setenv("MDMS_TIER_MIN_AGE_S", "0")
    usage = int(hot().memory_usage(keys.mdms_intervals(meter_id), samples=0) or 0)
    monkeypatch.setenv("MDMS_HOT_MEMORY_BUDGET_BYTES", str(usage // 2))
    reset_mdms_settings()
    plan = {(d.day, d.action, d.reason) for d in tiering.plan()}
    oldest, middle, newest = (day_of(int(day_start(n) * 1000)) for n in (3, 2, 1))
    assert (oldest, "archive", "memory_budget") in plan
    assert (newest, "archive", "rarely_read") in plan
    assert (middle, "keep", "read_often") in plan
    report = tiering.archive()
    assert report["rows_archived"] == 192
    assert _hot_count(meter_id) == 96


def test_late_reading_and_edit_of_an_archived_day_are_merged_into_its_object(meter_id: str) -> None:
    rows = _load(meter_id, 4, n=8)
    tiering.archive()
    assert _hot_count(meter_id) == 0
    # An edit of a cold row: the edited row is hot and wins over the cold one.
    t = rows[3]["ts"]
    status, body = call(ingest_handler(), "POST", f"/meters/{meter_id}/edits", token=token("mdms"),
                        body={"ts": t, "import_kwh": rows[3]["import_kwh"] + 0.01, "reason": "cold correction"})
    assert status == 201, body
    q = query_rows(meter_id, day_start(4), day_start(3) - 1)
    assert len(q) == 8
    assert (q[3]["quality"], q[3]["tier"]) == ("edited", "hot")
    report = tiering.archive()
    assert report["rows_archived"] == 1
    q2 = query_rows(meter_id, day_start(4), day_start(3) - 1)
    assert _strip(q2) == _strip(q)
    assert (q2[3]["quality"], q2[3]["tier"]) == ("edited", "cold")
    assert len(_objects("data/")) == 1


def test_two_meters_share_a_partition_object(meter_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MDMS_METER_BUCKETS", "1")
    reset_mdms_settings()
    other = meter_id + "-b"
    _load(meter_id, 3, n=10)
    _load(other, 3, n=10, imp0=5.0)
    tiering.archive()
    assert len(_objects("data/")) == 1
    p = cold_store.partition_of(meter_id, day_of(int(day_start(3) * 1000)))
    manifest = cold_store.read_manifest(p)
    assert manifest is not None
    assert set(manifest["meters"]) == {meter_id, other}
    assert [r["import_kwh"] for r in query_rows(other, day_start(3), day_start(2))][:2] == [5.0, 5.25]


def test_archive_run_lock_and_routes(meter_id: str) -> None:
    _load(meter_id, 3, n=4)
    h = archive_handler()
    assert call(h, "POST", "/")[0] == 401
    assert call(h, "POST", "/", token=token("billing"))[0] == 403
    assert call(h, "POST", "/", headers={"X-Connector": "somebody"})[0] == 401
    assert call(h, "POST", "/", headers={"X-Connector": "cron-connector"})[0] == 401  # a header is no credential
    hot().set(keys.MDMS_ARCHIVE_LOCK, "other-run")
    status, body = call(h, "POST", "/", token=token("service"), headers={"X-Connector": "cron-connector"})
    assert (status, body["status"]) == (200, "skipped")
    hot().delete(keys.MDMS_ARCHIVE_LOCK)
    status, plan = call(h, "GET", "/plan", token=token("mdms"))
    assert status == 200
    assert plan["summary"] == {"archive:rarely_read": 1}
    assert plan["decisions"][0]["meter_id"] == meter_id
    status, body = call(h, "POST", "/run", token=token("mdms"))
    assert (status, body["rows_archived"]) == (200, 4)
    status, plan = call(h, "GET", "/plan", token=token("mdms"))
    assert plan["last_run"]["status"] == "ok"
    assert call(h, "GET", "/plan", token=token("consumer", meter=meter_id))[0] == 403
    assert call(h, "GET", "/nowhere", token=token("mdms"))[0] == 404
    assert hot_store.known_meter(meter_id)
    assert json.loads(json.dumps(plan))  # plain JSON all the way


def test_a_run_that_lost_its_lock_does_not_commit(meter_id: str) -> None:
    _load(meter_id, 3, n=6)

    def taken_over(step: str) -> None:
        if step == "verify":  # as if this run stalled past the lock TTL and another one started
            hot().set(keys.MDMS_ARCHIVE_LOCK, "another-run")

    report = tiering.archive(fault=taken_over)
    assert report["status"] == "failed"
    assert "no longer holds" in report["failed"][0]["error"]
    assert _hot_count(meter_id) == 6
    assert _objects("index/") == []
    assert hot().get(keys.MDMS_ARCHIVE_LOCK) == "another-run"  # not released by the loser
    hot().delete(keys.MDMS_ARCHIVE_LOCK)
    assert tiering.archive()["rows_archived"] == 6
