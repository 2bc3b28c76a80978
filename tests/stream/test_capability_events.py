"""Capabilities' changes are events: DR event state, P2P rounds/clearing/trades, upgrade steps; job and
alert builders; who sees each type (issue 17 item 1)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from metertwin.core.auth import Principal
from metertwin.core.clients import get_redis
from metertwin.core.errors import Forbidden
from metertwin.p2p.registration import register
from metertwin.p2p.runner import run_market
from metertwin.p2p.store import MarketStore
from metertwin.stream import events, keys
from metertwin.stream.access import filter_for
from metertwin.twin.messages import CommandAck
from metertwin.upgrade import keys as upgrade_keys
from tests.dr.test_dr_event import SERVICE, deliver, dr_env, ev, handler, make_twin, token
from tests.invoke import call
from tests.p2p.test_runner import BUYER, SELLER, _open, _spec, _twin
from tests.upgrade.upgrade_fixtures import Meters, manager, meters, spec, twins

__all__ = ["dr_env", "meters", "twins"]  # fixtures: imported for pytest
KEY = keys.zone_events("edge")


def entries(kind: str) -> list[events.Event]:
    return [e for e in (events.Event.from_entry(i, f) for i, f in get_redis().xrange(KEY)) if e.type == kind]


def test_dr_event_state_changes_are_events_of_the_meter(stream_env: dict[str, str], dr_env: dict[str, str],
                                                        meter_id: str) -> None:
    make_twin(meter_id)
    first = ev("E1", lead_s=600, duration_s=60, level=1)
    deliver(meter_id, first)
    deliver(meter_id, first)  # a redelivery changes nothing: no event
    deliver(meter_id, {**first, "modification_number": 1})
    status, body = call(handler, "PUT", f"/meters/{meter_id}/dr-preferences", token=token("consumer", meter=meter_id),
                        body={"opt_out": True})
    assert status == 200, body
    deliver(meter_id, {**first, "modification_number": 2, "status": "cancelled"})
    got = entries("dr")
    assert [e.sub for e in got] == ["received", "modified", "opted_out", "cancelled"]
    assert {e.meter for e in got} == {meter_id}
    assert got[0].topic == f"meters/{meter_id}/dr/received"
    data = [json.loads(e.data) for e in got]
    assert [(d["event_id"], d["modification_number"], d["opt"]) for d in data] == [
        ("E1", 0, "optIn"), ("E1", 1, "optIn"), ("E1", 1, "optOut"), ("E1", 2, "optOut")]
    assert data[-1]["cancelled"] is True
    assert call(handler, "POST", "/due", token=SERVICE)[0] == 200


def test_p2p_market_rounds_and_trades_are_events(stream_env: dict[str, str]) -> None:
    client = get_redis()
    store = MarketStore(client)
    spec_ = _spec()
    market_id = _open(store, spec_)
    for meter_id, p in (("buyer", BUYER), ("seller", SELLER)):
        _twin(client, meter_id)
        store.put_participant(market_id, meter_id, register(spec_, meter_id, p))
    result = run_market(market_id, store)
    got = entries("p2p")
    rounds = [e for e in got if e.sub == "round"]
    assert len(rounds) == result["rounds"]  # one per round, not one per bid
    assert [json.loads(e.data)["round"] for e in rounds] == list(range(1, result["rounds"] + 1))
    assert rounds[0].topic == f"p2p/{market_id}/round"
    assert rounds[0].meter == ""
    assert json.loads(rounds[-1].data)["price"] == result["price"]
    market = [e.sub for e in got if e.meter == "" and e.sub != "round"]
    assert market == ["open", "running", "cleared"]
    trades = {e.meter: json.loads(e.data) for e in got if e.sub == "trade"}
    assert {m: t["side"] for m, t in trades.items()} == {"buyer": "buy", "seller": "sell"}
    assert trades["buyer"]["price"] == result["price"]
    payload = json.loads(rounds[0].to_json())
    assert payload["about"] == market_id
    assert payload["topic"] == f"p2p/{market_id}/round"


def test_upgrade_operation_states_and_twin_steps_are_events(
        stream_env: dict[str, str], twins: Callable[[int], list[str]], meters: Meters) -> None:
    ids = twins(2)
    mgr = manager(meters)

    def refuse(meter_id: str, payload: dict[str, Any], ttl_s: int) -> None:
        ack = CommandAck.model_validate({"id": payload["params"]["id"], "reason": "firmware says no",
                                         "status": "rejected" if meter_id == ids[0] else "applied", "ts": time.time()})
        mgr.on_ack(meter_id, ack)

    mgr._publish = refuse
    op = mgr.start(spec(ids))
    assert mgr.run(op["id"], timeout_s=20)["state"] == "completed"
    got = entries("upgrade")
    states = [e.sub for e in got if e.meter == ""]
    assert states[0] == "planning", states
    assert states[-1] == "completed", states
    assert {e.about for e in got if e.meter == ""} == {op["id"]}
    steps = {(e.meter, e.sub) for e in got if e.meter}
    assert {(ids[0], "rejected"), (ids[1], "switched")} <= steps
    assert json.loads(next(e for e in got if e.sub == "rejected").data)["reason"] == "firmware says no"
    assert get_redis().scard(upgrade_keys.upgrade_op_set(op["id"], "done")) == 1


def test_job_and_alert_builders_round_trip() -> None:
    job = events.job_event("j1", "in_progress", {"succeeded": 3, "failed": 1}, total=10)
    assert (job.topic, job.meter) == ("job/j1/in_progress", "")
    back = events.Event.from_entry("1-0", job.fields())
    assert back.about == "j1"
    assert json.loads(back.data) == {"job": "j1", "status": "in_progress",
                                                            "counts": {"succeeded": 3, "failed": 1}, "total": 10}
    assert events.job_execution("j1", "m-1", "failed", "meter offline").topic == "meters/m-1/job/failed"
    alert = events.alert_event("transformer", "T7", "raised", {"id": "a1", "rule_id": "r1", "value": 81000.0,
                                                               "threshold": 80000, "severity": "critical", "x": 1})
    assert alert.topic == "alert/transformer/T7/raised"
    assert "x" not in json.loads(alert.data)
    assert json.loads(alert.data)["severity"] == "critical"
    # A reading's entry carries no 'o' field: the hot path's entries stay as small as before.
    assert "o" not in events.reading_event("m-1", "{}", 1).fields()


def test_job_and_alert_emitters_append(stream_env: dict[str, str]) -> None:
    events.job_changed(get_redis(), "j2", "completed", {"succeeded": 2})
    events.alert_changed(get_redis(), "feeder", "F-7", "cleared", {"id": "a2"})
    assert [e.topic for e in entries("job") + entries("alert")] == ["job/j2/completed", "alert/feeder/F-7/cleared"]


def _principal(*scopes: str, meter: str | None = None) -> Principal:
    return Principal("t", frozenset(scopes), meter, time.time() + 60)


@pytest.mark.parametrize(("scopes", "meter", "sees"), [
    # consumer: its own meter's DR, trade, upgrade step and job execution; no market, operation, job, alert
    (("consumer",), "m-1", {"dr-own", "trade-own", "upgrade-own", "job-own"}),
    # ems: only ems and reading events of its meter
    (("ems",), "m-1", set()),
    # billing: readings and P2P (the trades' settlement lines and the rounds that priced them), any meter
    (("billing",), None, {"trade-own", "trade-other", "round"}),
    (("utility",), None, {"dr-own", "dr-other", "trade-own", "trade-other", "round", "upgrade-op", "upgrade-own",
                          "job", "job-own", "alert"}),
])
def test_who_sees_the_new_types(scopes: tuple[str, ...], meter: str | None, sees: set[str]) -> None:
    samples = {
        "dr-own": events.dr_event("m-1", "E1", "received", {"opt": "optIn"}),
        "dr-other": events.dr_event("m-2", "E1", "received", {"opt": "optIn"}),
        "trade-own": events.p2p_trade("mk", {"meter_id": "m-1", "side": "buy"}),
        "trade-other": events.p2p_trade("mk", {"meter_id": "m-2", "side": "sell"}),
        "round": events.p2p_round("mk", {"round": 1}),
        "upgrade-op": events.upgrade_state("op1", "canary"),
        "upgrade-own": events.upgrade_twin("op1", "m-1", "switched"),
        "job": events.job_event("j1", "in_progress"),
        "job-own": events.job_execution("j1", "m-1", "succeeded"),
        "alert": events.alert_event("feeder", "F", "raised", {}),
    }
    flt = filter_for(_principal(*scopes, meter=meter))
    assert {name for name, e in samples.items() if flt.matches(e)} == sees


def test_asking_for_a_type_beyond_the_scope_is_refused() -> None:
    with pytest.raises(Forbidden, match=r"do not see event type\(s\) \['dr'\]"):
        filter_for(_principal("ems", meter="m-1"), type_="dr")
    with pytest.raises(Forbidden, match="upgrade"):
        filter_for(_principal("billing"), type_="p2p,upgrade")
    assert filter_for(_principal("consumer", meter="m-1"), type_="dr,p2p").types == frozenset({"dr", "p2p"})



def test_dr_execution_changes_name_active_and_completed() -> None:
    from metertwin.dr.store import change_of

    base = {"modification_number": 0, "opt": "optIn", "cancelled": None, "exec": {"state": "scheduled"}}

    def at(state: str, **extra: Any) -> dict[str, Any]:
        return {**base, **extra, "exec": {"state": state}}

    assert change_of(at("scheduled"), at("applying")) == "active"
    assert change_of(at("applying"), at("applied")) == "active"
    assert change_of(at("applied"), at("restoring")) == "execution"
    assert change_of(at("restoring"), at("restored")) == "completed"
    assert change_of(at("restoring", cancelled={"how": "explicit"}),
                     at("restored", cancelled={"how": "explicit"})) == "execution"
    assert change_of(at("applied"), at("applied")) is None  # nothing a watcher would see
    assert change_of(at("applied"), at("applied", opt="optOut")) == "opted_out"


def test_ems_messages_both_ways_are_events_the_meters_ems_sees(stream_env: dict[str, str], meter_id: str) -> None:
    from tests.twin.test_ems_routes import forward, registry
    from tests.twin.test_ems_routes import token as ems_token

    assert call(registry, "POST", "/meters", body={"meter_id": meter_id}, token=ems_token("admin"))[0] == 201
    up = {"id": "up-1", "payload": {"price_signal": 0.31}, "ts": time.time()}
    status, body = call(forward, "POST", "/", token=ems_token("service"), body=up,
                        headers={"X-Topic": f"meters/{meter_id}/up/ems"})
    assert status == 200, body
    assert body["message"]["status"] == "undeliverable"  # no route yet: still an event, with the reason
    status, body = call(forward, "POST", f"/meters/{meter_id}/ems/messages", body={"payload": {"charge": "off"}},
                        token=ems_token("ems", meter=meter_id))
    assert status == 202, body
    got = entries("ems")
    assert [(e.meter, e.sub) for e in got] == [(meter_id, "up"), (meter_id, "down")]
    first, second = (json.loads(e.data) for e in got)
    assert (first["id"], first["status"], first["payload"]) == ("up-1", "undeliverable", {"price_signal": 0.31})
    assert "no EMS route" in first["reason"]
    assert (second["status"], second["payload"]) == ("delivered", {"charge": "off"})
    assert all(filter_for(_principal("ems", meter=meter_id)).matches(e) for e in got)
    assert not any(filter_for(_principal("ems", meter="m-other")).matches(e) for e in got)
