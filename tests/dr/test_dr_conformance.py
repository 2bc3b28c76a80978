"""OpenADR 2.0b conformance of the twin-VEN (issue 11), each case driven by a real openleadr VTN.

Fixtures and helpers come from test_dr_bridge (the VTN, the bridge factory, the commands seen on
the meters' MQTT topics); every wait is event-driven with a deadline.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from dr_bridge.demo import UtilityVtn, wait_until
from metertwin.core.clients import get_redis
from metertwin.dr import decisions, keys
from metertwin.twin.state import TwinStore
from tests.dr.test_dr_bridge import BridgeFactory, bridge_for, limits, record, vtn
from tests.dr.test_dr_event import CommandObserver, commands_seen, dr_env, handler, make_twin, token
from tests.invoke import call

__all__ = ["bridge_for", "commands_seen", "dr_env", "vtn"]  # fixtures used here

KW = ("powerReal", "W", "k")


def answer(vtn: UtilityVtn, event_id: str, ven_id: str, mod: int | None = None) -> Any:
    return vtn.answers_for(event_id, mod).get(ven_id)


def measure(meter_id: str, power_w: float) -> None:
    """The meter reports a new load (e.g. curtailed) to its twin."""
    TwinStore(get_redis()).report_measurement(meter_id, {"ts": time.time(), "import_kwh": 1.0, "export_kwh": 0.0,
                                                         "power_w": power_w, "voltage_v": 230.0}, seq=None)


# item 1
def changes(obs: CommandObserver, meter_id: str) -> list[tuple[float, float | None]]:
    """(time, watts) of each change of the limit sent (unacknowledged commands are retried: repeats)."""
    out: list[tuple[float, float | None]] = []
    for at, cmd in obs.commands(meter_id):
        if not out or out[-1][1] != cmd["params"]["watts"]:
            out.append((at, cmd["params"]["watts"]))
    return out


async def test_each_interval_applies_its_level_and_level_zero_restores(
        vtn: UtilityVtn, bridge_for: BridgeFactory, commands_seen: CommandObserver, meter_id: str) -> None:
    make_twin(meter_id)
    await bridge_for([meter_id])
    # (openleadr renders whole seconds only)
    event_id = vtn.issue([meter_id], intervals=[(2.0, 2.0, 2), (4.0, 2.0, 0), (6.0, 2.0, 3), (8.0, 2.0, 0)])
    await wait_until(lambda: [w for _, w in changes(commands_seen, meter_id)] == [1250.0, None, 1000.0, None], 15)
    times = [at for at, _ in changes(commands_seen, meter_id)]
    plan = record(meter_id, event_id)["plan"]
    assert [w for _, w in plan] == [1250.0, None, 1000.0, None]
    # each restore at its own interval's start, the trailing one well before the event's end
    for (at, _), sent in zip(plan, times, strict=True):
        assert at - 0.05 <= sent < at + 1.5
    assert times[3] < record(meter_id, event_id)["end_at"] - 0.5


# item 2
async def test_units_and_scale_are_honoured_or_rejected(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                        commands_seen: CommandObserver, meter_id: str) -> None:
    make_twin(meter_id)
    await bridge_for([meter_id])
    watts = vtn.issue([meter_id], signal_name="LOAD_DISPATCH", signal_type="setpoint", intervals=[(1.0, 20.0, 415.4)],
                      measurement=("powerReal", "W", "none"))
    unitless = vtn.issue([meter_id], signal_name="LOAD_DISPATCH", signal_type="setpoint",
                         intervals=[(30.0, 5.0, 0.8)])
    await wait_until(lambda: answer(vtn, watts, meter_id) and answer(vtn, unitless, meter_id), 10)
    assert answer(vtn, watts, meter_id).opt_type == "optIn"
    bad = answer(vtn, unitless, meter_id)
    assert (bad.opt_type, bad.response_code) == ("optOut", decisions.INVALID_DATA)
    assert "itemBase powerReal" in bad.description
    await wait_until(lambda: limits(commands_seen, meter_id)[:1] == [415.4], 10)
    kilo = vtn.issue([meter_id], signal_name="LOAD_DISPATCH", signal_type="setpoint", intervals=[(30.0, 5.0, 0.8)],
                     measurement=KW)
    await wait_until(lambda: answer(vtn, kilo, meter_id), 10)
    assert record(meter_id, kilo)["plan"][0][1] == 800.0


# item 3
async def test_modification_keeps_the_pre_event_baseline(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                         commands_seen: CommandObserver, meter_id: str) -> None:
    make_twin(meter_id, power_w=2000.0)
    await bridge_for([meter_id])
    event_id = vtn.issue([meter_id], intervals=[(1.0, 30.0, 1)])
    await wait_until(lambda: limits(commands_seen, meter_id)[:1] == [1500.0], 10)
    measure(meter_id, 1500.0)  # the meter obeyed: its load is now curtailed
    vtn.modify([meter_id], event_id, payload=3)
    await wait_until(lambda: limits(commands_seen, meter_id)[-1:] == [1000.0], 10)  # 2000 - 1000, not 1500 - 750
    assert record(meter_id, event_id)["baseline_w"] == 2000.0
    # a second event decided while the first limits the meter takes the first's baseline, not 1500 W
    other = vtn.issue([meter_id], intervals=[(60.0, 5.0, 1)])
    await wait_until(lambda: answer(vtn, other, meter_id), 10)
    assert record(meter_id, other)["baseline_w"] == 2000.0


# item 4
async def test_modification_moving_an_active_event_later_restores_now(
        vtn: UtilityVtn, bridge_for: BridgeFactory, commands_seen: CommandObserver, meter_id: str) -> None:
    make_twin(meter_id)
    await bridge_for([meter_id])
    event_id = vtn.issue([meter_id], intervals=[(1.0, 30.0, 2)])
    await wait_until(lambda: limits(commands_seen, meter_id)[:1] == [1250.0], 10)
    vtn.modify([meter_id], event_id, start_in_s=6.0)
    moved_at = time.time()
    await wait_until(lambda: limits(commands_seen, meter_id)[-1:] == [None], 10)
    restored_at = commands_seen.commands(meter_id)[-1][0]
    new_start = record(meter_id, event_id)["start_at"]
    assert restored_at < new_start - 1.0, (restored_at - moved_at, new_start - moved_at)
    await wait_until(lambda: limits(commands_seen, meter_id)[-1:] == [1250.0], 15)
    assert commands_seen.commands(meter_id)[-1][0] >= new_start - 0.05


# item 5 (membership read from the registry profile)
async def test_group_and_resource_targets_match_the_twins_membership(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                                     meter_id: str) -> None:
    make_twin(meter_id, profile={"groups": [{"id": "feeder-7", "name": "North"}, "0042"],
                                 "resource_id": "substation-1"})
    await bridge_for([meter_id])
    cases = {"group_id": ({"group_id": "feeder-7"}, "optIn"), "digits": ({"group_id": "0042"}, "optIn"),
             "group_name": ({"group_name": "North"}, "optIn"), "resource": ({"resource_id": "substation-1"}, "optIn"),
             "meter": ({"resource_id": meter_id}, "optIn"), "other": ({"group_id": "feeder-8"}, "optOut"),
             "other_name": ({"group_name": "South"}, "optOut")}
    issued = {name: vtn.issue([meter_id], intervals=[(60.0, 5.0, 1)], targets=[target])
              for name, (target, _) in cases.items()}
    await wait_until(lambda: all(answer(vtn, e, meter_id) for e in issued.values()), 10)
    for name, (_, opt) in cases.items():
        got = answer(vtn, issued[name], meter_id)
        assert got.opt_type == opt, name
        assert got.response_code == (200 if opt == "optIn" else decisions.TARGET_MISMATCH), name


# item 5, with the grid topology the registry and edge-fleet keep (metertwin.fleet)
async def test_groups_of_the_twins_grid_topology_are_group_targets(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                                    meter_id: str) -> None:
    from metertwin.fleet.topology import topology_store

    make_twin(meter_id)
    topology_store(get_redis()).patch(meter_id, {"feeder": "F-7", "groups": ["north-pv", "0042"]}, actor="test")
    await bridge_for([meter_id])
    cases = {"group": ({"group_id": "north-pv"}, "optIn"), "digits": ({"group_id": "0042"}, "optIn"),
             "other": ({"group_id": "south-pv"}, "optOut")}
    issued = {name: vtn.issue([meter_id], intervals=[(60.0, 5.0, 1)], targets=[target])
              for name, (target, _) in cases.items()}
    await wait_until(lambda: all(answer(vtn, e, meter_id) for e in issued.values()), 10)
    assert {name: answer(vtn, issued[name], meter_id).opt_type for name in cases} == {
        name: opt for name, (_, opt) in cases.items()}


# item 6
async def test_all_digit_ids_stay_strings_end_to_end(vtn: UtilityVtn, bridge_for: BridgeFactory) -> None:
    meter_id = "0042001234"
    make_twin(meter_id)
    bridge = await bridge_for([meter_id])
    assert bridge.vens[meter_id].ven_id == meter_id
    assert meter_id in vtn.registered
    event_id = vtn.issue([meter_id], intervals=[(60.0, 5.0, 1)], targets=[{"resource_id": meter_id}],
                         event_id="000777")
    await wait_until(lambda: answer(vtn, event_id, meter_id), 10)
    assert answer(vtn, event_id, meter_id).opt_type == "optIn"
    assert record(meter_id, "000777")["event_id"] == "000777"
    await wait_until(lambda: any(r.ven_id == meter_id and r.r_id == f"{meter_id}-power" for r in vtn.raw_reports), 10)


# item 7
async def test_records_of_far_events_outlive_the_event(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                       meter_id: str) -> None:
    make_twin(meter_id)
    await bridge_for([meter_id])
    ten_days = 10 * 86_400
    event_id = vtn.issue([meter_id], intervals=[(ten_days, 3600.0, 1)], startafter_s=600, recovery_s=1800)
    await wait_until(lambda: answer(vtn, event_id, meter_id), 10)
    assert answer(vtn, event_id, meter_id).opt_type == "optIn"
    ttl = get_redis().ttl(keys.dr_events(meter_id))
    assert ttl >= ten_days + 3600 + 600 + 1800 + keys.DR_RETENTION_S - 60
    # a later short event must not shorten it
    short = vtn.issue([meter_id], intervals=[(60.0, 5.0, 1)])
    await wait_until(lambda: answer(vtn, short, meter_id), 10)
    assert get_redis().ttl(keys.dr_events(meter_id)) >= ttl - 60


# item 8
async def test_one_bad_event_never_blocks_the_others(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                     meter_id: str) -> None:
    make_twin(meter_id)
    await bridge_for([meter_id])
    unknown = vtn.issue([meter_id], intervals=[(30.0, 5.0, 1)], signal_name="NOT_A_SIGNAL")
    negative = vtn.issue([meter_id], intervals=[(30.0, -5.0, 1)])
    good = vtn.issue([meter_id], intervals=[(30.0, 5.0, 1)])
    issued = time.monotonic()
    await wait_until(lambda: all(answer(vtn, e, meter_id) for e in (unknown, negative, good)), 10)
    assert answer(vtn, good, meter_id).at - issued < 5.0
    assert (answer(vtn, good, meter_id).opt_type, answer(vtn, good, meter_id).response_code) == ("optIn", 200)
    assert (answer(vtn, unknown, meter_id).opt_type, answer(vtn, unknown, meter_id).response_code) == \
        ("optOut", decisions.SIGNAL_NOT_SUPPORTED)
    assert "signalName" in answer(vtn, unknown, meter_id).description
    assert (answer(vtn, negative, meter_id).opt_type, answer(vtn, negative, meter_id).response_code) == \
        ("optOut", decisions.INVALID_DATA)
    # the VTN keeps resending the bad ones: a later event is still answered, and the good one not cancelled
    later = vtn.issue([meter_id], intervals=[(40.0, 5.0, 2)])
    await wait_until(lambda: answer(vtn, later, meter_id), 10)
    assert answer(vtn, later, meter_id).opt_type == "optIn"
    assert record(meter_id, good)["cancelled"] is None


# item 9
async def test_opt_out_during_an_event_tells_the_vtn_and_restores(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                                  commands_seen: CommandObserver,
                                                                  meter_id: str) -> None:
    make_twin(meter_id)
    await bridge_for([meter_id])
    event_id = vtn.issue([meter_id], intervals=[(1.0, 30.0, 2)])
    await wait_until(lambda: limits(commands_seen, meter_id)[:1] == [1250.0], 10)
    status, body = call(handler, "PUT", f"/meters/{meter_id}/dr-preferences", token=token("consumer", meter=meter_id),
                        body={"opt_out": True})
    assert status == 200
    assert body["events_opted_out"] == [event_id]
    await wait_until(lambda: limits(commands_seen, meter_id)[-1:] == [None], 10)
    await wait_until(lambda: [o for o in vtn.opts if o.event_id == event_id], 10)
    opt = next(o for o in vtn.opts if o.event_id == event_id)
    assert (opt.ven_id, opt.opt_type, opt.modification_number) == (meter_id, "optOut", 0)
    # a redelivery of the same event is answered optOut, never optIn again
    seen = len(vtn.answers)
    assert vtn.server is not None
    vtn.server.events_updated[meter_id] = True
    await wait_until(lambda: answer(vtn, event_id, meter_id) and len(vtn.answers) > seen, 10)
    assert answer(vtn, event_id, meter_id).opt_type == "optOut"
    assert record(meter_id, event_id)["opt"] == "optOut"


# item 10
async def test_many_intervals_and_meaningful_errors(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                    meter_id: str) -> None:
    make_twin(meter_id)
    await bridge_for([meter_id])
    many = vtn.issue([meter_id], intervals=[(60.0 + i, 1.0, 1 + i % 3) for i in range(300)])
    bad_level = vtn.issue([meter_id], intervals=[(30.0, 5.0, 7)], signal_name="LOAD_DISPATCH", signal_type="level")
    await wait_until(lambda: answer(vtn, many, meter_id) and answer(vtn, bad_level, meter_id), 15)
    assert (answer(vtn, many, meter_id).opt_type, answer(vtn, many, meter_id).response_code) == ("optIn", 200)
    assert len(record(meter_id, many)["plan"]) == 300
    assert "level 7" in answer(vtn, bad_level, meter_id).description


# item 11
async def test_open_ended_event_sheds_until_cancelled(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                      commands_seen: CommandObserver, meter_id: str) -> None:
    make_twin(meter_id)
    await bridge_for([meter_id])
    event_id = vtn.issue([meter_id], intervals=[(1.0, 0.0, 2)])
    await wait_until(lambda: limits(commands_seen, meter_id)[:1] == [1250.0], 10)
    assert record(meter_id, event_id)["open_ended"] is True
    assert record(meter_id, event_id)["status"] == "active"
    vtn.cancel([meter_id], event_id)
    await wait_until(lambda: limits(commands_seen, meter_id)[-1:] == [None], 10)


# item 12
async def test_mismatched_signal_types_rejected_and_test_events_not_executed(
        vtn: UtilityVtn, bridge_for: BridgeFactory, commands_seen: CommandObserver, meter_id: str) -> None:
    make_twin(meter_id)
    await bridge_for([meter_id])
    mismatch = vtn.issue([meter_id], intervals=[(30.0, 5.0, 1)], signal_type="price")
    test = vtn.issue([meter_id], intervals=[(1.0, 20.0, 3)], test_event=True)
    real = vtn.issue([meter_id], intervals=[(2.0, 20.0, 1)])
    await wait_until(lambda: all(answer(vtn, e, meter_id) for e in (mismatch, test, real)), 10)
    assert (answer(vtn, mismatch, meter_id).opt_type, answer(vtn, mismatch, meter_id).response_code) == \
        ("optOut", decisions.INVALID_DATA)
    assert answer(vtn, test, meter_id).opt_type == "optIn"
    await wait_until(lambda: limits(commands_seen, meter_id), 10)
    assert limits(commands_seen, meter_id)[0] == 1500.0  # the real event's level 1, never the test's level 3
    assert record(meter_id, test)["test_event"] is True
    assert record(meter_id, test)["plan"] == []


# item 13
async def test_status_reports_and_registration_fields(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                      commands_seen: CommandObserver, meter_id: str) -> None:
    make_twin(meter_id)
    bridge = await bridge_for([meter_id])
    sent: list[str] = []
    ven = bridge.vens[meter_id]
    ven.add_hook("before_send_xml", sent.append)
    await ven.create_party_registration(ven_id=ven.ven_id)
    registration = next(x for x in sent if "oadrCreatePartyRegistration" in x)
    assert "oadrTransportAddress" not in registration
    assert ">None<" not in registration
    vtn.issue([meter_id], intervals=[(1.0, 30.0, 2)])
    await wait_until(lambda: limits(commands_seen, meter_id)[:1] == [1250.0], 10)
    await wait_until(lambda: any(r.status and (r.status.get("load_control_state") or {}).get("set_point")
                                 for r in vtn.raw_reports if r.ven_id == meter_id), 10)
    status = next(r.status for r in reversed(vtn.raw_reports)
                  if r.status and (r.status.get("load_control_state") or {}).get("set_point"))
    assert status["online"] is True
    assert status["manual_override"] is False
    assert status["load_control_state"]["set_point"] == {"current": 1250.0, "normal": 2000.0}


# item 14
async def test_registration_is_staggered(vtn: UtilityVtn, bridge_for: BridgeFactory, meter_id: str) -> None:
    meters = [f"{meter_id}-{i}" for i in range(8)]
    for m in meters:
        make_twin(m)
    await bridge_for(meters, register_jitter_s=3.0)
    firsts = sorted(vtn.registered_at[m][0] for m in meters)
    assert firsts[-1] - firsts[0] > 0.75  # 8 uniform draws over 3 s: spread below 0.75 s has p < 1e-3


# bridge robustness
async def test_vtn_restart_is_quiet_and_reports_are_queued(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                           meter_id: str, caplog: Any) -> None:
    make_twin(meter_id, power_w=1750.0)
    bridge = await bridge_for([meter_id])
    ven = bridge.vens[meter_id]
    await wait_until(lambda: any(r.ven_id == meter_id for r in vtn.raw_reports), 10)
    await vtn.stop()
    stopped = time.time()
    await wait_until(lambda: len(ven.report_backlog) >= 2, 15)
    await vtn.start()
    await wait_until(lambda: not ven.report_backlog and any(
        r.sampled is not None and r.sampled.timestamp() > stopped for r in vtn.raw_reports), 15)
    await wait_until(lambda: vtn.report_registrations.get(meter_id), 15)
    text = caplog.text
    assert "CancelledError" not in text
    assert "Traceback" not in text
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1


# EiReport registration: the VTN learns from oadrCreatedReport's oadrPendingReports which of its
# report requests the VEN created (openleadr's own check warns "was not created by the VEN")
async def test_created_report_names_every_requested_report(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                           meter_id: str, caplog: Any) -> None:
    make_twin(meter_id)
    await bridge_for([meter_id])
    assert vtn.server is not None
    reports = vtn.server.services["report_service"]
    await wait_until(lambda: len(reports.requested_reports.get(meter_id, [])) >= 2
                     and len(reports.created_reports.get(meter_id, [])) >= 2, 10)
    requested = {r.report_request_id for r in reports.requested_reports[meter_id]}
    assert requested <= set(reports.created_reports[meter_id]), reports.created_reports[meter_id]
    assert "was not created by the VEN" not in caplog.text


# bridge robustness: stopping (a pod's termination) while a poll waits for the VTN
async def test_bridge_stop_during_a_poll_is_quiet(vtn: UtilityVtn, bridge_for: BridgeFactory, meter_id: str,
                                                  caplog: Any) -> None:
    make_twin(meter_id)
    bridge = await bridge_for([meter_id])
    assert vtn.server is not None
    polls = vtn.server.services["poll_service"]
    original = polls.handlers["oadrPoll"]
    held, release = asyncio.Event(), asyncio.Event()

    async def held_poll(payload: dict[str, Any]) -> Any:
        held.set()
        await release.wait()
        return await original(payload)

    polls.handlers["oadrPoll"] = held_poll
    try:
        await asyncio.wait_for(held.wait(), 10)
        await bridge.stop()
    finally:
        release.set()
    assert "Traceback" not in caplog.text
    assert "CancelledError" not in caplog.text


# oadrRequestReregistration: the VTN asks in answer to a poll; the VEN registers again and re-offers
# its reports, replacing (not doubling) its report jobs and report sender
async def test_requested_reregistration_registers_again_without_doubling_reports(
        vtn: UtilityVtn, bridge_for: BridgeFactory, meter_id: str) -> None:
    make_twin(meter_id)
    bridge = await bridge_for([meter_id])
    ven = bridge.vens[meter_id]
    assert vtn.server is not None
    await wait_until(lambda: vtn.report_registrations.get(meter_id) == 2, 10)
    polls = vtn.server.services["poll_service"]
    original = polls.handlers["oadrPoll"]
    asked: list[str] = []

    async def ask_once(payload: dict[str, Any]) -> Any:
        if asked:
            return await original(payload)
        asked.append(str(payload["ven_id"]))
        return "oadrRequestReregistration", {"ven_id": payload["ven_id"]}

    polls.handlers["oadrPoll"] = ask_once
    await wait_until(lambda: len(vtn.registered_at.get(meter_id, [])) >= 2, 10)
    await wait_until(lambda: vtn.report_registrations.get(meter_id) == 4, 10)

    def report_jobs() -> int:
        return sum(1 for job in ven.scheduler.get_jobs() if "update_report" in repr(job.func))

    def senders() -> int:
        return sum(1 for task in asyncio.all_tasks() if not task.done()
                   and getattr(task.get_coro(), "__qualname__", "") == "TwinVen._report_queue_worker"
                   and task.get_coro().cr_frame is not None and task.get_coro().cr_frame.f_locals.get("self") is ven)

    await wait_until(lambda: report_jobs() == 2, 10)
    assert report_jobs() == 2
    assert senders() == 1


# signals: ELECTRICITY_PRICE price in currencyPerKWh with its siScaleCode, and a standard
# signal name the twin does not execute (DEMAND_CHARGE) answered 460, through the real VTN
async def test_price_signal_scaled_and_unexecuted_standard_signal(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                                  meter_id: str) -> None:
    make_twin(meter_id)
    await bridge_for([meter_id])
    milli = ("currencyPerKWh", "USD", "m")
    cheap = vtn.issue([meter_id], signal_name="ELECTRICITY_PRICE", signal_type="price", intervals=[(60.0, 5.0, 100)],
                      measurement=milli)  # 0.10 per kWh: under the consumer's 0.30 threshold
    dear = vtn.issue([meter_id], signal_name="ELECTRICITY_PRICE", signal_type="price", intervals=[(60.0, 5.0, 500)],
                     measurement=milli)  # 0.50 per kWh
    demand = vtn.issue([meter_id], signal_name="DEMAND_CHARGE", signal_type="price", intervals=[(60.0, 5.0, 7)],
                       measurement=("currencyPerKW", "USD", "none"))
    await wait_until(lambda: all(answer(vtn, e, meter_id) for e in (cheap, dear, demand)), 10)
    assert (answer(vtn, cheap, meter_id).opt_type, record(meter_id, cheap)["plan"]) == ("optIn", [])
    assert answer(vtn, dear, meter_id).opt_type == "optIn"
    assert [w for _, w in record(meter_id, dear)["plan"]] == [1250.0]
    assert (answer(vtn, demand, meter_id).opt_type, answer(vtn, demand, meter_id).response_code) == \
        ("optOut", decisions.SIGNAL_NOT_SUPPORTED)


# bridge robustness: what was queued while the VTN restarted reaches the restarted VTN's report
# callbacks (openleadr's VTN drops values of report requests it does not know: the old ones)
async def test_reports_queued_during_a_restart_reach_the_new_report_requests(
        vtn: UtilityVtn, bridge_for: BridgeFactory, meter_id: str) -> None:
    make_twin(meter_id, power_w=1750.0)
    bridge = await bridge_for([meter_id])
    ven = bridge.vens[meter_id]
    await wait_until(lambda: any(r.ven_id == meter_id for r in vtn.reports), 10)
    await vtn.stop()
    await wait_until(lambda: len(ven.report_backlog) >= 2, 15)
    queued = {(r.report_specifier_id, i.dtstart) for r in list(ven.report_backlog)[:2] for i in r.intervals}
    vtn.reports.clear()
    await vtn.start()
    names = {f"usage-{meter_id}": "TELEMETRY_USAGE", f"status-{meter_id}": "TELEMETRY_STATUS"}
    await wait_until(lambda: {(names[s], at) for s, at in queued}
                     <= {(r.report_name, r.sampled) for r in vtn.reports if r.ven_id == meter_id}, 15)
