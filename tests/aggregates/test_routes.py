"""fog-grid routes (real Redis, S3): node summaries, load JSON and CSV, places, archive, edge sync."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import pytest

from metertwin.core import clients
from metertwin.fleet.topology import topology_store
from metertwin.grid import archive, places
from metertwin.mdms import hot_store
from metertwin.twin.state import twin_store
from tests.aggregates.helpers import (
    INTERVAL_S,
    aligned,
    drain,
    get,
    place,
    publish,
    reading,
    register,
    reset_grid,
    token,
)
from tests.invoke import call, load_handler
from tests.mdms.mdms_fixtures import mdms_env

__all__ = ["mdms_env"]


@pytest.fixture(autouse=True)
def grid_env(mdms_env: dict[str, str]) -> Iterator[dict[str, str]]:
    reset_grid()
    yield mdms_env
    reset_grid()


def _feed(meter_id: str, n: int = 5, power: float = 1200.0) -> float:
    register(meter_id)
    place(meter_id, 1, feeder="F 1/a")
    t0 = aligned(n + 1)
    for i in range(n):
        status, body = publish(meter_id, reading(i, t0 + i * INTERVAL_S, 10 + i * 0.3, power=power))
        assert status == 200, body
    drain()
    return t0


def test_summary_and_load_as_json_and_csv(meter_id: str) -> None:
    t0 = _feed(meter_id)
    status, body = get("/feeders/F%201%2Fa")
    assert status == 200, body
    assert (body["import_w"], body["meters"], body["level"]) == (1200.0, 1, "feeder")
    q = {"from": str(t0), "to": str(t0 + 5 * INTERVAL_S)}
    status, body = get("/transformers/T1/load", **q)
    assert status == 200, body
    assert [r["import_kwh"] for r in body["rows"]] == [0.3] * 4
    status, text = call(load_handler("grid"), "GET", "/transformers/T1/load", token=token("mdms"), query=q,
                        headers={"Accept": "text/csv"})
    assert status == 200, text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [float(r["import_kwh"]) for r in rows] == [0.3] * 4
    assert rows[0]["readings"] == "1"
    status, body = get("/regions/R1/load", interval="1h", **q)
    assert status == 200, body
    assert round(sum(r["import_kwh"] for r in body["rows"]), 6) == 1.2
    status, body = get("/substations", limit="10")
    assert body["nodes"] == ["S1"]


@pytest.mark.parametrize(("path", "query", "field"), [
    ("/feeders/F1/load", {"interval": "7m"}, "interval"),
    ("/feeders/F1/load", {"from": "yesterday"}, "from"),
    ("/feeders/F1/load", {"from": "200", "to": "100"}, "from"),
    ("/feeders/F1/load", {"format": "xml"}, "format"),
    ("/feeders/{x}", {}, "node"),
])
def test_bad_queries_name_the_parameter(path: str, query: dict[str, str], field: str) -> None:
    status, body = get(path, **query)
    assert status == 400, body
    assert body["details"]["field"] == field


def test_unknown_node_and_consumer_token(meter_id: str) -> None:
    assert get("/transformers/nowhere")[0] == 404
    assert get("/transformers/T1", tok=token("consumer", meter=meter_id))[0] == 403


def test_place_put_is_versioned(meter_id: str) -> None:
    h = load_handler("grid")
    put = {"transformer": "T5", "feeder": "F5", "substation": "S5", "region": "R5", "v": 3}
    status, body = call(h, "PUT", f"/meters/{meter_id}/place", body=put, token=token("utility"))
    assert (status, body["changed"]) == (200, True)
    status, body = call(h, "PUT", f"/meters/{meter_id}/place", body={**put, "transformer": "T6", "v": 2},
                        token=token("utility"))
    assert (status, body["changed"], body["place"]["transformer"]) == (200, False, "T5")
    status, body = call(h, "PUT", f"/meters/{meter_id}/place", body={**put, "v": 0}, token=token("utility"))
    assert status == 400, body
    assert "v" in str(body)


def test_history_archived_to_s3_reads_back_merged(meter_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = _feed(meter_id, n=4)
    r = hot_store.get_hot_redis()
    q = {"from": str(t0), "to": str(t0 + 4 * INTERVAL_S)}
    before = get("/feeders/F%201%2Fa/load", **q)[1]["rows"]
    monkeypatch.setenv("GRID_HOT_RETENTION_S", "3600")
    reset_grid()
    out = archive.archive_all(r, now_s=t0 + 4 * INTERVAL_S + 3600 + INTERVAL_S)
    assert out["buckets"] > 0
    assert get("/feeders/F%201%2Fa/load", **q)[1]["rows"] == before  # now read from S3 (and what is left hot)
    # a late reading for an archived interval adds to the cold copy instead of replacing it
    publish(meter_id, reading(99, t0 + INTERVAL_S / 2, 10.1, power=1200))
    drain()
    after = get("/feeders/F%201%2Fa/load", **q)[1]["rows"]
    assert sum(x["readings"] for x in after) == sum(x["readings"] for x in before) + 1
    assert round(sum(x["import_kwh"] for x in after), 6) == round(sum(x["import_kwh"] for x in before), 6)


def test_places_follow_the_edge_topology(meter_id: str, env: dict[str, str]) -> None:
    edge = clients.get_redis()  # the test's edge and fog share one Redis; the keys differ
    twin_store(edge).create(meter_id, "edge-1", {})
    store = topology_store(edge)
    store.patch(meter_id, {"transformer": "TA", "feeder": "FA", "substation": "SA", "region": "RA"}, actor="t")
    fog = hot_store.get_hot_redis()
    assert places.sync_from_edge(fog, store)["changed"] == 1
    store.patch(meter_id, {"transformer": "TB"}, actor="t")
    assert places.sync_from_edge(fog, store)["changed"] == 1
    assert places.sync_from_edge(fog, store)["changes"] == 0
    assert get(f"/meters/{meter_id}/place")[1]["place"]["transformer"] == "TB"


def test_cron_tick_runs_every_step_even_when_the_edge_is_unreachable(meter_id: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _feed(meter_id, n=2)
    monkeypatch.setenv("GRID_EDGE_REDIS_URL", "redis://127.0.0.1:1/0")
    reset_grid()
    status, body = call(load_handler("grid"), "POST", "/", token=token("service"),
                        headers={"X-Connector": "cron-connector"})
    assert status == 200, body
    assert "error" in body["places"]
    assert body["drained"] == {"meters": 0, "entries": 0}
    assert body["rules"]["rules"] == 0
    assert "archive" in body
    status, body = call(load_handler("grid"), "POST", "/", token=token("service"))
    assert status == 400, body


def test_a_twin_deleted_and_provisioned_again_gets_its_new_place(meter_id: str, env: dict[str, str]) -> None:
    edge = clients.get_redis()
    twin_store(edge).create(meter_id, "edge-1", {})
    store = topology_store(edge)
    fog = hot_store.get_hot_redis()
    store.patch(meter_id, {"transformer": "TA", "feeder": "FA"}, actor="t")
    store.patch(meter_id, {"transformer": "TB"}, actor="t")  # topology v2
    places.sync_from_edge(fog, store)
    store.remove([meter_id], actor="registry")
    store.patch(meter_id, {"transformer": "TC", "feeder": "FA"}, actor="t")  # v1 again (often the same ms)
    synced = places.sync_from_edge(fog, store)
    assert get(f"/meters/{meter_id}/place")[1]["place"]["transformer"] == "TC", synced
    assert places.version_of("1796666396386-1") - places.version_of("1796666396386-0") == 1
    assert float(places.version_now()) != float(places.version_now() - 1)  # exact as a double (Lua)
