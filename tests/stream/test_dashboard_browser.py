"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, Selenium).

Loads the meter page with a consumer token, has a simulated meter publish a reading over MQTT
through a real edge gateway (connector, edge-ingest), and sees it on the page within 2 s; the
consumer cannot follow another meter. No console
errors. Screenshots go to the test's tmp dir (named in the test output). The fleet page, whose counts
come from the fleet search, is tested with real gateways in tests/stream/test_dashboard_pages.py.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.server import GatewayProcess
from meter_sim import FleetThread
from metertwin.core.auth import issue_token
from metertwin.stream.dashboard import FILES
from storage.embedded import Mosquitto
from tests.conftest import TEST_SIGNING_KEY
from tests.fixtures.gateway_support import PASSWORD, write_basic_auth
from tests.stream.test_service import serve  # noqa: F401 - the fixture
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in requirements-dev.txt (make setup)")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER and FILES["/vendor/uPlot.iife.min.js"][0].is_file()),
    reason="make setup installs Debian's chromium + chromium-driver and the dashboard's npm packages")


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def severe(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def text_of(driver: Any, element_id: str, expected: str, timeout_s: float) -> float:
    """Seconds until #element_id shows ``expected`` (fails after ``timeout_s``)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    start = time.monotonic()
    try:
        WebDriverWait(driver, timeout_s, poll_frequency=0.02).until(
            lambda d: d.find_element(By.ID, element_id).text == expected)
    except Exception:
        shown = driver.find_element(By.ID, element_id).text
        raise AssertionError(f"#{element_id} shows {shown!r}, not {expected!r}, after {timeout_s} s") from None
    return time.monotonic() - start


def test_a_reading_a_simulated_meter_publishes_appears_on_its_meter_page_within_2_s(
        serve: Callable[..., int], env: dict[str, str], mosquitto: Mosquitto, browser: Any, meter_id: str,  # noqa: F811
        tmp_path: Path) -> None:
    """The whole path: a simulated meter publishes over MQTT, the edge gateway's connector runs edge-ingest,
    the twin emits the event, the stream service pushes it, the page shows it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    write_basic_auth(env)
    zone_env = {f"EDGE_{k}": env[k] for k in ("REDIS_URL", "MQTT_HOST", "MQTT_PORT")}
    with GatewayProcess(ROOT / "stack.yml", "edge", secrets_dir=env["SECRETS_DIR"], env=zone_env,
                        args=["--mqtt-no-share", "--log-level", "warning"], log_path=tmp_path / "edge.log") as edge:
        admin = issue_token("operator", {"admin"}, key=TEST_SIGNING_KEY)
        made = httpx.post(f"{edge.url}/function/edge-registry/meters", json={"meter_id": meter_id},
                          headers={"Authorization": f"Bearer {admin}"}, timeout=10)
        assert made.status_code == 201, made.text

        def subscribed() -> bool:
            info = httpx.get(f"{edge.url}/system/info", auth=("admin", PASSWORD), timeout=5).json()
            return bool(info["connectors"]["mqtt"] == "subscribed")

        wait_until(subscribed, 30, "the edge gateway's MQTT connector")
        fleet = FleetThread(broker_host=mosquitto.host, broker_port=mosquitto.port,
                            credentials={meter_id: made.json()["password"]}, reporting_interval_s=3600, link="lan",
                            seed=3).start(timeout_s=30)
        try:
            port = serve()
            consumer = issue_token("home", {"consumer"}, meter=meter_id, key=TEST_SIGNING_KEY)
            browser.get(f"http://127.0.0.1:{port}/meter?id={meter_id}#token={consumer}")
            text_of(browser, "status", "live", 10)
            reading = fleet.call(lambda: fleet.fleet.meter(meter_id).report_now())
            published = time.monotonic()
            WebDriverWait(browser, 2.0, poll_frequency=0.02).until(  # this reading: its own seq
                lambda d: d.find_element(By.ID, "last-seq").text == str(reading.seq))
            assert _number(browser.find_element(By.ID, "last-power").text) == reading.power_w
            seen_after = time.monotonic() - published
        finally:
            fleet.stop()
    shot = tmp_path / "meter-page.png"
    browser.save_screenshot(str(shot))
    print(f"reading {reading.seq} published by the simulated meter on the page after {seen_after * 1000:.0f} ms; "
          f"screenshot {shot}")
    assert seen_after < 2.0
    assert severe(browser) == []
    # The same consumer token on another meter's page: the stream refuses it and the page says so.
    browser.get(f"http://127.0.0.1:{port}/meter?id=someone-else")
    text_of(browser, "status", "not allowed", 10)
    browser.save_screenshot(str(tmp_path / "other-meter-refused.png"))

