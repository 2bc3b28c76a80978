"""Bulk topology from CSV: per-row errors naming line, column and value; the good rows are applied."""

from __future__ import annotations

from typing import Any

from tests.fleet.helpers import fleet, provision, search, token
from tests.invoke import call


def _import(text: str, mode: str | None = None, content_type: str = "text/csv") -> tuple[int, Any]:
    return call(fleet, "POST", "/meters/import", body=text.encode(), token=token("utility"),
                headers={"Content-Type": content_type}, query={"mode": mode} if mode else None)


def test_good_rows_applied_bad_rows_named(env: dict[str, str], meter_id: str) -> None:
    ids = [f"{meter_id}-{i}" for i in range(6)]
    provision([{"meter_id": m} for m in ids])
    csv_text = "\n".join([
        "meter_id,region,substation,feeder,transformer,phase,lat,lon,tariff,customer_class,groups,tags",
        f"{ids[0]},north,s1,f1,t1,A,51.5,-0.1,tou,residential,pilot;east,vendor=acme;kind=smart2",
        f"{ids[1]},north,s1,f1,t1,D,,,,,,",                       # bad phase
        f"{ids[2]},north,s1,f1,t2,B,95,0,,,,",                    # lat out of range
        f"{ids[3]},north,s1,f1,t2,C,,,,,,vendor",                 # tag without a value
        f"{meter_id}-nope,north,s1,f1,t1,A,,,,,,",                # no such twin
        f"{ids[4]},north,s1,f2,t1,A,,,,,,",                       # t1 already hangs below f1
        f"{ids[0]},north,s1,f1,t1,A,,,,,,",                       # twice in one file
        "",
        f"{ids[5]},north,s1,f1,t2,B,,,flat,commercial,,",
    ])
    status, report = _import(csv_text)
    assert status == 200, report
    assert (report["rows"], report["applied"], report["failed"]) == (8, 2, 6)
    got = {(e["line"], e["column"], e["value"]) for e in report["errors"]}
    assert got == {(3, "phase", "D"), (4, "lat", "95"), (5, "tags", "vendor"), (6, "meter_id", f"{meter_id}-nope"),
                   (7, "feeder", "f2"), (8, "meter_id", ids[0])}
    assert all(e["error"] for e in report["errors"])
    status, body = search(feeder="f1")
    assert [m["meter_id"] for m in body["meters"]] == [ids[0], ids[5]]
    topo = body["meters"][0]["topology"]
    assert topo["groups"] == ["east", "pilot"]
    assert topo["tags"] == {"kind": "smart2", "vendor": "acme"}
    assert topo["location"] == {"lat": 51.5, "lon": -0.1}
    # the same file again: nothing changes for the rows already applied
    status, again = _import(csv_text)
    assert (again["applied"], again["unchanged"]) == (0, 2)


def test_merge_and_replace_modes(env: dict[str, str], meter_id: str) -> None:
    provision([{"meter_id": meter_id, "profile": {"feeder": "f1", "tariff": "tou", "tags": {"a": "1"}}}])
    _status, report = _import(f"meter_id,transformer,tags\n{meter_id},t1,b=2\n")
    assert report["applied"] == 1
    _status, doc = call(fleet, "GET", f"/meters/{meter_id}/topology", token=token("billing"))
    assert doc["topology"] == {"zone": "edge", "feeder": "f1", "tariff": "tou", "transformer": "t1",
                               "tags": {"a": "1", "b": "2"}}
    _status, report = _import(f"meter_id,feeder,tags\n{meter_id},f3,c=3\n", mode="replace")
    assert report["applied"] == 1
    _status, doc = call(fleet, "GET", f"/meters/{meter_id}/topology", token=token("billing"))
    assert doc["topology"] == {"zone": "edge", "feeder": "f3", "tags": {"c": "3"}}
    assert doc["version"] == 3


def test_whole_file_errors(env: dict[str, str], meter_id: str) -> None:
    status, body = _import("meter_id,colour\nm-1,red\n")
    assert status == 400
    assert "'colour'" in body["message"]
    status, body = _import("feeder\nf1\n")
    assert status == 400
    assert "meter_id" in body["message"]
    status, body = _import("meter_id,feeder\n")
    assert status == 400
    status, body = _import("meter_id\nm-1\n", content_type="application/json")
    assert status == 400
    assert body["details"]["field"] == "Content-Type"
    status, body = _import("meter_id\nm-1\n", mode="upsert")
    assert status == 400
    assert "'upsert'" in body["message"]
    status, _ = call(fleet, "POST", "/meters/import", body=b"meter_id\n", token=token("billing"),
                     headers={"Content-Type": "text/csv"})
    assert status == 403
