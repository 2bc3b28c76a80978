"""Fixtures and helpers shared by the MDMS tests (tests/test_mdms*.py, test_vee*, test_tou*, test_archive*).

Import the fixtures into a test module with ``from tests.mdms_fixtures import mdms_env``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from metertwin.core import auth
from metertwin.core.settings import reset_settings
from metertwin.mdms import cold_store, hot_store
from metertwin.mdms import keys as mdms_keys
from metertwin.mdms.settings import reset_mdms_settings
from metertwin.twin import keys
from storage.embedded import MotoS3
from tests.invoke import call, load_handler

DAY_S = 86_400
INTERVAL_S = 900


def reset_mdms() -> None:
    reset_settings()
    reset_mdms_settings()
    hot_store.reset_hot_redis()
    cold_store.reset_s3()


@pytest.fixture
def mdms_env(
    env: dict[str, str], s3_server: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """The fog MDMS environment: hot tier in the test Redis, cold tier in a bucket of its own."""
    values = {
        "ZONE": "fog-1",
        "S3_ENDPOINT_URL": s3_server.url,
        "S3_BUCKET": f"mt-{uuid.uuid4().hex[:12]}",
        "MDMS_INTERVAL_S": str(INTERVAL_S),
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    reset_mdms()
    yield {**env, **values}
    reset_mdms()


def hot() -> redis.Redis:
    return hot_store.get_hot_redis()


def register(meter_id: str) -> None:
    """What the registry does for a provisioned meter (the MDMS only checks existence)."""
    hot().hset(keys.registry_entry(meter_id), mapping={"zone": "edge-1"})


def token(*scopes: str, meter: str | None = None, sub: str = "tester") -> str:
    return auth.issue_token(sub, set(scopes), meter=meter)


def day_start(days_ago: int) -> float:
    """UTC midnight ``days_ago`` days before today (epoch seconds)."""
    today = int(time.time()) // DAY_S * DAY_S
    return float(today - days_ago * DAY_S)


def reading(
    seq: int, ts: float, imp: float, exp: float = 0.0, power: float = 500.0, volt: float = 231.0
) -> dict[str, Any]:
    return {"ts": ts, "seq": seq, "import_kwh": imp, "export_kwh": exp, "power_w": power, "voltage_v": volt}


def ingest_handler() -> Any:
    return load_handler("mdms-ingest")


def query_handler() -> Any:
    return load_handler("mdms-query")


def archive_handler() -> Any:
    return load_handler("mdms-archive")


def publish(meter_id: str, payload: dict[str, Any] | bytes, tok: str | None = None) -> tuple[int, Any]:
    """Invoke the ingest function as the MQTT connector does."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return call(ingest_handler(), "POST", "/", body=body, token=tok or token("service"),
                headers={"X-Topic": f"meters/{meter_id}/up/reading"})


def day_series(meter_id: str, start: float, n: int, *, seq0: int = 0, imp0: float = 100.0,
               step_kwh: float = 0.25) -> list[dict[str, Any]]:
    """``n`` readings every interval from ``start``."""
    return [reading(seq0 + i, start + i * INTERVAL_S, round(imp0 + i * step_kwh, 6)) for i in range(n)]


def upload(rows: list[dict[str, Any]], meter_id: str) -> dict[str, Any]:
    """Batch-upload readings (kWh) for one meter through the head-end route; asserts 200."""
    items = [{"meter_id": meter_id, "seq": r["seq"], "ts": r["ts"], "import": r["import_kwh"],
              "export": r["export_kwh"], "power": r["power_w"], "voltage": r["voltage_v"]} for r in rows]
    status, body = call(ingest_handler(), "POST", "/readings/batch", body={"readings": items}, token=token("mdms"))
    assert status == 200, body
    return dict(body)


def query_rows(meter_id: str, lo: float, hi: float, tok: str | None = None, **params: str) -> list[dict[str, Any]]:
    """Every row of a meter in [lo, hi], following cursors."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        q = {"from": str(lo), "to": str(hi), **params}
        if cursor:
            q["cursor"] = cursor
        status, body = call(query_handler(), "GET", f"/meters/{meter_id}/intervals", token=tok or token("mdms"),
                            query=q)
        assert status == 200, body
        out.extend(body["rows"])
        cursor = body["next_cursor"]
        if not cursor:
            return out


def counters(meter_id: str) -> dict[str, int]:
    """The meter's MDMS counters (accepted, duplicates, rejected, ...) as integers."""
    raw: dict[str, str] = hot().hgetall(mdms_keys.mdms_counters(meter_id))  # type: ignore[assignment]
    return {k: int(v) for k, v in raw.items()}


def dead_letters(meter_id: str) -> list[dict[str, Any]]:
    """The meter's dead letters, through the ingest function's REST route."""
    status, body = call(ingest_handler(), "GET", "/dead-letters", token=token("mdms"), query={"meter_id": meter_id})
    assert status == 200, body
    return list(body["dead_letters"])
