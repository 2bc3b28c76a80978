"""The VEN bridge against a real openleadr VTN on loopback, with registered twins.

The bridge calls the dr-event handler in-process (``handler_invoker``); commands are
observed on the meters' MQTT command topics. Event windows are a few seconds long and
every wait polls with a deadline.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dr_bridge import Bridge, BridgeConfig, handler_invoker
from dr_bridge.demo import UtilityVtn, wait_until
from dr_bridge.invoke import Invoke
from metertwin.core.clients import get_redis
from metertwin.dr import decisions
from metertwin.dr.schedule import public
from metertwin.dr.store import DrStore
from tests.dr.test_dr_event import SERVICE, CommandObserver, commands_seen, dr_env, handler, make_twin, token
from tests.invoke import call

__all__ = ["commands_seen", "dr_env"]  # fixtures used here

POLL_S = 1.0


def record(meter_id: str, event_id: str) -> dict[str, Any]:
    return public(DrStore(get_redis()).event(meter_id, event_id))


@pytest.fixture
async def vtn(dr_env: dict[str, str]) -> AsyncIterator[UtilityVtn]:
    server = UtilityVtn(poll_s=POLL_S, sampling_s=1.0)
    await server.start()
    yield server
    await server.stop()


BridgeFactory = Callable[..., Awaitable[Bridge]]


@pytest.fixture
async def bridge_for(vtn: UtilityVtn) -> AsyncIterator[BridgeFactory]:
    made: list[Bridge] = []

    async def make(meters: list[str], invoke: Invoke | None = None, **cfg: Any) -> Bridge:
        config = BridgeConfig(vtn_url=vtn.url, due_poll_s=0.1, telemetry_refresh_s=0.5, **cfg)
        bridge = Bridge(meters, config, invoke or handler_invoker(handler, SERVICE))
        made.append(bridge)
        await bridge.start()
        return bridge

    yield make
    for bridge in made:
        await bridge.stop()


def limits(obs: CommandObserver, meter_id: str) -> list[float | None]:
    return [c["params"]["watts"] for _, c in obs.commands(meter_id)]


async def test_event_opt_in_and_meter_command_inside_the_randomized_window(
        vtn: UtilityVtn, bridge_for: BridgeFactory, commands_seen: CommandObserver, meter_id: str) -> None:
    meters = [meter_id, meter_id + "-b"]
    for m in meters:
        make_twin(m)
    bridge = await bridge_for(meters)
    assert set(vtn.registered) == set(meters)
    jobs = [getattr(j.func, "__name__", "") for v in bridge.vens.values() for j in v.scheduler.get_jobs()]
    assert "_poll" in jobs
    assert "_event_status_log" not in jobs
    event_id = vtn.issue(meters, intervals=[(2.5, 3.0, 2)], startafter_s=1.0)
    await wait_until(lambda: len(vtn.answers_for(event_id)) == 2, 10)
    assert {a.opt_type for a in vtn.answers_for(event_id).values()} == {"optIn"}, bridge.last_answers
    assert {a.response_code for a in vtn.answers_for(event_id).values()} == {200}
    await wait_until(lambda: all(commands_seen.commands(m) for m in meters), 10)
    for m in meters:
        rec = record(m, event_id)
        assert 0 <= rec["offset_s"] <= 1.0
        assert rec["startafter_s"] == 1.0
        at, cmd = commands_seen.commands(m)[0]
        assert cmd["params"] == {"watts": 1250.0}
        # inside the window: not before the randomized start, at most a due-poll tick (+ load slack) after it
        assert rec["start_at"] - 0.05 <= at <= rec["start_at"] + 2.0
        assert at < rec["end_at"]
    # restored at the end
    await wait_until(lambda: all(limits(commands_seen, m)[-1] is None for m in meters), 10)


async def test_modification_then_cancellation(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                              commands_seen: CommandObserver, meter_id: str) -> None:
    make_twin(meter_id)
    await bridge_for([meter_id])
    event_id = vtn.issue([meter_id], intervals=[(1.0, 30.0, 1)])
    await wait_until(lambda: limits(commands_seen, meter_id)[:1] == [1500.0], 10)
    vtn.modify([meter_id], event_id, payload=3)
    await wait_until(lambda: vtn.answers_for(event_id, 1), 10)
    await wait_until(lambda: limits(commands_seen, meter_id)[-1:] == [1000.0], 10)
    assert record(meter_id, event_id)["modification_number"] == 1
    vtn.cancel([meter_id], event_id)
    await wait_until(lambda: vtn.answers_for(event_id, 2), 10)
    await wait_until(lambda: limits(commands_seen, meter_id)[-1:] == [None], 10)
    rec = record(meter_id, event_id)
    assert rec["status"] == "cancelled"
    assert rec["cancelled"]["how"] == "explicit"


async def test_implied_cancellation_when_an_event_disappears(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                             commands_seen: CommandObserver, meter_id: str) -> None:
    make_twin(meter_id)
    await bridge_for([meter_id])
    first = vtn.issue([meter_id], intervals=[(1.0, 30.0, 2)])
    await wait_until(lambda: limits(commands_seen, meter_id)[:1] == [1250.0], 10)
    vtn.withdraw([meter_id], first)
    second = vtn.issue([meter_id], intervals=[(60.0, 10.0, 1)])
    await wait_until(lambda: vtn.answers_for(second), 10)
    rec = record(meter_id, first)
    assert rec["status"] == "cancelled"
    assert rec["cancelled"]["how"] == "implied"
    await wait_until(lambda: limits(commands_seen, meter_id)[-1:] == [None], 10)
    assert record(meter_id, second)["status"] == "near"


async def test_opt_out_by_preference(vtn: UtilityVtn, bridge_for: BridgeFactory, commands_seen: CommandObserver,
                                     meter_id: str) -> None:
    make_twin(meter_id)
    status, _ = call(handler, "PUT", f"/meters/{meter_id}/dr-preferences", token=token("consumer", meter=meter_id),
                     body={"opt_out": True})
    assert status == 200
    await bridge_for([meter_id])
    event_id = vtn.issue([meter_id], intervals=[(0.5, 1.0, 3)])
    await wait_until(lambda: vtn.answers_for(event_id), 10)
    assert vtn.answers_for(event_id)[meter_id].opt_type == "optOut"
    await wait_until(lambda: record(meter_id, event_id)["status"] == "completed", 10)
    assert commands_seen.commands(meter_id) == []


async def test_function_failure_answers_and_the_ven_keeps_going(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                                meter_id: str) -> None:
    make_twin(meter_id)
    real = handler_invoker(handler, SERVICE)
    failing = {"on": True}

    async def flaky(method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        if failing["on"] and path == "/events":
            raise ConnectionError("gateway down")
        return await real(method, path, body)

    bridge = await bridge_for([meter_id], invoke=flaky)
    event_id = vtn.issue([meter_id], intervals=[(30.0, 10.0, 2)])
    await wait_until(lambda: vtn.answers_for(event_id), 10)
    answer = vtn.answers_for(event_id)[meter_id]
    assert (answer.opt_type, answer.response_code) == ("optOut", 469)
    assert bridge.stats.invoke_errors >= 1
    failing["on"] = False
    vtn.modify([meter_id], event_id, payload=1)
    await wait_until(lambda: vtn.answers_for(event_id, 1), 10)
    assert vtn.answers_for(event_id, 1)[meter_id].opt_type == "optIn"


async def test_mis_targeted_and_unsupported_and_malformed_events(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                                  meter_id: str) -> None:
    make_twin(meter_id)
    await bridge_for([meter_id])
    elsewhere = vtn.issue([meter_id], intervals=[(30.0, 5.0, 1)], targets=[{"ven_id": "SomeoneElse"}])
    custom = vtn.issue([meter_id], intervals=[(30.0, 5.0, 1)], signal_name="x-loadShift", signal_type="level")
    # (the VTN itself refuses to send SIMPLE level 7; a LOAD_DISPATCH level it does send)
    bad_level = vtn.issue([meter_id], intervals=[(30.0, 5.0, 7)], signal_name="LOAD_DISPATCH", signal_type="level")
    good = vtn.issue([meter_id], intervals=[(30.0, 5.0, 1)])
    await wait_until(lambda: all(vtn.answers_for(e) for e in (elsewhere, custom, bad_level, good)), 10)
    got = {e: vtn.answers_for(e)[meter_id] for e in (elsewhere, custom, bad_level, good)}
    assert (got[elsewhere].opt_type, got[elsewhere].response_code) == ("optOut", decisions.TARGET_MISMATCH)
    assert (got[custom].opt_type, got[custom].response_code) == ("optOut", decisions.SIGNAL_NOT_SUPPORTED)
    assert (got[bad_level].opt_type, got[bad_level].response_code) == ("optOut", decisions.INVALID_DATA)
    assert (got[good].opt_type, got[good].response_code) == ("optIn", 200)


async def test_telemetry_reports_and_vtn_restart(vtn: UtilityVtn, bridge_for: BridgeFactory, meter_id: str) -> None:
    make_twin(meter_id, power_w=1750.0)
    bridge = await bridge_for([meter_id])
    await wait_until(lambda: any(r.ven_id == meter_id and r.report_name == "TELEMETRY_USAGE"
                                 and r.value == 1750.0 for r in vtn.reports), 10)
    # TELEMETRY_STATUS is an oadrPayloadResourceStatus (issue 11 item 13), not a float
    await wait_until(lambda: any(r.report_name == "TELEMETRY_STATUS" and r.r_id.endswith("-status")
                                 and r.status and r.status["online"] is True for r in vtn.raw_reports), 10)
    # restart: a new VTN process on the same port knows neither the VEN nor its reports (#186)
    await vtn.stop()
    ven = bridge.vens[meter_id]
    await wait_until(lambda: ven._vtn_lost, 10)
    vtn.reports.clear()
    vtn.report_registrations.clear()
    vtn.registered.clear()
    await vtn.start()
    await wait_until(lambda: vtn.report_registrations.get(meter_id), 15)
    assert meter_id in vtn.registered
    await wait_until(lambda: any(r.report_name == "TELEMETRY_USAGE" for r in vtn.reports), 10)
    event_id = vtn.issue([meter_id], intervals=[(30.0, 5.0, 1)])
    await wait_until(lambda: vtn.answers_for(event_id), 10)
    assert vtn.answers_for(event_id)[meter_id].opt_type == "optIn"
    assert bridge.stats.reregistrations >= 1
    status, body = call(handler, "GET", f"/events/{event_id}", token=token("utility"))
    assert status == 200
    assert body["totals"]["opt_in"] == 1
    assert time.time() > 0


async def test_lower_case_vtn_id_is_answered_with_452(dr_env: dict[str, str], meter_id: str) -> None:
    make_twin(meter_id)
    vtn = UtilityVtn(poll_s=POLL_S)
    vtn.vtn_id = "lowercasevtn"  # UtilityVtn refuses this id; a foreign VTN may still use one
    await vtn.start()
    bridge = Bridge([meter_id], BridgeConfig(vtn_url=vtn.url), handler_invoker(handler, SERVICE))
    try:
        await bridge.start()
        event_id = vtn.issue([meter_id], intervals=[(30.0, 5.0, 1)])
        await wait_until(lambda: vtn.answers_for(event_id), 10)
        answer = vtn.answers_for(event_id)[meter_id]
        assert answer.message_code == 452
        assert answer.opt_type == "optIn"  # the twin still decides (what openleadr does too)
    finally:
        await bridge.stop()
        await vtn.stop()


async def test_a_report_answered_with_reregistration_is_kept_and_the_ven_registers_again(
        dr_env: dict[str, str], meter_id: str) -> None:
    """A VTN that looks VENs up (openleadr's recommended setup) and has forgotten this one answers its
    next report ``oadrRequestReregistration``: the report is not taken as delivered, the VEN registers
    again at once (its polls are held here) and the report reaches the VTN's report callbacks."""
    from datetime import UTC, datetime

    vtn = UtilityVtn(poll_s=POLL_S, sampling_s=1.0, ven_lookup=True)
    await vtn.start()
    assert vtn.server is not None
    make_twin(meter_id, power_w=1750.0)
    bridge = Bridge([meter_id], BridgeConfig(vtn_url=vtn.url, due_poll_s=0.1, telemetry_refresh_s=0.5),
                    handler_invoker(handler, SERVICE))
    try:
        await bridge.start()
        ven = bridge.vens[meter_id]
        await wait_until(lambda: any(r.ven_id == meter_id for r in vtn.reports), 10)
        for job in ven.scheduler.get_jobs():
            if getattr(job.func, "__name__", "") == "_poll":
                job.pause()  # only a report can now learn that the VTN forgot the VEN
        vtn.registered.clear()  # the VTN forgets the VEN: it answers every message oadrRequestReregistration
        forgot = datetime.now(UTC)
        await wait_until(lambda: any(r.ven_id == meter_id and r.sampled is not None and r.sampled > forgot
                                     for r in vtn.reports), 15)
        assert meter_id in vtn.registered
    finally:
        await bridge.stop()
        await vtn.stop()


def test_jobs_cancelled_by_the_scheduler_shutdown_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A bridge of 1,000 VENs stopping cancels job runs not yet started; apscheduler would log each
    as "Error running job" with a CancelledError traceback. Real job failures are still logged."""
    import asyncio
    import logging

    from dr_bridge.bridge import quiet_scheduler_logs

    quiet_scheduler_logs()
    quiet_scheduler_logs()  # idempotent
    executor_log = logging.getLogger("apscheduler.executors.default")
    for exc in (asyncio.CancelledError(), ValueError("a real failure")):
        try:
            raise exc
        except BaseException:
            executor_log.exception("Error running job %s", type(exc).__name__)
    assert "Error running job CancelledError" not in caplog.text
    assert "Error running job ValueError" in caplog.text
    assert "a real failure" in caplog.text


async def test_an_empty_distribution_cancels_every_event(vtn: UtilityVtn, bridge_for: BridgeFactory,
                                                         commands_seen: CommandObserver, meter_id: str) -> None:
    """OpenADR 2.0b: an ``oadrDistributeEvent`` without events cancels, by implication, every event
    the VEN had (openleadr's client drops such a message before its event handler)."""
    make_twin(meter_id)
    await bridge_for([meter_id])
    first = vtn.issue([meter_id], intervals=[(1.0, 30.0, 2)])
    await wait_until(lambda: limits(commands_seen, meter_id)[:1] == [1250.0], 10)
    assert vtn.server is not None
    vtn.withdraw([meter_id], first)
    polls = vtn.server.services["poll_service"]
    original = polls.handlers["oadrPoll"]
    sent: list[bool] = []

    async def empty_once(payload: dict[str, Any]) -> Any:
        if sent:
            return await original(payload)
        sent.append(True)
        return "oadrDistributeEvent", {"events": [], "request_id": "empty-1"}

    polls.handlers["oadrPoll"] = empty_once
    await wait_until(lambda: limits(commands_seen, meter_id)[-1:] == [None], 10)
    rec = record(meter_id, first)
    assert (rec["status"], rec["cancelled"]["how"]) == ("cancelled", "implied")


async def test_reports_answered_with_a_server_error_are_kept_and_sent_again(
        vtn: UtilityVtn, bridge_for: BridgeFactory, meter_id: str) -> None:
    """A 5xx is not the VTN taking the report (a proxy in front of a restarting VTN answers 502/503):
    the report stays queued and is sent again once the VTN answers."""
    from datetime import datetime

    from openleadr import errors

    make_twin(meter_id, power_w=1750.0)
    bridge = await bridge_for([meter_id])
    ven = bridge.vens[meter_id]
    await wait_until(lambda: any(r.ven_id == meter_id for r in vtn.reports), 10)
    assert vtn.server is not None
    reports = vtn.server.services["report_service"]
    original = reports.handlers["oadrUpdateReport"]
    refused: set[datetime] = set()  # the sample times of the reports answered 503
    calls: list[int] = []

    async def unavailable(payload: dict[str, Any]) -> Any:
        calls.append(1)
        refused.update(i["dtstart"] for r in payload.get("reports", []) for i in r.get("intervals", []))
        raise errors.HTTPError(503, "VTN restarting")

    reports.handlers["oadrUpdateReport"] = unavailable
    await wait_until(lambda: len(calls) >= 3 and len(ven.report_backlog) >= 2, 15)
    reports.handlers["oadrUpdateReport"] = original
    await wait_until(lambda: refused <= {r.sampled for r in vtn.reports if r.ven_id == meter_id}, 15)
