"""The upgrade manager's steps against a real Redis: selection, canary, promote, resend, refusal, rollback,
a crash at every step, and the canary's health.

The meters are played by the test (:class:`tests.upgrade.upgrade_fixtures.Meters`). End to end
with the gateway and simulated meters: tests/upgrade/test_upgrade.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from metertwin.core.clients import get_redis
from metertwin.core.errors import Conflict
from metertwin.twin.messages import CommandAck
from metertwin.twin.state import twin_store
from metertwin.upgrade import cli, twin_v2
from metertwin.upgrade import keys as upgrade_keys
from metertwin.upgrade.inbox import DRAIN_ONLY, v1_ingest
from metertwin.upgrade.operations import InjectedCrash, OperationSpec, UpgradeManager, stable_bucket
from tests.upgrade.upgrade_fixtures import Meters, bound, ingest, manager, measurement, meters, spec, twins

__all__ = ["meters", "twins"]  # fixtures: imported for pytest


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



def _drainer_metrics(v2_reads: int, drainer_calls: int, v1_calls: int = 50) -> str:
    """Fast reads on both releases, fast v1 ingest, and edge-ingest-v2's drainer calls lingering ~10 s each."""
    lines = []
    for fn, calls, seconds in (("edge-read-v2", v2_reads, 0.002), ("edge-read", v1_calls, 0.002),
                               ("edge-ingest", 2 * v1_calls, 0.002), ("edge-ingest-v2", drainer_calls, 10.2)):
        lines += [f'gateway_function_invocation_total{{code="200",function_name="{fn}"}} {calls}.0']
        lines += [f'gateway_functions_seconds_bucket{{function_name="{fn}",le="{le}"}} '
                  f'{calls if seconds <= float(le) else 0}.0' for le in ("0.005", "10.0", "30.0")]
        lines += [f'gateway_functions_seconds_bucket{{function_name="{fn}",le="+Inf"}} {calls}.0',
                  f'gateway_functions_seconds_sum{{function_name="{fn}"}} {calls * seconds}']
    return "\n".join(["# HELP gateway_function_invocation_total x", *lines])


def test_auto_promote_judges_the_twins_calls_not_the_drainer_and_says_why_it_waits(
    twins: Callable[[int], list[str]], meters: Meters
) -> None:
    ids = twins(3)
    scrapes = [_drainer_metrics(0, 0, 0)]  # the snapshot when the canary starts
    scrape = {"text": _drainer_metrics(3, 8)}
    mgr = UpgradeManager(get_redis(), instance="test-manager", publish=meters.publish,
                         metrics=lambda url: scrapes.pop() if scrapes else scrape["text"])
    meters.manager = mgr
    op = mgr.start(spec(ids, canary=1, metrics_url="http://gateway/metrics", min_calls=10, auto_promote=True,
                        observe_s=0))
    # 3 reads and 8 drainer calls of 10 s: counted as twin calls, they would make 11 calls with a
    # p95 of 10 s (an auto rollback); the twins made 3 calls, too few to judge.
    assert mgr.run(op["id"], timeout_s=20)["state"] == "observing"
    status = mgr.status(op["id"])
    assert status["health"]["status"] == "insufficient", status["health"]
    assert status["health"]["candidate"]["functions"] == ["edge-read-v2"]
    assert status["health"]["internal"] == {**status["health"]["internal"], "functions": ["edge-ingest-v2"],
                                            "calls": 8.0, "errors": 0.0}
    assert status["blockers"][0].endswith("(auto-promote waiting: health insufficient: edge-read-v2: 3 calls and 0 "
                                          "readings applied since the canary started, 10 needed to judge)"), \
        status["blockers"]
    # What `--follow` prints on each advance: the reason it is still waiting.
    assert "| canary of 1 meters done" in cli.line(mgr.advance(op["id"]))
    assert cli.line(mgr.advance(op["id"])).endswith("edge-read-v2: 3 calls and 0 readings applied since the "
                                                    "canary started, 10 needed to judge)")
    scrape["text"] = _drainer_metrics(20, 8)
    status = mgr.run(op["id"], timeout_s=20, until=("completed", "rolled_back", "paused"))
    assert status["state"] == "completed", status
    assert all(bound(m) == "v2" for m in ids)


def test_auto_promote_finishes_on_readings_when_no_app_reads(
    twins: Callable[[int], list[str]], meters: Meters
) -> None:
    """The outside probe on the demo: meters reporting, nobody reading, and --auto-promote waited
    forever ('edge-read-v2: 0 calls since the canary started, 20 needed'). The readings the new
    release applied to the canary twins are the twins' own calls: they count towards min_calls."""
    ids = twins(3)
    scrapes = [_drainer_metrics(0, 0, 0)]
    scrape = {"text": _drainer_metrics(0, 4)}  # no reads at all; the drainer ran 4 times, no errors
    mgr = UpgradeManager(get_redis(), instance="test-manager", publish=meters.publish,
                         metrics=lambda url: scrapes.pop() if scrapes else scrape["text"])
    meters.manager = mgr
    op = mgr.start(spec(ids, canary=1, metrics_url="http://gateway/metrics", min_calls=10, auto_promote=True,
                        observe_s=0))
    assert mgr.run(op["id"], timeout_s=20)["state"] == "observing"
    status = mgr.status(op["id"])
    assert status["health"]["status"] == "insufficient", status["health"]
    canary = [m for m in ids if bound(m) == "v2"]
    assert len(canary) == 1
    for seq in range(100, 112):
        assert ingest("v2", canary[0], seq) == "applied"
    status = mgr.run(op["id"], timeout_s=20, until=("completed", "rolled_back", "paused"))
    assert status["state"] == "completed", status
    assert all(bound(m) == "v2" for m in ids)
