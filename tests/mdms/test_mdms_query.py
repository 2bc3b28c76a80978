"""The query function: hot and cold merged, pagination, CSV, energy, billing, access and bad input."""

from __future__ import annotations

import csv
import io
import time
from typing import Any

import pytest

from metertwin.mdms import tiering
from tests.invoke import call
from tests.mdms.mdms_fixtures import (
    DAY_S,
    INTERVAL_S,
    day_series,
    day_start,
    mdms_env,
    query_handler,
    query_rows,
    reading,
    register,
    token,
    upload,
)

__all__ = ["mdms_env"]
pytestmark = pytest.mark.usefixtures("mdms_env")


def _load_days(
    meter_id: str, days: tuple[int, ...], n: int = 96, imp0: float = 100.0, seq0: int = 0
) -> list[dict[str, Any]]:
    register(meter_id)
    out: list[dict[str, Any]] = []
    for i, d in enumerate(sorted(days, reverse=True)):
        rows = day_series(meter_id, day_start(d), n, seq0=seq0 + i * 1000, imp0=imp0 + i * 100)
        assert upload(rows, meter_id)["accepted"] == n
        out.extend(rows)
    return out


def test_many_meters_over_hot_and_cold_paginated_return_exactly_what_went_in(meter_id: str) -> None:
    a, b = meter_id, meter_id + "-b"
    went_in = {a: _load_days(a, (4, 1), n=20), b: _load_days(b, (5, 1), n=20, imp0=7.0)}
    tiering.archive()
    lo, hi = day_start(6), time.time()
    got: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        q = {"meters": f"{a},{b}", "from": str(lo), "to": str(hi), "limit": "7"}
        if cursor:
            q["cursor"] = cursor
        status, body = call(query_handler(), "GET", "/intervals", token=token("billing"), query=q)
        assert status == 200, body
        assert body["count"] <= 7
        got.extend(body["rows"])
        pages += 1
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert pages >= 80 // 7
    for m in (a, b):
        mine = [r for r in got if r["meter_id"] == m]
        assert [(r["seq"], r["ts_ms"], r["import_kwh"], r["power_w"], r["voltage_v"]) for r in mine] == [
            (x["seq"], round(x["ts"] * 1000), x["import_kwh"], x["power_w"], x["voltage_v"]) for x in went_in[m]]
        assert {r["tier"] for r in mine[:20]} == {"cold"}
        assert {r["tier"] for r in mine[20:]} == {"hot"}
        assert {r["quality"] for r in mine} == {"valid"}
    assert [r["meter_id"] for r in got] == [a] * 40 + [b] * 40


def test_csv_output(meter_id: str) -> None:
    _load_days(meter_id, (3,), n=6)
    tiering.archive()
    _load_days(meter_id, (1,), n=2, imp0=500.0, seq0=5000)
    status, text = call(query_handler(), "GET", f"/meters/{meter_id}/intervals", token=token("mdms"),
                        query={"from": str(day_start(3)), "to": str(day_start(0)), "format": "csv"})
    assert status == 200
    assert isinstance(text, str)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 8
    assert rows[0]["meter_id"] == meter_id
    assert (rows[0]["tier"], rows[-1]["tier"]) == ("cold", "hot")
    assert float(rows[1]["import_kwh"]) == 100.25
    resp = query_handler().handle(_event(f"/meters/{meter_id}/intervals", {
        "from": str(day_start(3)), "to": str(day_start(0)), "format": "csv", "limit": "3"}), None)
    assert resp["headers"]["Content-Type"] == "text/csv"
    assert resp["headers"]["X-Next-Cursor"]
    assert isinstance(resp["body"], str)


def _event(path: str, query: dict[str, str]) -> Any:
    from starlette.datastructures import Headers, QueryParams

    from tests.invoke import Event

    return Event(b"", Headers({"Authorization": f"Bearer {token('mdms')}"}), "GET", QueryParams(query), path)


