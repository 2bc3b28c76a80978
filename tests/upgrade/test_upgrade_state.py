"""Versioned twin state against a real Redis: binding-aware ingest, migrations, the flip, the manager's steps.

The meter's side is played by the test: the manager's ``publish`` hook hands each rebind to
a function that answers like a meter (``on_ack``), drops it (a missed rebind) or holds it.
End to end with the gateway and simulated meters: tests/test_upgrade.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from metertwin.core.clients import get_redis
from metertwin.core.errors import Conflict
from metertwin.twin import keys as twin_keys
from metertwin.twin.messages import CommandAck
from metertwin.twin.state import twin_store
from metertwin.upgrade import keys as upgrade_keys
from metertwin.upgrade import twin_v2
from metertwin.upgrade.binding import BindingMoved, bound_reading
from metertwin.upgrade.inbox import DRAIN_ONLY, v1_ingest
from metertwin.upgrade.migrations import migration
from metertwin.upgrade.operations import InjectedCrash, OperationSpec, UpgradeManager, stable_bucket


def measurement(seq: int, kwh: float | None = None) -> str:
    return json.dumps({"ts": 1_700_000_000.0 + seq, "import_kwh": kwh if kwh is not None else 100.0 + seq / 1000,
                       "export_kwh": 0.5, "power_w": 1200.0 + seq, "voltage_v": 231.0})


def ingest(release: str, meter_id: str, seq: int) -> str:
    script = v1_ingest(get_redis()) if release == "v1" else twin_v2.v2_ingest(get_redis())
    return script.run(meter_id, measurement(seq), 1_700_000_000.0 + seq, seq).result


@pytest.fixture
def twins(env: dict[str, str]) -> Callable[[int], list[str]]:
    counter = iter(range(1_000_000))

    def make(n: int) -> list[str]:
        ids = [f"up-{next(counter)}-{i}" for i in range(n)]
        for meter_id in ids:
            assert twin_store(get_redis()).create(meter_id, "edge", {})
        return ids

    return make


class Meters:
    """Plays the meters for the manager: acks rebinds at once unless told to drop or hold them."""

    def __init__(self) -> None:
        self.manager: UpgradeManager | None = None
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.drop: set[str] = set()
        self.held: list[tuple[str, dict[str, Any]]] = []
        self.hold = False
        self.bindings: dict[str, str] = {}

    def publish(self, meter_id: str, payload: dict[str, Any], ttl_s: int) -> None:
        self.sent.append((meter_id, payload))
        if meter_id in self.drop:
            self.drop.discard(meter_id)  # lost once (meter offline, message expired)
            return
        if self.hold:
            self.held.append((meter_id, payload))
            return
        self.answer(meter_id, payload)

    def answer(self, meter_id: str, payload: dict[str, Any]) -> None:
        assert self.manager is not None
        self.bindings[meter_id] = payload["params"]["version"]
        ack = CommandAck(id=payload["params"]["id"], status="applied", reported={"binding": self.bindings[meter_id]},
                         ts=time.time())
        self.manager.on_ack(meter_id, ack)

    def release_held(self) -> None:
        held, self.held = self.held, []
        for meter_id, payload in held:
            self.answer(meter_id, payload)


@pytest.fixture
def meters(env: dict[str, str]) -> Meters:
    return Meters()


def manager(meters: Meters, **kwargs: Any) -> UpgradeManager:
    mgr = UpgradeManager(get_redis(), instance="test-manager", publish=meters.publish,
                         metrics=lambda url: "", **kwargs)
    meters.manager = mgr
    return mgr


def spec(ids: list[str], **kwargs: Any) -> OperationSpec:
    return OperationSpec.model_validate({"to": "v2", "select": {"meters": ids}, "drain_s": 0,
                                         "resend_after_s": 0.1, **kwargs})


def bound(meter_id: str) -> str:
    return str(get_redis().hget(twin_keys.twin(meter_id), "b") or "v1")


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


# --- migration and flip --------------------------------------------------------------------
def _switch(meter: str, op: str = "op1", phase: str = "synced") -> None:
    get_redis().hset(upgrade_keys.upgrade_switch(meter), mapping={"op": op, "from": "v1", "to": "v2", "phase": phase,
                                                          "rid": f"rb.{op}.v2", "s0": "-1"})


def test_sync_migrates_v1_state_to_the_v2_schema_idempotently(twins: Callable[[int], list[str]]) -> None:
    (meter,) = twins(1)
    ingest("v1", meter, 7)
    _switch(meter, phase="prepared")
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
    _switch(meter)
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
    _switch(meter)
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
def test_upgrade_of_a_list_completes_and_counts_every_reading(
    twins: Callable[[int], list[str]], meters: Meters
) -> None:
    ids = twins(5)
    for meter_id in ids:
        ingest("v1", meter_id, 0)
    mgr = manager(meters)
    op = mgr.start(spec(ids))
    meters.hold = True
    mgr.advance(op["id"])
    for meter_id in ids:  # readings during the switch, before the meters confirm: still v1's
        assert ingest("v1", meter_id, 1) == "applied"
    meters.release_held()
    for meter_id in ids:  # after: v2's (the front parks them, v2 drains)
        assert ingest("v1", meter_id, 2) == "parked"
        assert twin_v2.v2_ingest(get_redis()).run(meter_id, "{}", 0, DRAIN_ONLY).drained == 1
    status = mgr.run(op["id"], timeout_s=20)
    assert status["state"] == "completed", status
    assert status["progress"]["done"] == 5
    assert status["readings"] == {"applied_by_old": 5, "applied_by_new": 5, "missing": 0}
    assert all(bound(m) == "v2" for m in ids)
    assert all(not get_redis().exists(upgrade_keys.upgrade_switch(m)) for m in ids)
    assert meters.bindings == dict.fromkeys(ids, "v2")


def test_canary_waits_for_promote_then_rolls_out(twins: Callable[[int], list[str]], meters: Meters) -> None:
    ids = twins(10)
    mgr = manager(meters)
    op = mgr.start(spec(ids, canary=3, batch=4))
    status = mgr.run(op["id"], timeout_s=20)
    assert status["state"] == "observing"
    assert sum(bound(m) == "v2" for m in ids) == 3
    assert any("promote" in b for b in status["blockers"])
    status = mgr.promote(op["id"])
    assert status["state"] == "rolling_out"
    status = mgr.run(op["id"], timeout_s=20)
    assert status["state"] == "completed"
    assert all(bound(m) == "v2" for m in ids)


def test_promote_during_the_canary_and_a_second_operation_are_refused(
    twins: Callable[[int], list[str]], meters: Meters
) -> None:
    ids = twins(4)
    mgr = manager(meters)
    meters.hold = True
    op = mgr.start(spec(ids, canary=2))
    mgr.advance(op["id"])
    with pytest.raises(Conflict, match=r"canary of operation \w+ is still running"):
        mgr.promote(op["id"])
    with pytest.raises(Conflict, match=f"operation {op['id']} is canary"):
        mgr.start(spec(ids))
    meters.release_held()


def test_percent_selection_is_stable(twins: Callable[[int], list[str]], meters: Meters) -> None:
    ids = twins(40)
    expected = {m for m in ids if stable_bucket(m) < 50}
    mgr = manager(meters)
    op = mgr.start(OperationSpec.model_validate({"to": "v2", "select": {"percent": 50}, "drain_s": 0}))
    status = mgr.run(op["id"], timeout_s=20)
    assert status["state"] == "completed"
    assert {m for m in ids if bound(m) == "v2"} == expected


def test_meter_that_misses_the_rebind_is_recovered_by_a_resend(
    twins: Callable[[int], list[str]], meters: Meters
) -> None:
    ids = twins(3)
    meters.drop = {ids[0]}
    mgr = manager(meters)
    op = mgr.start(spec(ids))
    status = mgr.run(op["id"], timeout_s=20)
    assert status["state"] == "completed"
    assert bound(ids[0]) == "v2"
    assert [m for m, _ in meters.sent].count(ids[0]) == 2


def test_meter_that_refuses_the_rebind_stays_on_v1(twins: Callable[[int], list[str]], meters: Meters) -> None:
    ids = twins(2)
    mgr = manager(meters)

    def refuse(meter_id: str, payload: dict[str, Any], ttl_s: int) -> None:
        ack = CommandAck.model_validate({"id": payload["params"]["id"], "reason": "firmware says no",
                                         "status": "rejected" if meter_id == ids[0] else "applied", "ts": time.time()})
        mgr.on_ack(meter_id, ack)

    mgr._publish = refuse
    op = mgr.start(spec(ids))
    status = mgr.run(op["id"], timeout_s=20)
    assert status["state"] == "completed"
    assert status["progress"]["failed"] == 1
    assert "firmware says no" in status["failures"][ids[0]]
    assert (bound(ids[0]), bound(ids[1])) == ("v1", "v2")
    assert not get_redis().exists(upgrade_keys.twin_v2(ids[0]))


def test_rollback_of_a_completed_operation_restores_v1(twins: Callable[[int], list[str]], meters: Meters) -> None:
    ids = twins(4)
    for meter_id in ids:
        ingest("v1", meter_id, 0)
    mgr = manager(meters)
    op = mgr.start(spec(ids))
    assert mgr.run(op["id"], timeout_s=20)["state"] == "completed"
    for meter_id in ids:
        ingest("v2", meter_id, 1)
    status = mgr.rollback(op["id"], "v2 misreads the export register")
    assert status["state"] == "rolling_back"
    status = mgr.run(op["id"], timeout_s=20)
    assert status["state"] == "rolled_back", status
    assert status["progress"]["rolled_back"] == 4
    assert all(bound(m) == "v1" for m in ids)
    assert all(twin_store(get_redis()).get(m).last_seq == 1 for m in ids)
    assert all(not get_redis().exists(upgrade_keys.twin_v2(m), upgrade_keys.upgrade_switch(m)) for m in ids)
    assert meters.bindings == dict.fromkeys(ids, "v1")


# --- crashes at every step --------------------------------------------------------------------
@pytest.mark.parametrize("point", UpgradeManager.CRASH_POINTS)
@pytest.mark.parametrize("then", ["resume", "rollback"])
def test_crash_at_each_step_resumes_or_rolls_back_cleanly(
    twins: Callable[[int], list[str]], meters: Meters, point: str, then: str
) -> None:
    ids = twins(6)
    seqs = dict.fromkeys(ids, 0)

    def readings() -> None:  # live traffic through the front between every step
        for meter_id in ids:
            seqs[meter_id] += 1
            outcome = v1_ingest(get_redis()).run(meter_id, measurement(seqs[meter_id]),
                                                 1_700_000_000.0 + seqs[meter_id], seqs[meter_id])
            if outcome.result == "parked":
                twin_v2.v2_ingest(get_redis()).run(meter_id, "{}", 0, DRAIN_ONLY)

    readings()
    back_points = ("cancelled", "flipped_back", "back_rebind_sent")
    crashing = manager(meters, crash_at={point})
    op = crashing.start(spec(ids, batch=4))
    crashed = False
    deadline = time.monotonic() + 20
    meters.hold = point == "cancelled"  # meters still switching when the rollback comes
    try:
        while time.monotonic() < deadline:
            readings()
            status = crashing.advance(op["id"], budget_s=0.5)
            if (point == "cancelled" and status["progress"]["rebinding"]) or (
                    point in back_points and status["state"] == "completed"):
                crashing.rollback(op["id"])
            if status["state"] == "rolled_back" or (status["state"] == "completed" and point not in back_points):
                break
    except InjectedCrash:
        crashed = True
    assert crashed, f"crash point {point} was never reached"
    readings()
    meters.hold = False
    meters.release_held()  # late acks of a cancelled switch: ignored
    mgr = manager(meters)  # a new process, same instance name
    if then == "rollback" and mgr.get(op["id"]).state not in ("rolling_back", "rolled_back"):
        mgr.rollback(op["id"], "crash drill")
    status = mgr.run(op["id"], timeout_s=20)
    readings()
    want = "rolled_back" if then == "rollback" or point in back_points else "completed"
    assert status["state"] == want, status
    expected = "v1" if want == "rolled_back" else "v2"
    assert {m: bound(m) for m in ids} == dict.fromkeys(ids, expected)
    assert all(not get_redis().exists(upgrade_keys.upgrade_switch(m)) for m in ids)
    assert all(not get_redis().exists(upgrade_keys.upgrade_inbox(m)) for m in ids)
    if want == "completed":
        assert status["readings"]["missing"] == 0
        assert status["progress"]["done"] == len(ids)
    else:
        assert all(not get_redis().exists(upgrade_keys.twin_v2(m)) for m in ids)
    # Every reading was applied once: the twins' cursors are the meters' last seq.
    assert all(twin_store(get_redis()).get(m).last_seq == seqs[m] for m in ids)
    assert not get_redis().exists(upgrade_keys.upgrade_op_lock(op["id"]))


def _metrics(v2_ok: int, v2_errors: int, v1_ok: int) -> str:
    lines = []
    for fn, ok, bad in (("edge-read-v2", v2_ok, v2_errors), ("edge-read", v1_ok, 0)):
        lines += [f'gateway_function_invocation_total{{code="200",function_name="{fn}"}} {ok}.0',
                  f'gateway_function_invocation_total{{code="500",function_name="{fn}"}} {bad}.0',
                  f'gateway_functions_seconds_bucket{{function_name="{fn}",le="0.005"}} {ok + bad}.0',
                  f'gateway_functions_seconds_bucket{{function_name="{fn}",le="+Inf"}} {ok + bad}.0',
                  f'gateway_functions_seconds_sum{{function_name="{fn}"}} {(ok + bad) * 0.002}']
    return "\n".join(["# HELP gateway_function_invocation_total x", *lines])


def test_a_bad_canary_blocks_promote_and_rolls_itself_back(
    twins: Callable[[int], list[str]], meters: Meters
) -> None:
    ids = twins(4)
    scrape = {"text": _metrics(0, 0, 0)}
    mgr = UpgradeManager(get_redis(), instance="test-manager", publish=meters.publish,
                         metrics=lambda url: scrape["text"])
    meters.manager = mgr
    op = mgr.start(spec(ids, canary=1, metrics_url="http://gateway/metrics", min_calls=10))
    assert mgr.run(op["id"], timeout_s=20)["state"] == "observing"
    scrape["text"] = _metrics(5, 1, 50)
    assert mgr.status(op["id"])["health"]["status"] == "insufficient"
    scrape["text"] = _metrics(20, 10, 50)
    with pytest.raises(Conflict, match=r"promote blocked by the canary's health: error rate 33\.33%"):
        mgr.promote(op["id"])
    assert mgr.promote(op["id"], force=True)["state"] == "rolling_out"
    assert mgr.run(op["id"], timeout_s=20)["state"] == "completed"

    ids = twins(4)
    scrapes = [_metrics(0, 0, 0)]  # the snapshot when the canary starts; then every scrape is bad
    mgr._fetch_metrics = lambda url: scrapes.pop() if scrapes else _metrics(20, 10, 50)
    op = mgr.start(spec(ids, canary=1, metrics_url="http://gateway/metrics", min_calls=10, auto_promote=True,
                        observe_s=0))
    status = mgr.run(op["id"], timeout_s=20)
    assert status["state"] == "rolled_back", status
    assert "auto rollback: error rate" in status["reason"]
    assert all(bound(m) == "v1" for m in ids)


def test_read_v2_of_a_silent_meter_answers_504_with_the_stale_value(twins: Callable[[int], list[str]]) -> None:
    """The v2 read function's meter path: timeout and stale value, as v1 answers them."""
    from metertwin.core.auth import issue_token
    from tests.conftest import TEST_SIGNING_KEY
    from tests.invoke import call, load_handler

    (meter,) = twins(1)
    ingest("v1", meter, 1)
    _switch(meter)
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
    assert "max_age='often'" in body["message"]
