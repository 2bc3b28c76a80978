"""Issue 17 items 2 and 5: the fleet, feeder, DR, P2P, upgrades/jobs and data-quality pages in headless Chromium.

The stream service reads the zones' REST APIs through real gateways (``python -m gateway`` for edge
and fog, ``STREAM_GATEWAY_URLS``); each page loads without console errors, shows the numbers the
REST API gives for the same token (the fleet's counts by zone and feeder too), a DR event, a P2P
market and an upgrade operation driven through their function routes appear live on their pages,
and a consumer token cannot see another meter. One browser for the module.
Screenshots: ``dashboard-<page>.png`` in ``$DASHBOARD_SCREENSHOTS`` (default: the
pytest tmp dir of the test, printed).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.server import GatewayProcess
from metertwin.core.auth import issue_token
from metertwin.core.clients import get_redis
from metertwin.mdms import dead_letters
from metertwin.stream import events
from metertwin.twin.state import twin_store
from metertwin.upgrade.inbox import v1_ingest
from tests.conftest import TEST_SIGNING_KEY
from tests.dr.test_dr_event import ev as dr_event
from tests.stream.test_dashboard_browser import CHROMIUM, DRIVER, pytestmark, severe, text_of, webdriver
from tests.stream.test_service import serve  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[2]
__all__ = ["pytestmark"]
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def errors(driver: Any) -> list[dict[str, Any]]:
    return severe(driver)


def same_number(shown: str, value: float | int | None) -> bool:
    """A card shows ``value`` (JS prints 0.0 as "0"; None as an en dash)."""
    return shown == "\u2013" if value is None else shown not in ("", "\u2013") and float(shown) == value


def open_page(driver: Any, url: str, tok: str) -> None:
    driver.get(url.split("#")[0] + f"#token={tok}")


def wait_rows(driver: Any, tbody_id: str, expected: list[str], timeout_s: float = 10) -> None:
    """Until the rows of #tbody_id read ``expected`` (cells joined by spaces)."""
    from selenium.webdriver.support.ui import WebDriverWait

    def rows(d: Any) -> list[str]:
        return [r.text for r in d.find_element("id", tbody_id).find_elements("tag name", "tr")]

    try:
        WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(lambda d: rows(d) == expected)
    except Exception:
        raise AssertionError(f"#{tbody_id} rows {rows(driver)} != {expected}") from None


def wait_text(driver: Any, element_id: str, part: str, timeout_s: float = 5) -> None:
    """Until #element_id's text contains ``part``."""
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(
            lambda d: part in d.find_element("id", element_id).text)
    except Exception:
        raise AssertionError(f"#{element_id} {driver.find_element('id', element_id).text!r} lacks {part!r}") from None