def test_consumer_sees_only_its_own_meter(meter_id: str) -> None:
    other = meter_id + "-x"
    _load_days(meter_id, (1,), n=3)
    _load_days(other, (1,), n=3)
    mine = token("consumer", meter=meter_id)
    rows = query_rows(meter_id, day_start(1), day_start(0), tok=mine)
    assert len(rows) == 3
    q = {"from": str(day_start(1)), "to": str(day_start(0))}
    h = query_handler()
    assert call(h, "GET", f"/meters/{other}/intervals", token=mine, query=q)[0] == 403
    assert call(h, "GET", f"/meters/{other}/energy", token=mine, query=q)[0] == 403
    assert call(h, "GET", f"/meters/{other}/billing", token=mine, query=q)[0] == 403
    assert call(h, "GET", "/intervals", token=mine, query={**q, "meters": meter_id})[0] == 403
    assert call(h, "GET", f"/meters/{meter_id}/tiers", token=mine)[0] == 403
    assert call(h, "GET", f"/meters/{meter_id}/energy", token=mine, query=q)[0] == 200
    assert call(h, "GET", f"/meters/{meter_id}/intervals", query=q)[0] == 401


def test_daily_monthly_energy_and_max_demand_hot_and_cold(meter_id: str) -> None:
    register(meter_id)
    d0 = day_start(4)
    imp, rows = 100.0, []
    for k in range(97):  # 96 intervals and the read that closes the last
        rows.append(reading(k, d0 + k * INTERVAL_S, round(imp, 6)))
        imp += 2.0 if k == 72 else 0.25  # 18:00 interval: 2 kWh = 8 kW
    upload(rows, meter_id)
    tiering.archive()  # day 4 goes cold; the closing read at day 3 00:00 too
    q = {"from": str(d0), "to": str(d0 + DAY_S)}
    status, body = call(query_handler(), "GET", f"/meters/{meter_id}/energy", token=token("billing"), query=q)
    assert status == 200, body
    [day] = body["periods"]
    assert day["import_kwh"] == 95 * 0.25 + 2.0
    assert day["max_demand_kw"] == 8.0
    assert day["max_demand_at"].endswith("T18:00:00.000Z")
    assert (day["intervals"], day["missing_intervals"]) == (96, 0)
    status, body = call(query_handler(), "GET", f"/meters/{meter_id}/energy", token=token("billing"),
                        query={**q, "period": "month", "format": "csv"})
    assert status == 200
    [month] = list(csv.DictReader(io.StringIO(body)))
    assert float(month["import_kwh"]) == 25.75


def test_billing_routes_with_builtin_and_inline_tariffs(meter_id: str) -> None:
    register(meter_id)
    d0 = day_start(2)
    rows = [reading(k, d0 + k * INTERVAL_S, 10.0 + k * 0.5) for k in range(97)]
    upload(rows, meter_id)
    q = {"from": str(d0), "to": str(d0 + DAY_S)}
    status, body = call(query_handler(), "GET", f"/meters/{meter_id}/billing", token=token("billing"),
                        query={**q, "tariff": "flat"})
    assert status == 200, body
    assert body["determinants"]["import_kwh"] == 48.0
    assert body["bill"]["total"] == round(48.0 * 0.30 + 8.0, 2)
    tariff = {"name": "two", "default_period": "night", "demand_charge_per_kw": 10.0, "periods": [
        {"name": "day", "price_per_kwh": 0.2, "windows": [{"start": "08:00", "end": "20:00"}]},
        {"name": "night", "price_per_kwh": 0.1}]}
    status, body = call(query_handler(), "POST", f"/meters/{meter_id}/billing", token=token("consumer", meter=meter_id),
                        body={"from": d0, "to": d0 + DAY_S, "tariff": tariff})
    assert status == 200, body
    det = body["determinants"]
    assert (det["periods"]["day"]["import_kwh"], det["periods"]["night"]["import_kwh"]) == (24.0, 24.0)
    assert det["billed_demand_kw"] == 2.0
    assert body["bill"]["total"] == round(24 * 0.2 + 24 * 0.1 + 20.0, 2)
    status, text = call(query_handler(), "GET", f"/meters/{meter_id}/billing", token=token("billing"),
                        query={**q, "format": "csv"})
    assert status == 200
    assert text.splitlines()[0] == "item,quantity,unit,rate,amount"
    status, body = call(query_handler(), "GET", "/tariffs", token=token("billing"))
    assert set(body["tariffs"]) == {"flat", "tou-3"}


