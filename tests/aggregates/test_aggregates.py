"""Aggregates up the grid tree as readings arrive (real Redis): duplicates, reordering, moves."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from metertwin.grid import load
from metertwin.mdms import hot_store
from tests.aggregates.helpers import INTERVAL_S, aligned, drain, place, publish, reading, register, reset_grid
from tests.mdms.mdms_fixtures import mdms_env, upload

__all__ = ["mdms_env"]


@pytest.fixture(autouse=True)
def grid_env(mdms_env: dict[str, str]) -> Iterator[dict[str, str]]:
    reset_grid()
    yield mdms_env
    reset_grid()


def _energy(level: str, node: str, lo: float, hi: float) -> dict[str, float]:
    drain()
    rows = load.history(hot_store.get_hot_redis(), level, node, int(lo * 1000), int(hi * 1000), INTERVAL_S * 1000)
    return {r["start"]: r["import_kwh"] for r in rows}


def test_out_of_order_and_duplicate_readings_give_the_register_differences(meter_id: str) -> None:
    a, b = meter_id, meter_id + "b"
    for m in (a, b):
        register(m)
        place(m, 1)
    t0 = aligned(8)
    series = {a: [reading(i, t0 + i * INTERVAL_S, 100 + i * 0.5, power=400 + i, volt=230 + i) for i in range(7)],
              b: [reading(i, t0 + i * INTERVAL_S, 50 + i * 0.25, power=-300, volt=228) for i in range(7)]}
    messages = [(m, r) for m, rs in series.items() for r in rs]
    rng = random.Random(7)
    rng.shuffle(messages)
    messages += rng.sample(messages, 5)  # QoS 1 redeliveries
    for m, r in messages:
        status, body = publish(m, r)
        assert status == 200, body
    drain()
    got = _energy("transformer", "T1", t0, t0 + 7 * INTERVAL_S)
    # interval (t0 + (i-1) I, t0 + i I] gets each meter's register difference: 0.5 + 0.25
    assert got == {load.iso((t0 + (i - 1) * INTERVAL_S) * 1000): 0.75 for i in range(1, 7)}
    assert _energy("region", "R1", t0, t0 + 7 * INTERVAL_S) == got
    now = t0 + 6 * INTERVAL_S + 10
    s = load.summary(hot_store.get_hot_redis(), "feeder", "F1", now_s=now)
    assert (s["import_w"], s["export_w"], s["net_w"]) == (406.0, 300.0, 106.0)
    assert (s["meters"], s["reporting"], s["online"], s["stale"]) == (2, 2, 2, 0)
    assert (s["voltage_min_v"], s["voltage_max_v"], s["voltage_max_meter"]) == (228.0, 236.0, a)
    rows = load.history(hot_store.get_hot_redis(), "feeder", "F1", int(t0 * 1000), int(now * 1000),
                        INTERVAL_S * 1000)
    assert [r["readings"] for r in rows] == [2] * 6  # duplicates not counted; t0's reading is the interval before
    assert (rows[-1]["voltage_min_v"], rows[-1]["voltage_max_v"]) == (228.0, 236.0)


def test_batch_upload_aggregates_like_single_readings(meter_id: str) -> None:
    register(meter_id)
    place(meter_id, 1)
    t0 = aligned(6)
    rows = [reading(i, t0 + i * INTERVAL_S, 10 + i, power=1000) for i in range(5)]
    upload(rows[::-1], meter_id)
    upload(rows, meter_id)  # all duplicates
    assert sum(_energy("substation", "S1", t0, t0 + 5 * INTERVAL_S).values()) == 4.0  # drains
    assert load.summary(hot_store.get_hot_redis(), "substation", "S1")["import_w"] == 1000.0


def test_a_meter_moving_transformers_takes_its_load_along(meter_id: str) -> None:
    register(meter_id)
    place(meter_id, 1, transformer="T1")
    t0 = aligned(5)
    publish(meter_id, reading(1, t0, 100, power=2000))
    publish(meter_id, reading(2, t0 + INTERVAL_S, 101, power=2000))
    drain()
    r = hot_store.get_hot_redis()
    assert load.summary(r, "transformer", "T1")["import_w"] == 2000.0
    assert place(meter_id, 2, transformer="T2")
    assert not place(meter_id, 1, transformer="T9")  # an older version arriving late is ignored
    t1, t2 = load.summary(r, "transformer", "T1"), load.summary(r, "transformer", "T2")
    assert (t1["import_w"], t1["meters"]) == (0.0, 0)
    assert (t2["import_w"], t2["meters"]) == (2000.0, 1)
    assert load.summary(r, "feeder", "F1")["meters"] == 1
    publish(meter_id, reading(3, t0 + 2 * INTERVAL_S, 103, power=500))
    drain()
    assert sum(_energy("transformer", "T1", t0, t0 + 3 * INTERVAL_S).values()) == 1.0
    assert sum(_energy("transformer", "T2", t0, t0 + 3 * INTERVAL_S).values()) == 2.0
    assert sum(_energy("feeder", "F1", t0, t0 + 3 * INTERVAL_S).values()) == 3.0
    assert load.summary(r, "transformer", "T2")["import_w"] == 500.0


def test_a_drain_that_died_before_its_acknowledgements_counts_once_when_run_again(meter_id: str) -> None:
    from metertwin.grid import agg_scripts, aggregates, keys

    register(meter_id)
    place(meter_id, 1)
    t0 = aligned(4)
    publish(meter_id, reading(1, t0, 100, power=100))
    publish(meter_id, reading(2, t0 + INTERVAL_S, 101.5, power=300))
    r = hot_store.get_hot_redis()
    box: list[str] = r.zrange(keys.meter_outbox(meter_id), 0, -1)  # type: ignore[assignment]
    assert len(box) == 2
    # the node half of a drain ran, then the process died (no acknowledgement, still dirty)
    batches, _tops = aggregates.node_batches({meter_id: box})
    node = r.register_script(agg_scripts.NODE)
    for (level, name), argv in batches.items():
        node(keys=aggregates._node_keys(level, name), args=["0", *argv])
    assert drain() == {"meters": 1, "entries": 2}
    assert r.zcard(keys.meter_outbox(meter_id)) == 0
    assert sum(_energy("transformer", "T1", t0, t0 + 2 * INTERVAL_S).values()) == 1.5
    assert load.summary(r, "transformer", "T1")["import_w"] == 300.0


def test_a_lost_dirty_mark_is_restored_by_the_redelivery(meter_id: str) -> None:
    from metertwin.grid import keys

    register(meter_id)
    place(meter_id, 1)
    t0 = aligned(4)
    publish(meter_id, reading(1, t0, 100, power=100))
    publish(meter_id, reading(2, t0 + INTERVAL_S, 102, power=100))
    r = hot_store.get_hot_redis()
    r.srem(keys.DIRTY, meter_id)  # the process died between the MDMS script and the set's SADD
    assert drain()["entries"] == 0
    assert publish(meter_id, reading(2, t0 + INTERVAL_S, 102, power=100))[1]["status"] == "duplicate"
    assert sum(_energy("transformer", "T1", t0, t0 + 2 * INTERVAL_S).values()) == 2.0


def test_an_unplaced_meter_aggregates_nowhere_until_placed(meter_id: str) -> None:
    register(meter_id)
    t0 = aligned(3)
    publish(meter_id, reading(1, t0, 1, power=700))
    drain()
    with pytest.raises(Exception, match="no aggregates"):
        load.summary(hot_store.get_hot_redis(), "transformer", "T1")
    place(meter_id, 1)
    assert load.summary(hot_store.get_hot_redis(), "transformer", "T1")["import_w"] == 700.0


def test_a_replayed_drain_after_a_move_does_not_bring_the_meter_back(meter_id: str) -> None:
    from metertwin.grid import agg_scripts, aggregates, keys

    register(meter_id)
    place(meter_id, 1, transformer="T1")
    t0 = aligned(4)
    publish(meter_id, reading(1, t0, 100, power=400))
    r = hot_store.get_hot_redis()
    box: list[str] = r.zrange(keys.meter_outbox(meter_id), 0, -1)  # type: ignore[assignment]
    drain()
    place(meter_id, 2, transformer="T2")  # entry 2: leave T1, set T2 (applied at once)
    # an old drain's batch arriving late (entry 1: set T1) changes nothing: T1 keeps its tombstone
    batches, _tops = aggregates.node_batches({meter_id: box})
    node = r.register_script(agg_scripts.NODE)
    for (level, name), argv in batches.items():
        node(keys=aggregates._node_keys(level, name), args=["0", *argv])
    t1 = load.summary(r, "transformer", "T1")
    assert (t1["meters"], t1["import_w"]) == (0, 0.0)
    assert load.summary(r, "transformer", "T2")["import_w"] == 400.0
    rows = load.history(r, "transformer", "T1", int((t0 - INTERVAL_S) * 1000), int((t0 + INTERVAL_S) * 1000),
                        INTERVAL_S * 1000)
    assert sum(row["readings"] for row in rows) == 1  # counted once, not again by the replay