def test_operator_pages_show_what_the_rest_api_gives(
        serve: Callable[..., int], env: dict[str, str], browser: Any, meter_id: str,  # noqa: F811
        tmp_path: Path) -> None:
    shots = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    zone_env = {f"{z}_{k}": env[k] for z in ("EDGE", "FOG") for k in ("REDIS_URL", "MQTT_HOST", "MQTT_PORT")}
    args = ["--no-background", "--log-level", "warning"]
    with GatewayProcess(ROOT / "stack.yml", "edge", secrets_dir=env["SECRETS_DIR"], env=zone_env, args=args,
                        log_path=tmp_path / "edge.log") as edge, \
         GatewayProcess(ROOT / "stack.yml", "fog", secrets_dir=env["SECRETS_DIR"], env=zone_env, args=args,
                        log_path=tmp_path / "fog.log") as fog:
        port = serve(gateway_urls=f"edge={edge.url},fog={fog.url}", zone_redis_urls=f"fog={env['REDIS_URL']}")
        base = f"http://127.0.0.1:{port}"
        admin = issue_token("operator", {"admin"}, key=TEST_SIGNING_KEY)
        mdms = issue_token("quality", {"mdms"}, key=TEST_SIGNING_KEY)
        hdr = {"Authorization": f"Bearer {admin}"}

        def rest(path: str, token: str = admin) -> dict[str, Any]:
            resp = httpx.get(f"{base}/api/function/{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert resp.status_code == 200, (path, resp.text)
            return dict(resp.json())

        assert httpx.post(f"{edge.url}/function/edge-registry/meters", json={"meter_id": meter_id},
                          headers=hdr, timeout=10).status_code == 201
        patched = httpx.patch(f"{edge.url}/function/edge-fleet/meters/{meter_id}/topology",
                              json={"feeder": "F-7", "transformer": "T-7"}, headers=hdr, timeout=10)
        assert patched.status_code in (200, 201), patched.text
        for rule in ("timestamp", "timestamp", "range"):
            dead_letters.add(meter_id=meter_id, source="test", payload="{}", rule=rule, reason=f"bad {rule}")

        # The edge twin's reading (the fleet's counts below need it fresh; the feeder page's live refresh).
        now = time.time()
        applied = v1_ingest(get_redis()).run(meter_id, json.dumps({"ts": now, "import_kwh": 1.0, "export_kwh": 0.0,
                                                                   "power_w": 812.5, "voltage_v": 230.0}), now, 1)
        assert applied.result == "applied", applied
        # Feeder: fog-grid's aggregates of a feeder with the meter placed on it, its readings through
        # fog-mdms-ingest, the grid drained; an alert of a rule that fires appears live (the fog's stream).
        placed = httpx.put(f"{fog.url}/function/fog-grid/meters/{meter_id}/place", headers=hdr, timeout=10,
                           json={"feeder": "F-7", "transformer": "T-7"})
        assert placed.status_code == 200, placed.text
        now = time.time()
        batch = httpx.post(f"{fog.url}/function/fog-mdms-ingest/readings/batch", headers={
            "Authorization": f"Bearer {mdms}"}, timeout=10, json={"readings": [
                {"meter_id": meter_id, "seq": 1, "ts": now - 300, "import": 10.0, "power": 700.0, "voltage": 229.5},
                {"meter_id": meter_id, "seq": 2, "ts": now - 60, "import": 10.25, "power": 812.5, "voltage": 231.0}]})
        assert batch.status_code == 200, batch.text
        assert batch.json()["accepted"] == 2, batch.text
        drained = httpx.post(f"{fog.url}/function/fog-grid/drain", headers=hdr, timeout=10)
        assert drained.status_code == 200, drained.text
        open_page(browser, f"{base}/feeder?id=F-7&level=feeder", admin)
        text_of(browser, "status", "live", 10)
        node = rest("fog-grid/feeders/F-7")
        assert (node["meters"], node["import_w"]) == (1, 812.5), node
        for card in ("import_w", "export_w", "net_w", "meters", "reporting", "online", "stale", "voltage_min_v",
                     "voltage_max_v"):
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(browser, 10, poll_frequency=0.05).until(
                lambda d, c=card: same_number(d.find_element("id", c).text, node[c]),
                message=f"#{card} != {node[card]}")
        rows = rest(f"fog-grid/feeders/F-7/load?interval=15m&from={int(now) - 86400}&to={int(now) + 900}")["rows"]
        assert sum(r["import_kwh"] for r in rows) == 0.25
        text_of(browser, "intervals", str(len(rows)), 5)
        text_of(browser, "alerts", "0", 5)
        rule = httpx.post(f"{fog.url}/function/fog-grid/rules", headers=hdr, timeout=10, json={
            "name": "F-7 overload", "level": "feeder", "subject": "F-7", "metric": "net_w", "condition": "above",
            "threshold": 500, "hysteresis": 50, "for_s": 0})
        assert rule.status_code == 201, rule.text
        judged = httpx.post(f"{fog.url}/function/fog-grid/rules/evaluate", headers=hdr, timeout=10)
        assert judged.status_code == 200, judged.text
        assert judged.json()["opened"] == 1, judged.text
        wait_text(browser, "last-change", "F-7 overload raised")
        [alert] = rest("fog-grid/alerts?subject=F-7")["alerts"]
        text_of(browser, "alerts", "1", 5)
        wait_rows(browser, "alert-rows", [f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(alert['opened_at']))}"
                                          f".{int(alert['opened_at'] * 1000) % 1000:03d}Z F-7 overload net_w open "
                                          f"{alert['value']:g} 500"])
        browser.save_screenshot(str(shots / "dashboard-feeder.png"))
        assert errors(browser) == []
        # Fleet: counts by zone and by feeder equal the fleet search's exact counts (GET /meters).
        other = f"{meter_id}-b"
        assert httpx.post(f"{edge.url}/function/edge-registry/meters", json={"meter_id": other},
                          headers=hdr, timeout=10).status_code == 201
        twin_store(get_redis()).report(meter_id, {"online": True})
        events.connection(get_redis(), meter_id, True)
        open_page(browser, f"{base}/?stale_s=600", admin)

        def counts(q: str = "") -> list[str]:
            return [str(rest(f"edge-fleet/meters?limit=1{q}{live}")["count"])
                    for live in ("", "&online=true", "&online=false", "&stale_s=600")]

        fleet = counts()
        assert fleet == ["2", "1", "1", "1"]  # meter_id online with a fresh reading, other offline and stale
        for card, expected in zip(("meters", "online", "offline", "stale"), fleet, strict=True):
            text_of(browser, card, expected, 10)
        wait_rows(browser, "feeder-rows", [" ".join(["F-7", *counts("&feeder=F-7")])])
        zones = sorted({m["topology"].get("zone") for m in rest("edge-fleet/meters?limit=1000")["meters"]} - {None})
        wait_rows(browser, "zone-rows", [" ".join([z, *counts(f"&zone={z}")]) for z in zones])
        browser.save_screenshot(str(shots / "dashboard-fleet.png"))
        assert errors(browser) == []

        # DR: a VTN event delivered through edge-dr-event appears live (its 'dr' event refreshes the page).
        open_page(browser, f"{base}/dr", admin)
        text_of(browser, "events", str(len(rest("edge-dr-event/events?limit=20")["events"])), 10)
        bridge = {"Authorization": f"Bearer {issue_token('bridge', {'service'}, key=TEST_SIGNING_KEY)}"}
        delivered = httpx.post(f"{edge.url}/function/edge-dr-event/events", headers=bridge, timeout=10, json={
            "meter_id": meter_id, "ven_id": "VEN-X", "vtn_id": "Vtn", "events": [dr_event("LIVE-1", lead_s=600)]})
        assert delivered.status_code == 200, delivered.text
        text_of(browser, "events", str(len(rest("edge-dr-event/events?limit=20")["events"])), 5)
        wait_text(browser, "last-change", f"{meter_id} LIVE-1 received")
        browser.save_screenshot(str(shots / "dashboard-dr.png"))
        assert errors(browser) == []

        # P2P: a market opened, joined and run through edge-p2p-market: listed, negotiated and traded live.
        open_page(browser, f"{base}/p2p", admin)
        text_of(browser, "markets", str(len(rest("edge-p2p-market/markets?limit=50")["markets"])), 10)
        market = f"live-{meter_id}"[:64]
        opened = httpx.post(f"{edge.url}/function/edge-p2p-market/markets", headers=hdr, timeout=10, json={
            "market_id": market, "slot_start": time.time() + 3600, "feed_in_tariff": 0.08, "retail_tariff": 0.30,
            "deliver": False})
        assert opened.status_code == 201, opened.text
        text_of(browser, "markets", str(len(rest("edge-p2p-market/markets?limit=50")["markets"])), 5)
        for who, bid in ((meter_id, {"forecast_load_kwh": 2.0, "max_buy_price": 0.26, "price_ramp": 0.02}),
                         (other, {"forecast_pv_kwh": 3.0, "min_sell_price": 0.12, "price_ramp": 0.03})):
            joined = httpx.put(f"{edge.url}/function/edge-p2p-market/markets/{market}/participants/{who}",
                               json=bid, headers=hdr, timeout=10)
            assert joined.status_code == 201, joined.text
        ran = httpx.post(f"{edge.url}/function/edge-p2p-market/markets/{market}/run", headers=hdr, timeout=30)
        assert ran.status_code == 200, ran.text
        rounds = rest(f"edge-p2p-market/markets/{market}/rounds")["rounds"]
        assert len(rounds) == ran.json()["rounds"] > 1
        text_of(browser, "rounds", str(len(rounds)), 5)
        text_of(browser, "trades", str(len(rest(f"edge-p2p-market/markets/{market}/trades")["trades"])), 5)
        assert float(browser.find_element("id", "price").text) == rounds[-1]["price"]
        browser.save_screenshot(str(shots / "dashboard-p2p.png"))
        assert errors(browser) == []

        # Upgrades: an operation started through edge-upgrade-manager appears live.
        open_page(browser, f"{base}/ops", admin)
        text_of(browser, "operations", str(len(rest("edge-upgrade-manager/operations")["operations"])), 10)
        started = httpx.post(f"{edge.url}/function/edge-upgrade-manager/operations", headers=hdr, timeout=10,
                             json={"to": "v2", "select": {"meters": [other]}})
        assert started.status_code == 201, started.text
        text_of(browser, "operations", str(len(rest("edge-upgrade-manager/operations")["operations"])), 5)
        wait_text(browser, "last-change", f"{started.json()['id']} planning")
        # The pages left behind closed their streams: only this page's one is open (six would leave the
        # browser no connection to this host for the page's reads).
        assert [ln for ln in httpx.get(f"{base}/metrics", timeout=10).text.splitlines()
                if ln.startswith("metertwin_stream_clients ")] == ["metertwin_stream_clients 1"]
        browser.save_screenshot(str(shots / "dashboard-ops.png"))
        assert errors(browser) == []

        # Data quality: dead letters by rule, as the fog's MDMS lists them.
        listed = rest("fog-mdms-ingest/dead-letters?limit=1000", mdms)
        open_page(browser, f"{base}/quality", mdms)
        text_of(browser, "dead", str(listed["total"]), 10)
        assert listed["total"] == 3
        text_of(browser, "rules", "2", 5)
        browser.save_screenshot(str(shots / "dashboard-quality.png"))
        assert errors(browser) == []

        # A consumer token: its own meter's DR page, never another meter's.
        consumer = issue_token("home", {"consumer"}, meter=meter_id, key=TEST_SIGNING_KEY)
        open_page(browser, f"{base}/dr?meter={meter_id}", consumer)
        text_of(browser, "events", str(len(rest(f"edge-dr-event/meters/{meter_id}/events", consumer)["events"])), 10)
        browser.get(f"{base}/dr?meter=someone-else")
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 10).until(lambda d: "Not allowed" in d.find_element("id", "note").text)
        assert browser.find_element("id", "events").text == "\u2013"  # nothing shown
        browser.save_screenshot(str(shots / "dashboard-dr-other-meter-refused.png"))
        print(f"screenshots in {shots}")
