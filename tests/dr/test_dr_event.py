"""dr-event: decisions, event state, execution and REST routes, through the handler contract.

Real Redis and Mosquitto (fixtures); commands are observed on the meter's MQTT command
topic, acks are fed through the write capability as the meter would send them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from metertwin.core import topics
from metertwin.core.auth import issue_token
from metertwin.core.clients import get_redis
from metertwin.dr import decisions, schedule, wire
from metertwin.dr.settings import get_dr_settings
from metertwin.twin.commands import get_commands
from metertwin.twin.messages import CommandAck
from metertwin.twin.state import TwinStore
from storage.embedded import Mosquitto
from tests.conftest import TEST_SIGNING_KEY
from tests.invoke import call, load_handler

handler = load_handler("dr-event")


def token(*scopes: str, meter: str | None = None) -> str:
    return issue_token("tester", set(scopes), meter=meter, key=TEST_SIGNING_KEY)


SERVICE = token("service")


def wait_for(predicate: Callable[[], Any], timeout_s: float = 5.0, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


class CommandObserver:
    """Service-account MQTT subscriber on meters' command topics: (arrival time, command) pairs."""

    def __init__(self, broker: Mosquitto, topic: str = "meters/+/down/cmd") -> None:
        self.received: list[tuple[float, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(broker.service_user, broker.service_password)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(5)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append((time.time(), topics.meter_id_of(msg.topic), json.loads(msg.payload)))

    def commands(self, meter_id: str) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return [(t, c) for t, m, c in self.received if m == meter_id and c.get("kind") == "load_limit"]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def dr_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The zone environment plus short DR timings (acks are checked after 0.4 s)."""
    monkeypatch.setenv("DR_ACK_TIMEOUT_S", "0.4")
    monkeypatch.setenv("DR_RESTORE_RETRY_S", "5")
    get_dr_settings.cache_clear()
    yield env
    get_dr_settings.cache_clear()


@pytest.fixture
def commands_seen(mosquitto: Mosquitto) -> Iterator[CommandObserver]:
    obs = CommandObserver(mosquitto)
    yield obs
    obs.close()


def make_twin(meter_id: str, power_w: float = 2000.0, groups: list[Any] | None = None,
              profile: dict[str, Any] | None = None) -> None:
    """A twin in Redis; ``profile`` written directly (group / resource membership: the registry has none yet)."""
    store = TwinStore(get_redis())
    store.create(meter_id, "edge", {"groups": groups or [], **(profile or {})})
    store.report_measurement(meter_id, {"ts": time.time(), "import_kwh": 1.0, "export_kwh": 0.0,
                                        "power_w": power_w, "voltage_v": 230.0}, seq=None)


def ev(event_id: str = "E1", *, mod: int = 0, lead_s: float = 0.3, duration_s: float = 1.5, level: float = 2,
       name: str = "SIMPLE", type_: str = "level", status: str = "far", startafter_s: float = 0.0,
       targets: list[dict[str, Any]] | None = None, intervals: list[tuple[float, float, float]] | None = None,
       units: tuple[str, str, str] | None = None) -> dict[str, Any]:
    """One normalised event; ``units`` = (itemBase, itemUnits, siScaleCode)."""
    now = time.time()
    ivs = intervals or [(lead_s, duration_s, level)]
    start = now + min(a for a, _, _ in ivs)
    end = now + max(a + d for a, d, _ in ivs)
    return {"event_id": event_id, "modification_number": mod, "status": status, "start": start,
            "duration_s": end - start, "startafter_s": startafter_s, "market_context": "oadr://test",
            "signals": [{"name": name, "type": type_, "id": "s1",
                         **(dict(zip(("item_base", "units", "scale"), units, strict=True)) if units else {}),
                         "intervals": [{"start": now + a, "duration_s": d, "payload": p} for a, d, p in ivs]}],
            "targets": targets if targets is not None else [{"ven_id": "VEN-X"}]}


def deliver(meter_id: str, *events: dict[str, Any], ven_id: str = "VEN-X") -> dict[str, dict[str, Any]]:
    status, body = call(handler, "POST", "/events", token=SERVICE,
                        body={"meter_id": meter_id, "ven_id": ven_id, "vtn_id": "Vtn", "events": list(events)})
    assert status == 200, body
    return {a["event_id"]: a for a in body["responses"]}


def run_due() -> dict[str, Any]:
    status, body = call(handler, "POST", "/due", token=SERVICE)
    assert status == 200, body
    return dict(body)


def ack(meter_id: str, command_id: str, status: str = "applied") -> None:
    get_commands().on_ack(meter_id, CommandAck(id=command_id, status=status, ts=time.time()))  # type: ignore[arg-type]


def record(meter_id: str, event_id: str) -> dict[str, Any]:
    status, body = call(handler, "GET", f"/meters/{meter_id}/events/{event_id}", token=token("utility"))
    assert status == 200, body
    return dict(body["event"])


# --- decisions (pure) ----------------------------------------------------------------
def _decide(event: dict[str, Any], prefs: dict[str, Any] | None = None, power_w: float | None = 2000.0,
            ven_id: str = "VEN-X") -> decisions.Decision:
    twin = None
    if power_w is not None:
        from metertwin.twin.state import Twin

        twin = Twin("m1", 1, "edge", {}, {"ts": time.time(), "power_w": power_w}, -1, {}, {}, 0.0)
    return decisions.decide(wire.EventIn.model_validate(event), decisions.Preferences(**(prefs or {})), twin, "m1",
                            ven_id, time.time())


def test_simple_levels_map_to_load_limits_above_the_comfort_floor() -> None:
    # flexible load defaults to half the measured 2000 W; levels shed 50 / 75 / 100 % of it
    assert _decide(ev(level=1)).steps[0][1] == 1500.0
    assert _decide(ev(level=2)).steps[0][1] == 1250.0
    assert _decide(ev(level=3)).steps[0][1] == 1000.0
    assert _decide(ev(level=3), {"flexible_load_w": 1800, "min_power_w": 600}).steps[0][1] == 600.0
    zero = _decide(ev(level=0))
    assert zero.opt == decisions.OPT_IN
    assert zero.steps == []


def test_price_and_load_dispatch_signals() -> None:
    # quantities carry their itemBase and siScaleCode (issue 11 item 2): 0.8 kW is 800 W, 800 "none" is 800 W
    per_kwh = ("currencyPerKWh", "GBP", "none")
    kw = ("powerReal", "W", "k")
    assert _decide(ev(name="ELECTRICITY_PRICE", type_="price", level=0.10, units=per_kwh)).steps == []
    assert _decide(ev(name="ELECTRICITY_PRICE", type_="price", level=0.50, units=per_kwh)).steps[0][1] == 1250.0
    assert _decide(ev(name="LOAD_DISPATCH", type_="setpoint", level=0.8, units=kw)).steps[0][1] == 800.0
    assert _decide(ev(name="LOAD_DISPATCH", type_="setpoint", level=415.4,
                      units=("powerReal", "W", "none"))).steps[0][1] == 415.4
    assert _decide(ev(name="LOAD_DISPATCH", type_="delta", level=-0.5, units=kw)).steps[0][1] == 1500.0
    for units in (None, ("powerReal", "kW", "none"), ("energyReal", "Wh", "k"), ("powerReal", "W", "kilo")):
        unreadable = _decide(ev(name="LOAD_DISPATCH", type_="setpoint", level=0.8, units=units))
        assert (unreadable.opt, unreadable.code) == (decisions.OPT_OUT, decisions.INVALID_DATA), units
    assert _decide(ev(name="ELECTRICITY_PRICE", type_="price", level=0.5)).code == decisions.INVALID_DATA
    assert _decide(ev(name="LOAD_DISPATCH", type_="multiplier", level=0.25)).steps[0][1] == 500.0
    # multi-interval: the plan follows the intervals and ends unlimited
    d = _decide(ev(intervals=[(1, 2, 1), (3, 2, 3)]))
    assert [w for _, w in d.steps] == [1500.0, 1000.0]


def test_a_price_in_another_currency_than_the_threshold_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 11 item 2: never guess. A GBP threshold is not compared with a USD price.
    usd = ("currencyPerKWh", "USD", "none")
    assert _decide(ev(name="ELECTRICITY_PRICE", type_="price", level=0.50, units=usd)).steps[0][1] == 1250.0
    refused = _decide(ev(name="ELECTRICITY_PRICE", type_="price", level=0.50, units=usd), {"price_currency": "GBP"})
    assert (refused.opt, refused.code) == (decisions.OPT_OUT, decisions.INVALID_DATA)
    assert "USD" in refused.reason
    assert "GBP" in refused.reason
    gbp = ("currencyPerKWh", "GBP", "none")
    assert _decide(ev(name="ELECTRICITY_PRICE", type_="price", level=0.50, units=gbp),
                   {"price_currency": "GBP"}).steps[0][1] == 1250.0
    # the zone's default currency, unless the consumer's preferences name theirs
    monkeypatch.setenv("DR_PRICE_CURRENCY", "EUR")
    get_dr_settings.cache_clear()
    try:
        assert _decide(ev(name="ELECTRICITY_PRICE", type_="price", level=0.50, units=gbp)).code == \
            decisions.INVALID_DATA
        assert _decide(ev(name="ELECTRICITY_PRICE", type_="price", level=0.50, units=gbp),
                       {"price_currency": "GBP"}).steps[0][1] == 1250.0
    finally:
        monkeypatch.delenv("DR_PRICE_CURRENCY")
        get_dr_settings.cache_clear()
    with pytest.raises(ValueError, match="price_currency"):
        decisions.Preferences(price_currency="pounds")


def test_opt_out_reasons_and_error_codes() -> None:
    assert _decide(ev(), {"opt_out": True}).opt == decisions.OPT_OUT
    long_event = _decide(ev(duration_s=7200), {"max_event_duration_s": 3600})
    assert (long_event.opt, long_event.code) == (decisions.OPT_OUT, decisions.OK)
    assert "comfort" in long_event.reason
    assert _decide(ev(), {"flexible_load_w": 0}).opt == decisions.OPT_OUT
    bad = _decide(ev(name="BID_PRICE", type_="price"))
    assert (bad.opt, bad.code) == (decisions.OPT_OUT, decisions.SIGNAL_NOT_SUPPORTED)
    elsewhere = _decide(ev(targets=[{"ven_id": "someone-else"}]))
    assert (elsewhere.opt, elsewhere.code) == (decisions.OPT_OUT, decisions.TARGET_MISMATCH)
    assert _decide(ev(targets=[{"resource_id": "m1"}])).opt == decisions.OPT_IN
    level = _decide(ev(level=7))
    assert (level.opt, level.code) == (decisions.OPT_OUT, decisions.INVALID_DATA)
    assert "level 7" in level.reason


# --- deliveries through the handler ---------------------------------------------------
def test_delivery_stores_event_and_redelivery_gives_same_answer(dr_env: dict[str, str], meter_id: str) -> None:
    make_twin(meter_id)
    first = deliver(meter_id, ev("E1", lead_s=600))
    assert first["E1"]["opt"] == "optIn"
    assert first["E1"]["response_code"] == 200
    rec = record(meter_id, "E1")
    assert rec["status"] == "far"
    assert rec["baseline_w"] == 2000.0
    assert rec["plan"][0][1] == 1250.0
    assert rec["exec"]["state"] == "scheduled"
    again = deliver(meter_id, ev("E1", lead_s=600))
    assert again["E1"]["opt"] == "optIn"
    near = deliver(meter_id, ev("E1", lead_s=600), ev("E2", lead_s=10))
    assert record(meter_id, "E2")["status"] == "near"
    assert set(near) == {"E1", "E2"}


def test_malformed_and_failing_events_do_not_spoil_the_others(dr_env: dict[str, str], meter_id: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    make_twin(meter_id)
    broken = {"event_id": "BAD", "modification_number": 0, "signals": []}
    answers = deliver(meter_id, broken, ev("GOOD", lead_s=600))
    assert answers["BAD"] == {**answers["BAD"], "opt": "optOut", "response_code": decisions.INVALID_DATA}
    assert answers["GOOD"]["opt"] == "optIn"

    real_decide = decisions.decide

    def flaky(event: wire.EventIn, *a: Any, **kw: Any) -> decisions.Decision:
        if event.event_id == "BOOM":
            raise RuntimeError("simulated bug")
        return real_decide(event, *a, **kw)

    monkeypatch.setattr(schedule, "decide", flaky)
    answers = deliver(meter_id, ev("GOOD", lead_s=600), ev("BOOM", lead_s=600), ev("NEW", lead_s=600))
    assert answers["BOOM"]["opt"] == "optOut"
    assert answers["BOOM"]["response_code"] == decisions.OTHER_ERROR
    assert answers["GOOD"]["opt"] == "optIn"
    assert answers["NEW"]["opt"] == "optIn"
    assert record(meter_id, "GOOD")["cancelled"] is None


def test_unknown_meter_and_bad_delivery(dr_env: dict[str, str]) -> None:
    answers = deliver("ghost", ev("E1"))
    assert answers["E1"]["response_code"] == decisions.INVALID_ID
    status, body = call(handler, "POST", "/events", token=SERVICE, body={"meter_id": "m"})
    assert status == 400
    assert "events" in body["message"]
    status, _ = call(handler, "POST", "/events", token=token("utility"), body={"meter_id": "m", "events": []})
    assert status == 403


def test_event_executes_in_window_then_restores(dr_env: dict[str, str], meter_id: str,
                                                commands_seen: CommandObserver) -> None:
    make_twin(meter_id)
    event = ev("EXE", lead_s=0.3, duration_s=3.0, level=3)
    deliver(meter_id, event)

    def ack_all() -> bool:
        # the meter acknowledges whatever reached it (retries included, if the box is slow)
        for _, cmd in commands_seen.commands(meter_id):
            ack(meter_id, cmd["id"])
        return False

    wait_for(lambda: run_due() and commands_seen.commands(meter_id), timeout_s=5)
    at, cmd = commands_seen.commands(meter_id)[0]
    assert cmd["params"] == {"watts": 1000.0}
    assert event["start"] - 0.05 <= at < event["start"] + event["duration_s"]
    wait_for(lambda: ack_all() or (run_due() and record(meter_id, "EXE")["exec"]["state"] == "applied"),
             timeout_s=5)
    wait_for(lambda: run_due() and commands_seen.commands(meter_id)[-1][1]["params"] == {"watts": None},
             timeout_s=8)
    at_end, _restore = commands_seen.commands(meter_id)[-1]
    assert at_end >= event["start"] + event["duration_s"] - 0.05
    wait_for(lambda: ack_all() or (run_due() and record(meter_id, "EXE")["exec"]["state"] == "restored"),
             timeout_s=5)
    rec = record(meter_id, "EXE")
    assert rec["status"] == "completed"
    states = [h["state"] for h in rec["exec"]["history"]]
    assert states[:2] == ["scheduled", "applying"]
    assert "applied" in states


def test_unreachable_meter_is_marked_and_retried_within_window(dr_env: dict[str, str], meter_id: str,
                                                               commands_seen: CommandObserver) -> None:
    make_twin(meter_id)
    deliver(meter_id, ev("OFF", lead_s=0.1, duration_s=3.0, level=2))
    wait_for(lambda: run_due() and record(meter_id, "OFF")["exec"]["state"] == "meter_unreachable", timeout_s=5)
    wait_for(lambda: run_due() and len(commands_seen.commands(meter_id)) >= 2, timeout_s=5)
    first, retry = commands_seen.commands(meter_id)[:2]
    assert retry[1]["params"] == first[1]["params"] == {"watts": 1250.0}
    # the meter comes back: the retry's ack marks the event applied

    def meter_back() -> bool:
        ack(meter_id, record(meter_id, "OFF")["exec"]["command_id"])  # the latest retry reaches the meter
        return bool(run_due()) and record(meter_id, "OFF")["exec"]["state"] == "applied"

    wait_for(meter_back, timeout_s=5)
    history = [h["state"] for h in record(meter_id, "OFF")["exec"]["history"]]
    assert "meter_unreachable" in history


def test_modification_explicit_and_implied_cancellation(dr_env: dict[str, str], meter_id: str,
                                                        commands_seen: CommandObserver) -> None:
    make_twin(meter_id)
    e1 = ev("MOD", lead_s=0.1, duration_s=30, level=1)
    deliver(meter_id, e1, ev("GONE", lead_s=0.1, duration_s=30, level=1))
    wait_for(lambda: run_due() and commands_seen.commands(meter_id), timeout_s=5)
    assert commands_seen.commands(meter_id)[-1][1]["params"] == {"watts": 1500.0}
    # modification: level 3 now, while active -> new limit at once
    modified = {**e1, "modification_number": 1, "signals": [{**e1["signals"][0], "intervals": [
        {**e1["signals"][0]["intervals"][0], "payload": 3}]}]}
    answers = deliver(meter_id, modified, ev("GONE", lead_s=0.1, duration_s=30, level=1))
    assert answers["MOD"]["modification_number"] == 1
    wait_for(lambda: run_due() and commands_seen.commands(meter_id)[-1][1]["params"] == {"watts": 1000.0})
    assert record(meter_id, "MOD")["modification_number"] == 1
    # implied cancellation: GONE is no longer delivered
    answers = deliver(meter_id, modified)
    rec = record(meter_id, "GONE")
    assert rec["status"] == "cancelled"
    assert rec["cancelled"]["how"] == "implied"
    # explicit cancellation of MOD -> the meter is restored
    answers = deliver(meter_id, {**modified, "modification_number": 2, "status": "cancelled"})
    assert answers["MOD"]["response_code"] == 200
    wait_for(lambda: run_due() and commands_seen.commands(meter_id)[-1][1]["params"] == {"watts": None})
    assert record(meter_id, "MOD")["cancelled"]["how"] == "explicit"
    status, body = call(handler, "GET", f"/meters/{meter_id}/events", token=token("consumer", meter=meter_id))
    assert status == 200
    assert {e["status"] for e in body["events"]} == {"cancelled"}


def test_overlapping_events_take_the_lowest_limit(dr_env: dict[str, str], meter_id: str,
                                                  commands_seen: CommandObserver) -> None:
    make_twin(meter_id)
    deliver(meter_id, ev("A", lead_s=0.1, duration_s=30, level=1), ev("B", lead_s=0.1, duration_s=0.8, level=3))
    wait_for(lambda: run_due() and any(c["params"] == {"watts": 1000.0} for _, c in commands_seen.commands(meter_id)))
    # B ends: A's limit, not "unlimited"
    wait_for(lambda: run_due() and commands_seen.commands(meter_id)[-1][1]["params"] == {"watts": 1500.0})


# --- preferences, telemetry, operator view ----------------------------------------------
def test_preferences_are_set_by_the_consumer_and_drive_opt_out(dr_env: dict[str, str], meter_id: str) -> None:
    make_twin(meter_id)
    mine = token("consumer", meter=meter_id)
    status, body = call(handler, "PUT", f"/meters/{meter_id}/dr-preferences", token=mine,
                        body={"opt_out": True, "min_power_w": 300})
    assert status == 200, body
    status, _ = call(handler, "PUT", f"/meters/{meter_id}/dr-preferences", token=token("consumer", meter="other"),
                     body={"opt_out": False})
    assert status == 403
    status, body = call(handler, "PUT", f"/meters/{meter_id}/dr-preferences", token=mine, body={"min_power_w": -5})
    assert status == 400
    assert "min_power_w" in body["message"]
    status, body = call(handler, "GET", f"/meters/{meter_id}/dr-preferences", token=token("utility"))
    assert body["preferences"]["opt_out"] is True
    answers = deliver(meter_id, ev("E1", lead_s=600))
    assert answers["E1"]["opt"] == "optOut"
    assert "opted out" in answers["E1"]["description"]


def test_telemetry_and_operator_summary(dr_env: dict[str, str], meter_id: str) -> None:
    make_twin(meter_id, power_w=1800)
    deliver(meter_id, ev("SUM", lead_s=600))
    status, body = call(handler, "POST", "/telemetry", token=SERVICE, body={"meter_ids": [meter_id, "ghost"]})
    assert status == 200
    assert body["meters"][meter_id]["power_w"] == 1800
    assert body["meters"][meter_id]["online"] is True
    assert body["meters"]["ghost"] is None
    TwinStore(get_redis()).report_measurement(meter_id, {"ts": time.time(), "import_kwh": 1.1, "export_kwh": 0.0,
                                                         "power_w": 1000.0, "voltage_v": 230.0}, seq=None)
    status, body = call(handler, "GET", "/events/SUM", token=token("utility"))
    assert status == 200
    assert body["totals"]["opt_in"] == 1
    assert body["totals"]["shed_w"] == 800.0
    status, _ = call(handler, "GET", "/events/SUM", token=token("consumer", meter=meter_id))
    assert status == 403
    status, body = call(handler, "GET", "/events", token=token("utility"))
    assert status == 200
    assert body["events"][0]["event_id"] == "SUM"


def test_cron_backstop_route(dr_env: dict[str, str]) -> None:
    status, body = call(handler, "POST", "/", token=SERVICE, headers={"X-Connector": "cron-connector"})
    assert status == 200
    assert body["claimed"] == 0
    status, _ = call(handler, "POST", "/", token=SERVICE)
    assert status == 400


def test_numeric_ids_from_openleadr_are_accepted(dr_env: dict[str, str]) -> None:
    # openleadr parses all-digit XML text ("0421") as an int: ids must still validate and targets match
    from dr_bridge.convert import normalize_event

    make_twin("0421")
    raw: dict[str, Any] = {"event_descriptor": {"event_id": 1234, "modification_number": 0, "event_status": "far"},
           "active_period": {"dtstart": time.time() + 600, "duration": 60.0},
           "event_signals": [{"signal_name": "SIMPLE", "signal_type": "level", "signal_id": 9333798,
                              "intervals": [{"duration": 60.0, "signal_payload": 1.0}]}],
           "targets": [{"ven_id": 421}, {"resource_id": ["0421"]}]}
    doc = normalize_event(raw)
    assert doc["event_id"] == "1234"
    assert doc["signals"][0]["intervals"][0]["start"] == raw["active_period"]["dtstart"]
    answers = deliver("0421", doc, ven_id="0421")
    assert answers["1234"]["opt"] == "optIn"


def test_test_events_run_only_when_the_setting_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    test_event = {**ev(level=2), "test_event": True}
    off = _decide(test_event)
    assert (off.opt, off.steps) == (decisions.OPT_IN, [])
    monkeypatch.setenv("DR_EXECUTE_TEST_EVENTS", "true")
    get_dr_settings.cache_clear()
    try:
        assert [w for _, w in _decide(test_event).steps] == [1250.0]
    finally:
        monkeypatch.delenv("DR_EXECUTE_TEST_EVENTS")
        get_dr_settings.cache_clear()
