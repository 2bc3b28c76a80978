"""Twin state: shadow semantics, sequence dedupe, optimistic concurrency (real Redis)."""

from __future__ import annotations

import pytest

from metertwin.core.errors import UnknownMeter, VersionMismatch
from metertwin.twin.state import TwinStore
from tests.redis_backends import redis_client


@pytest.fixture
def store(redis_url: str) -> TwinStore:
    return TwinStore(redis_client(redis_url, decode_responses=True))


def measurement(ts: float, kwh: float = 1.0) -> dict[str, float]:
    return {"ts": ts, "import_kwh": kwh, "export_kwh": 0.0, "power_w": 500.0, "voltage_v": 231.0}


def test_create_is_idempotent_and_versioned(store: TwinStore, meter_id: str) -> None:
    assert store.create(meter_id, "edge", {"kind": "household"})
    assert not store.create(meter_id, "edge", {"kind": "other"})
    twin = store.get(meter_id)
    assert twin.version == 1
    assert twin.profile == {"kind": "household"}
    assert twin.measurement is None


def test_duplicate_sequence_is_counted_once(store: TwinStore, meter_id: str) -> None:
    store.create(meter_id, "edge", {})
    assert store.report_measurement(meter_id, measurement(100.0, 1.0), seq=1) == (True, 2)
    assert store.report_measurement(meter_id, measurement(100.0, 1.0), seq=1) == (False, 2)
    assert store.report_measurement(meter_id, measurement(160.0, 2.0), seq=2) == (True, 3)
    assert store.get(meter_id).measurement == measurement(160.0, 2.0)


def test_older_measurement_does_not_replace_newer(store: TwinStore, meter_id: str) -> None:
    store.create(meter_id, "edge", {})
    store.report_measurement(meter_id, measurement(200.0, 5.0), seq=None)
    store.report_measurement(meter_id, measurement(100.0, 4.0), seq=None)
    twin = store.get(meter_id)
    assert twin.measurement is not None
    assert twin.measurement["ts"] == 200.0


def test_delta_clears_when_meter_reports_matching_value(store: TwinStore, meter_id: str) -> None:
    store.create(meter_id, "edge", {})
    store.set_desired(meter_id, {"relay": "open", "load_limit_w": 3000})
    assert store.get(meter_id).delta == {"relay": "open", "load_limit_w": 3000}
    store.report(meter_id, {"relay": "open"})
    assert store.get(meter_id).delta == {"load_limit_w": 3000}
    store.report(meter_id, {"load_limit_w": 2000})
    assert store.get(meter_id).delta == {"load_limit_w": 3000}
    store.report(meter_id, {"load_limit_w": 3000})
    assert store.get(meter_id).delta == {}


def test_if_match_rejects_stale_version(store: TwinStore, meter_id: str) -> None:
    store.create(meter_id, "edge", {})
    v = store.set_desired(meter_id, {"relay": "closed"}, if_match=1)
    assert v == 2
    with pytest.raises(VersionMismatch, match="version 1 does not match"):
        store.set_desired(meter_id, {"relay": "open"}, if_match=1)
    assert store.get(meter_id).desired["relay"][0] == "closed"


def test_null_removes_desired_field(store: TwinStore, meter_id: str) -> None:
    store.create(meter_id, "edge", {})
    store.set_desired(meter_id, {"relay": "open"})
    store.set_desired(meter_id, {"relay": None})
    assert store.get(meter_id).desired == {}


def test_unknown_meter(store: TwinStore) -> None:
    with pytest.raises(UnknownMeter, match="'nope'"):
        store.get("nope")
    with pytest.raises(UnknownMeter):
        store.report_measurement("nope", measurement(1.0), seq=1)
    with pytest.raises(UnknownMeter):
        store.set_desired("nope", {"relay": "open"})


def test_twin_fits_in_one_kilobyte(store: TwinStore, redis_url: str, meter_id: str) -> None:
    store.create(meter_id, "edge", {"kind": "prosumer", "pv_kwp": 5.0, "tariff": "tou-2"})
    store.report_measurement(meter_id, measurement(1_700_000_000.123, 12345.678), seq=99)
    store.report(meter_id, {"relay": "closed", "reporting_interval_s": 900, "load_limit_w": None, "online": True})
    store.set_desired(meter_id, {"reporting_interval_s": 300})
    client = redis_client(redis_url)
    from metertwin.twin import keys

    assert client.memory_usage(keys.twin(meter_id)) <= 1024
