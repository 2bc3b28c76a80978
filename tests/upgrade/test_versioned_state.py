"""Versioned twin state against a real Redis: binding-aware ingest, migrations and the flip.

The manager's steps: tests/upgrade/test_upgrade_operations.py. End to end with the gateway and
simulated meters: tests/upgrade/test_upgrade.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from metertwin.core.clients import get_redis
from metertwin.twin import keys as twin_keys
from metertwin.twin.state import twin_store
from metertwin.upgrade import keys as upgrade_keys
from metertwin.upgrade import twin_v2
from metertwin.upgrade.binding import BindingMoved, bound_reading
from metertwin.upgrade.inbox import DRAIN_ONLY, v1_ingest
from metertwin.upgrade.migrations import migration
from tests.upgrade.upgrade_fixtures import bound, ingest, measurement, switching, twins

__all__ = ["twins"]  # a fixture: imported for pytest


# --- binding-aware ingest ------------------------------------------------------------------
def test_v1_ingest_applies_while_bound_and_parks_once_moved(twins: Callable[[int], list[str]]) -> None:
    (meter,) = twins(1)
    assert ingest("v1", meter, 0) == "applied"
    assert ingest("v1", meter, 0) == "duplicate"
    assert ingest("v2", meter, 1) == "parked"  # v2 called for a v1 meter: parked for v1
    assert ingest("v1", meter, 2) == "applied"  # v1 drains seq 1 first, then applies 2
    twin = twin_store(get_redis()).get(meter)
    assert twin.last_seq == 2
    assert not get_redis().exists(upgrade_keys.upgrade_inbox(meter))
    get_redis().hset(twin_keys.twin(meter), "b", "v2")
    assert ingest("v1", meter, 3) == "parked"
    with pytest.raises(BindingMoved) as moved:
        bound_reading(get_redis(), meter, "v1")
    assert moved.value.details["function"] == "edge-read-v2"
    assert moved.value.details["bound"] == "v2"


def test_drain_only_applies_parked_readings_in_order(twins: Callable[[int], list[str]]) -> None:
    (meter,) = twins(1)
    for seq in (5, 3, 4):
        assert ingest("v2", meter, seq) == "parked"
    outcome = v1_ingest(get_redis()).run(meter, "{}", 0.0, DRAIN_ONLY)
    assert (outcome.result, outcome.drained) == ("drained", 3)
    twin = twin_store(get_redis()).get(meter)
    assert twin.last_seq == 5
    assert twin.measurement is not None
    assert twin.measurement["power_w"] == 1205.0


def test_readings_out_of_order_are_applied_once_within_the_window(twins: Callable[[int], list[str]]) -> None:
    (meter,) = twins(1)
    results = [ingest("v1", meter, seq) for seq in (1, 2, 5, 3, 3, 4, 5)]
    assert results == ["applied", "applied", "applied", "applied", "duplicate", "applied", "duplicate"]
    assert ingest("v1", meter, 40) == "applied"
    assert ingest("v1", meter, 9) == "applied"  # 31 behind the newest: in the window
    assert ingest("v1", meter, 9) == "duplicate"
    assert ingest("v1", meter, 8) == "duplicate"  # 32 behind: out of the window, taken as applied
    assert ingest("v2", meter, 39) == "parked"
    get_redis().hset(twin_keys.twin(meter), "b", "v2")
    assert ingest("v2", meter, 38) == "applied"  # the window is the twin's, shared by releases
    assert ingest("v2", meter, 39) == "duplicate"  # the parked 39 was drained before 38 was applied
    assert twin_store(get_redis()).get(meter).last_seq == 40



def test_sync_migrates_v1_state_to_the_v2_schema_idempotently(twins: Callable[[int], list[str]]) -> None:
    (meter,) = twins(1)
    ingest("v1", meter, 7)
    switching(meter, phase="prepared")
    mig = migration(get_redis(), "v1", "v2")
    for _ in range(2):
        pipe = get_redis().pipeline(transaction=False)
        mig.sync_call(pipe, meter, "op1")
        assert pipe.execute()[0][0] == 1
        state = twin_v2.state(get_redis(), meter)
        assert (state["sv"], state["s"], state["iwh"], state["ewh"], state["n"]) == ("2", "7", "100007", "500", "0")
        assert [r["seq"] for r in twin_v2.history(get_redis(), meter)] == [7]
    pipe = get_redis().pipeline(transaction=False)
    mig.sync_call(pipe, meter, "another-op")
    assert pipe.execute()[0] == [0, "other operation"]


def test_flip_applies_parked_readings_with_the_new_release_exactly_once(twins: Callable[[int], list[str]]) -> None:
    (meter,) = twins(1)
    for seq in range(3):
        ingest("v1", meter, seq)
    switching(meter)
    get_redis().hset(upgrade_keys.upgrade_switch(meter), "s0", 2)
    assert ingest("v1", meter, 3) == "applied"  # still bound to v1: counted for v1
    # A reading parked by another front before the flip is the new release's to apply.
    get_redis().zadd(upgrade_keys.upgrade_inbox(meter), {f"4|{measurement(4)}": 4})
    mig = migration(get_redis(), "v1", "v2")
    assert mig.flip(meter, "op1", "rb.other.v2") == [0, "stale rebind id"]
    assert mig.flip(meter, "op1", "rb.op1.v2") == [1, "switched"]
    assert mig.flip(meter, "op1", "rb.op1.v2")[0] == 2  # idempotent
    assert bound(meter) == "v2"
    assert ingest("v1", meter, 4) == "parked"  # redelivered: v2 has it already
    assert ingest("v2", meter, 4) == "duplicate"
    assert ingest("v2", meter, 5) == "applied"
    sw = get_redis().hgetall(upgrade_keys.upgrade_switch(meter))
    assert (sw["phase"], sw["flip_seq"], sw["n:v1"], sw["n:v2"]) == ("switched", "3", "1", "2")
    assert [r["seq"] for r in twin_v2.history(get_redis(), meter)] == [3, 4, 5]
    # The base fields stay current for the capabilities v2 leaves unchanged.
    twin = twin_store(get_redis()).get(meter)
    assert twin.last_seq == 5
    assert twin.measurement is not None
    assert twin.measurement["power_w"] == 1205.0


def test_flip_back_migrates_down_and_restores_the_binding(twins: Callable[[int], list[str]]) -> None:
    (meter,) = twins(1)
    ingest("v1", meter, 0)
    switching(meter)
    mig = migration(get_redis(), "v1", "v2")
    mig.flip(meter, "op1", "rb.op1.v2")
    ingest("v2", meter, 1)
    # As if v2 had state the base fields lack: the down-migration takes the newest of both.
    get_redis().hset(twin_keys.twin(meter), "m", measurement(0))
    get_redis().hset(twin_keys.twin(meter), "s", 0)
    get_redis().zadd(upgrade_keys.upgrade_inbox(meter), {f"2|{measurement(2)}": 2})
    assert mig.flip_back(meter, "op1") == [1, "rolled_back"]
    assert bound(meter) == "v1"
    twin = twin_store(get_redis()).get(meter)
    assert twin.last_seq == 2
    assert twin.measurement is not None
    assert twin.measurement["power_w"] == 1202.0
    assert mig.flip_back(meter, "op1")[0] == 2
    assert mig.flip_back(meter, "someone-else") == [0, "other operation"]


# --- the manager ---------------------------------------------------------------------------
def test_read_v2_of_a_silent_meter_answers_504_with_the_stale_value(twins: Callable[[int], list[str]]) -> None:
    """The v2 read function's meter path: timeout and stale value, as v1 answers them."""
    from metertwin.core.auth import issue_token
    from tests.conftest import TEST_SIGNING_KEY
    from tests.invoke import call, load_handler

    (meter,) = twins(1)
    ingest("v1", meter, 1)
    switching(meter)
    assert migration(get_redis(), "v1", "v2").flip(meter, "op1", "rb.op1.v2")[0] == 1
    read_v2 = load_handler("read-v2")
    token = issue_token("t", {"utility"}, key=TEST_SIGNING_KEY)
    status, body = call(read_v2, "GET", f"/meters/{meter}/reading", token=token,
                        query={"max_age": "60", "timeout": "0.2"})
    assert status == 504
    assert body["details"] == {"meter_id": meter, "timeout_s": 0.2}
    assert body["stale"]["stale"] is True
    assert body["stale"]["reading"]["power_w"] == 1201.0
    status, body = call(read_v2, "GET", f"/meters/{meter}/reading", token=token, query={"max_age": "often"})
    assert status == 400
