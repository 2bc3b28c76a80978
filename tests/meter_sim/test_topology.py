"""meter_sim's grid topology: the file and the generated tree, placing meters, PV per feeder, the profiles
the registry provisions (real Redis, the registry and fleet handlers in process), and the CLI's checks."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from meter_sim import MeterFleet
from meter_sim.__main__ import main
from meter_sim.topology import GridTopology, TopologyError
from tests.fleet.helpers import provision, search, token

MIDNIGHT = 1_780_000_000 - 1_780_000_000 % 86400

FILE = {
    "pv_share": 0.0,
    "regions": [{"name": "north", "groups": ["north-all"], "substations": [{"name": "SS-1", "feeders": [
        {"name": "F-sunny", "pv_share": 0.5, "transformers": [
            {"name": "T-1", "meters": 4, "rating_w": 20000, "phase": "A", "groups": ["dr-pilot"]},
            {"name": "T-2"}]},
        {"name": "F-shade", "transformers": [{"name": "T-3"}]}]}]}],
}


def test_a_file_places_meters_in_order_with_counts_groups_and_pv_per_feeder() -> None:
    grid = GridTopology.from_dict(FILE)
    ids = [f"m-{i:02d}" for i in range(10)]
    places = grid.assign(ids, seed=3)
    assert grid.meters_of(transformer="T-1") == ids[:4]  # its count, first
    assert grid.meters_of(transformer="T-2") == ids[4:7]  # the 6 left spread over T-2 and T-3
    assert grid.meters_of(transformer="T-3") == ids[7:]
    assert grid.meters_of(group="dr-pilot") == ids[:4]
    assert len(grid.meters_of(group="north-all")) == 10  # inherited from the region
    sunny = grid.meters_of(feeder="F-sunny")
    assert sum(places[m].prosumer for m in sunny) == round(0.5 * len(sunny)) == 4
    assert not any(places[m].prosumer for m in grid.meters_of(feeder="F-shade"))  # the file's default 0
    assert places["m-00"].profile() == {"region": "north", "substation": "SS-1", "feeder": "F-sunny",
                                        "transformer": "T-1", "phase": "A", "kind": places["m-00"].profile()["kind"],
                                        "groups": ["dr-pilot", "north-all"]}
    assert grid.transformer("T-1").rating_w == 20000
    assert GridTopology.from_dict(FILE).assign(ids, seed=3) == places  # deterministic
    assert "3 transformers, 10 meters; PV per feeder: F-sunny 4/7, F-shade 0/3" in grid.summary()


@pytest.mark.parametrize(("doc", "named"), [
    ({"regions": []}, "regions"),
    ({"regions": [{"name": "r", "substations": [{"name": "s", "feeders": [
        {"name": "f", "pv_share": 1.5, "transformers": [{"name": "t"}]}]}]}]},
     "regions.0.substations.0.feeders.0.pv_share"),
    ({"regions": [{"name": "r", "substations": [{"name": "s", "feeders": [
        {"name": "f|x", "transformers": [{"name": "t"}]}]}]}]}, "feeders.0.name: 'f|x'"),
    ({"regions": [{"name": "r", "substations": [{"name": "s", "feeders": [
        {"name": "f", "transformers": [{"name": "t"}, {"name": "t"}]}]}]}]}, "'t' appears twice"),
    ({"regions": [{"name": "r", "substations": [{"name": "s", "feeders": [
        {"name": "f", "transformers": [{"name": "t", "phase": "D"}]}]}]}]}, "transformers.0.phase: 'D'"),
    ({"regions": [{"name": "r", "substations": [{"name": "s", "feeders": []}]}]}, "substations.0.feeders"),
])
def test_a_bad_file_names_the_place_and_value(doc: dict[str, object], named: str) -> None:
    with pytest.raises(TopologyError, match=named.replace("|", r"\|").replace(".", r"\.")):
        GridTopology.from_dict(doc)


def test_too_many_meters_for_counted_transformers_is_refused() -> None:
    grid = GridTopology.from_dict({"regions": [{"name": "r", "substations": [{"name": "s", "feeders": [
        {"name": "f", "transformers": [{"name": "t", "meters": 2}]}]}]}]})
    with pytest.raises(TopologyError, match="3 meters but the topology's transformers hold 2"):
        grid.assign(["a", "b", "c"])


def test_a_generated_grid_and_its_feeder_pv_overrides() -> None:
    grid = GridTopology.generate("1x2x2x2", pv_share=0.25, feeder_pv={"R1-S2-F1": 1.0})
    grid.assign([f"m-{i}" for i in range(32)])
    assert len(grid.transformers) == 8
    assert all(len(grid.meters_of(transformer=t.name)) == 4 for t in grid.transformers)
    assert len(grid.prosumers() & set(grid.meters_of(feeder="R1-S2-F1"))) == 8
    assert len(grid.prosumers() & set(grid.meters_of(feeder="R1-S1-F1"))) == 2
    with pytest.raises(TopologyError, match="no such feeder"):
        GridTopology.generate("1x1x1x1", feeder_pv={"nope": 0.5})
    with pytest.raises(TopologyError, match="'1x2x2' is not REGIONSxSUBSTATIONSxFEEDERSxTRANSFORMERS"):
        GridTopology.generate("1x2x2")


def test_pv_meters_of_the_topology_export_at_midday_and_the_others_never() -> None:
    grid = GridTopology.generate("1x1x2x1", feeder_pv={"R1-S1-F1": 1.0, "R1-S1-F2": 0.0})
    ids = [f"pv-{i}" for i in range(20)]
    grid.assign(ids)
    fleet = MeterFleet("127.0.0.1", 1, dict.fromkeys(ids, "pw"), prosumer_share=0.5, prosumers=grid.prosumers())
    noon = [MIDNIGHT + 12 * 3600.0 + d * 86400.0 for d in range(10)]
    pv = [fleet.meters[m] for m in grid.meters_of(feeder="R1-S1-F1")]
    plain = [fleet.meters[m] for m in grid.meters_of(feeder="R1-S1-F2")]
    assert all(m.model.prosumer for m in pv)
    assert not any(m.model.prosumer for m in plain)
    assert statistics.fmean(m.model.power_w(t) for m in pv for t in noon) < 0  # the feeder exports at midday
    assert all(m.model.power_w(t) > 0 for m in plain for t in noon)
    # the extra load (the demo's EV chargers) adds to the household's, under the settings in force
    meter = plain[0]
    base = meter.power_at(noon[0])
    fleet.add_load(meter.meter_id, 7000)
    assert meter.power_at(noon[0]) == pytest.approx(base + 7000)
    meter.load_limit_w = 5000
    assert meter.power_at(noon[0]) == 5000


def test_the_placements_profiles_are_what_the_registry_provisions(env: dict[str, str]) -> None:
    grid = GridTopology.from_dict(FILE)
    ids = [f"topo-{i:02d}" for i in range(10)]
    places = grid.assign(ids)
    provision([{"meter_id": m, "profile": places[m].profile()} for m in ids])
    status, body = search(token("utility"), feeder="F-sunny")
    assert status == 200, body
    assert body["count"] == 7
    status, body = search(token("utility"), group="dr-pilot")
    assert sorted(m if isinstance(m, str) else m["meter_id"] for m in body["meters"]) == ids[:4]


def test_the_cli_refuses_a_bad_topology_before_doing_anything(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "grid.json"
    bad.write_text(json.dumps({"regions": "north"}))
    out = tmp_path / "creds.json"
    assert main(["register", "--count", "3", "--topology", str(bad), "--out", str(out), "--token", "t"]) == 2
    assert "needs a non-empty list 'regions'" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["run", "--credentials", str(out), "--feeder-pv", "F=2"])
    assert "is not FEEDER=SHARE" in capsys.readouterr().err