def test_latest_and_tiers(meter_id: str) -> None:
    _load_days(meter_id, (4, 1), n=4)  # more than the 2-day estimation limit apart
    h = query_handler()
    status, body = call(h, "GET", f"/meters/{meter_id}/latest", token=token("utility"))
    assert status == 200
    assert body["registers"]["seq"] == 1003
    assert body["counters"]["accepted"] == 8
    status, body = call(h, "GET", f"/meters/{meter_id}/tiers", token=token("mdms"))
    assert [(d["tier"], d["next_archive"]["reason"]) for d in body["days"]] == [("hot", "rarely_read"),
                                                                                ("hot", "young")]
    tiering.archive()
    status, body = call(h, "GET", f"/meters/{meter_id}/tiers", token=token("mdms"))
    assert [d["tier"] for d in body["days"]] == ["cold", "hot"]


@pytest.mark.parametrize(
    ("path", "query", "status", "needle"),
    [
        ("/meters/{m}/intervals", {"to": "2"}, 400, "from is required"),
        ("/meters/{m}/intervals", {"from": "yesterday", "to": "2"}, 400, "neither epoch seconds nor ISO"),
        ("/meters/{m}/intervals", {"from": "10", "to": "5"}, 400, "must be after"),
        ("/meters/{m}/intervals", {"from": "0", "to": "99999999999"}, 400, "exceeds"),
        ("/meters/{m}/intervals", {"from": "1", "to": "2", "limit": "lots"}, 400, "limit"),
        ("/meters/{m}/intervals", {"from": "1", "to": "2", "limit": "0"}, 400, "limit"),
        ("/meters/{m}/intervals", {"from": "1", "to": "2", "format": "xml"}, 400, "format"),
        ("/meters/{m}/intervals", {"from": "1", "to": "2", "cursor": "garbage!"}, 400, "cursor"),
        ("/meters/nobody-here/intervals", {"from": "1", "to": "2"}, 404, "not known"),
        ("/meters/bad%20id/intervals", {"from": "1", "to": "2"}, 400, "meter id"),
        ("/intervals", {"from": "1", "to": "2"}, 400, "meters is required"),
        ("/intervals", {"from": "1", "to": "2", "meters": "{m},nobody-here"}, 404, "nobody-here"),
        ("/intervals", {"from": "1", "to": "2", "meters": ",".join(f"m{i}" for i in range(501))}, 400, "limit"),
        ("/meters/{m}/energy", {"from": "1", "to": "2", "period": "week"}, 400, "period"),
        ("/meters/{m}/energy", {"from": "1", "to": "2", "tz": "Nowhere/Town"}, 400, "tz"),
        ("/meters/{m}/billing", {"from": "1", "to": "2", "tariff": "free-lunch"}, 404, "free-lunch"),
        ("/meters/{m}/nothing", {}, 404, "no route"),
        ("/meters/nobody-here/latest", {}, 404, "not known"),
        ("/meters/nobody-here/tiers", {}, 404, "not known"),
        ("/meters/nobody-here/energy", {"from": "1", "to": "2"}, 404, "not known"),
    ],
)
def test_bad_query_input(meter_id: str, path: str, query: dict[str, str], status: int, needle: str) -> None:
    register(meter_id)
    q = {k: v.replace("{m}", meter_id) for k, v in query.items()}
    got, body = call(query_handler(), "GET", path.replace("{m}", meter_id).replace("%20", " "),
                     token=token("mdms"), query=q)
    assert got == status, body
    assert needle in body["message"]
    assert body["error"]


def test_bad_billing_bodies(meter_id: str) -> None:
    register(meter_id)
    h, tok, path = query_handler(), token("billing"), f"/meters/{meter_id}/billing"
    for body, needle in [
        (b"{", "not valid JSON"),
        ({"from": 1, "to": 2, "tariff": {"name": "t", "periods": [], "default_period": "x"}}, "periods"),
        ({"from": 1, "to": 2, "tariff": 5}, "tariff"),
        ({"from": "soon", "to": 2}, "from"),
        ({"from": 1, "to": 2, "surprise": True}, "surprise"),
        ({"from": 1, "to": 2, "tariff": {"name": "t", "default_period": "a", "periods": [
            {"name": "a", "price_per_kwh": 1, "windows": [{"start": "07:07", "end": "08:00"}]}]}}, "07:07"),
    ]:
        status, resp = call(h, "POST", path, body=body, token=tok)
        assert status == 400, (body, resp)
        assert needle in resp["message"], resp
    status, resp = call(h, "POST", path, body=b"{" + b" " * 2_000_000 + b"}", token=tok)
    assert status == 413
    status, resp = call(h, "POST", path, body={"from": 1, "to": 2, "tariff": "nope"}, token=tok)
    assert status == 404
