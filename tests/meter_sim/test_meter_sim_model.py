"""meter_sim's measuring model and command logic, without a broker."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from meter_sim import LINKS, FleetConfig, LinkProfile, LoadModel, SimMeter
from meter_sim.device import Rejected

DAY = 86400.0
MIDNIGHT = 1_780_000_000 - 1_780_000_000 % 86400  # a UTC midnight


def make_meter(meter_id: str = "m-1", *, prosumer_share: float = 0.0, seed: int = 7,
               time_scale: float = 1.0, sim_start: float = MIDNIGHT) -> SimMeter:
    cfg = FleetConfig("127.0.0.1", 1, time_scale=time_scale, sim_start=sim_start, wall_start=1000.0)
    return SimMeter(meter_id, "pw", cfg, seed=seed, reporting_interval_s=15, prosumer_share=prosumer_share,
                    link=LINKS["lan"])


def test_same_seed_and_id_give_the_same_meter() -> None:
    a, b, c = make_meter("m-1"), make_meter("m-1"), make_meter("m-2")
    ts = [MIDNIGHT + i * 900.0 for i in range(96)]
    assert [a.model.power_w(t) for t in ts] == [b.model.power_w(t) for t in ts]
    assert [a.model.power_w(t) for t in ts] != [c.model.power_w(t) for t in ts]
    assert a.measure(1000.0) == b.measure(1000.0)


def test_household_load_has_morning_and_evening_peaks() -> None:
    hourly: dict[int, list[float]] = {h: [] for h in range(24)}
    for n in range(50):
        model = LoadModel.draw(random.Random(n), prosumer=False)
        for day in range(3):
            for minute in range(0, 24 * 60, 10):
                hourly[minute // 60].append(model.power_w(MIDNIGHT + day * DAY + minute * 60.0))
    mean = {h: statistics.fmean(v) for h, v in hourly.items()}
    assert mean[8] > 1.5 * mean[3]   # morning peak over the night
    assert mean[19] > 2.0 * mean[3]  # evening peak, the largest
    assert mean[19] > mean[8] > mean[12]
    assert min(min(v) for v in hourly.values()) > 0  # a consumer never exports


def test_prosumers_export_around_noon_and_the_export_register_grows() -> None:
    meter = make_meter(prosumer_share=1.0, time_scale=600.0, sim_start=MIDNIGHT + 11 * 3600.0)
    assert meter.model.prosumer
    assert meter.model.power_w(MIDNIGHT + 3 * 3600.0) > 0  # no sun at night
    noon = [meter.model.power_w(MIDNIGHT + 12 * 3600.0 + d * DAY) for d in range(20)]
    assert statistics.fmean(noon) < 0
    first = meter.measure(1000.0)
    later = meter.measure(1000.0 + 12.0)  # two simulated hours around noon
    assert later["export_kwh"] > first["export_kwh"]
    assert later["import_kwh"] >= first["import_kwh"]


def test_registers_never_go_backwards_and_integrate_power() -> None:
    meter = make_meter(time_scale=60.0)
    readings = [meter.measure(1000.0 + i * 7.3) for i in range(200)]
    for a, b in itertools.pairwise(readings):
        assert b["import_kwh"] >= a["import_kwh"]
        assert b["export_kwh"] >= a["export_kwh"]
    # Going back in time (a clock step) must not undo energy.
    assert meter.measure(500.0)["import_kwh"] == readings[-1]["import_kwh"]
    # Over a simulated day the import is the household's mean load times 24 h, give or take.
    day = make_meter(time_scale=DAY / 100.0)
    start = day.measure(1000.0)["import_kwh"]
    kwh = day.measure(1100.0)["import_kwh"] - start
    assert 0.6 * day.model.mean_load_w * 24 / 1000 < kwh < 1.4 * day.model.mean_load_w * 24 / 1000


def test_open_relay_and_load_limit_shape_power() -> None:
    meter = make_meter(time_scale=60.0)
    meter.apply("load_limit", {"watts": 10})
    assert meter.measure(1000.0)["power_w"] <= 10
    meter.apply("relay", {"state": "open"})
    before = meter.measure(1001.0)
    after = meter.measure(1100.0)
    assert after["power_w"] == 0.0
    assert after["import_kwh"] == before["import_kwh"]


@pytest.mark.parametrize(
    ("kind", "params", "reason"),
    [
        ("relay", {}, "params.state"),
        ("relay", {"state": "OPEN"}, "'OPEN'"),
        ("reporting_interval", {"seconds": True}, "True"),
        ("reporting_interval", {"seconds": 0.5}, "0.5"),
        ("load_limit", {"watts": float("inf")}, "inf"),
        ("tariff", {"tariff_id": ""}, "tariff_id"),
        ("desired", {"fields": {}}, "params.fields"),
        ("desired", {"fields": {"voltage": 240}}, "'voltage'"),
    ],
)
def test_bad_commands_are_rejected_with_a_reason_naming_the_problem(kind: str, params: dict, reason: str) -> None:
    meter = make_meter()
    with pytest.raises(Rejected, match=reason.replace(".", r"\.").replace("(", r"\(")):
        meter.apply(kind, params)
    assert meter.settings() == {"relay": "closed", "reporting_interval_s": 15, "load_limit_w": None,
                                "tariff_id": None}


def test_link_profiles() -> None:
    assert LinkProfile.parse("nbiot") == LinkProfile(0.4, 0.8, "nbiot")
    assert LinkProfile.parse("WiFi").hi_s == 0.14
    assert LinkProfile.parse("0.1-0.2") == LinkProfile(0.1, 0.2)
    assert LinkProfile.parse((0.3, 0.3)).sample(random.Random(1)) == 0.3
    rng = random.Random(3)
    samples = [LINKS["nbiot"].sample(rng) for _ in range(1000)]
    assert min(samples) >= 0.4
    assert max(samples) <= 0.8
    assert LINKS["lan"].sample(rng) == 0.0
    with pytest.raises(ValueError, match="satellite"):
        LinkProfile.parse("satellite")
    with pytest.raises(ValueError, match=r"0\.5"):
        LinkProfile(0.5, 0.1)
