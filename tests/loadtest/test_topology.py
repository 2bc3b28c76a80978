"""Topology files validate, and bad ones are rejected with an error naming the bad key or value."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from loadtest.topology import TOPOLOGY_DIR, TopologyError, load_topology, parse_topology


@pytest.mark.parametrize("name", ["tc", "cc", "fcec"])
def test_shipped_topologies_load(name: str) -> None:
    topo = load_topology(name)
    assert topo.name == name
    assert all(link.source for link in topo.links), "every link cites where its figures come from"


def test_shipped_topologies_express_the_three_designs() -> None:
    tc, cc, fcec = (load_topology(n) for n in ("tc", "cc", "fcec"))
    # TC: serial, every app request crosses zone-3 -> zone-2 -> zone-1.
    assert tc.path("apps", "read") == ["apps", "edge", "fog", "cloud"]
    assert tc.path("meters", "ingest") == ["meters", "edge", "fog", "cloud"]
    # CC: everything in the cloud, reached over the WAN.
    assert cc.path("apps", "read") == ["apps", "cloud"]
    assert cc.path("meters", "broker") == ["meters", "cloud"]
    assert {cc.placement.zone_of(c) for c in ("read", "write", "hot-store", "cold-store", "mdms-query")} == {"cloud"}
    # FC-EC: functions at the edge, hot data at the fog, cold data in the cloud.
    assert fcec.path("apps", "read") == ["apps", "edge"]
    assert fcec.path("edge", "hot-store") == ["edge", "fog"]
    assert fcec.path("fog", "cold-store") == ["fog", "cloud"]
    assert fcec.one_way_ms(fcec.path("apps", "read")) < cc.one_way_ms(cc.path("apps", "read"))


def _fcec() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((TOPOLOGY_DIR / "fcec.yml").read_text())
    return data


def _reject(data: dict[str, Any]) -> str:
    with pytest.raises(TopologyError) as info:
        parse_topology(data, origin="bad.yml")
    return str(info.value)


def test_rejects_unknown_key_by_name() -> None:
    data = _fcec()
    data["links"][0]["latency"] = 5
    msg = _reject(data)
    assert "links.0.latency: unknown key" in msg


def test_rejects_unknown_zone_by_value() -> None:
    data = _fcec()
    data["placement"]["read"] = "moon"
    msg = _reject(data)
    assert "placement.read" in msg
    assert "'moon'" in msg


def test_rejects_negative_latency() -> None:
    data = _fcec()
    data["links"][2]["latency_ms"] = -5
    msg = _reject(data)
    assert "links.2.latency_ms" in msg
    assert "-5" in msg


def test_rejects_jitter_above_latency() -> None:
    data = _fcec()
    data["links"][0]["jitter_ms"] = 90
    assert "jitter_ms 90.0 exceeds latency_ms 60.0 on link meters-edge" in _reject(data)


def test_rejects_missing_link_needed_by_placement() -> None:
    data = _fcec()
    data["links"] = [link for link in data["links"] if link["between"] != ["edge", "fog"]]
    msg = _reject(data)
    assert "no link between 'edge' and 'fog'" in msg


def test_rejects_missing_placement_entry_and_duplicate_link() -> None:
    data = _fcec()
    del data["placement"]["hot-store"]
    assert "placement.hot-store: Field required" in _reject(data)
    data = _fcec()
    data["links"].append(copy.deepcopy(data["links"][0]))
    assert "link 'meters-edge' is listed twice" in _reject(data)


def test_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read topology"):
        load_topology(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(TopologyError, match="not valid YAML"):
        load_topology(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(TopologyError, match="a topology is a mapping, got list"):
        load_topology(bad)
