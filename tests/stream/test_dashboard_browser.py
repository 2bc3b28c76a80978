"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, Selenium).

Loads the meter page with a consumer token, ingests a reading through the twin's real apply
path, and sees it on the page within 2 s; the consumer cannot follow another meter. No console
errors. Screenshots go to the test's tmp dir (named in the test output). The fleet page, whose counts
come from the fleet search, is tested with real gateways in tests/stream/test_dashboard_pages.py.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from metertwin.core.auth import issue_token
from metertwin.core.clients import get_redis
from metertwin.stream.dashboard import FILES
from metertwin.twin.state import twin_store
from metertwin.upgrade.inbox import v1_ingest
from tests.conftest import TEST_SIGNING_KEY
from tests.stream.test_service import serve  # noqa: F401 - the fixture

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


def test_a_reading_appears_on_its_meter_page_within_2_s(
        serve: Callable[..., int], browser: Any, meter_id: str, tmp_path: Path) -> None:  # noqa: F811
    port = serve()
    assert twin_store(get_redis()).create(meter_id, "edge", {})
    consumer = issue_token("home", {"consumer"}, meter=meter_id, key=TEST_SIGNING_KEY)
    browser.get(f"http://127.0.0.1:{port}/meter?id={meter_id}#token={consumer}")
    text_of(browser, "status", "live", 10)
    now = time.time()
    reading = {"ts": now, "import_kwh": 3.0, "export_kwh": 0.0, "power_w": 1234.5, "voltage_v": 231.0}
    published = time.monotonic()
    assert v1_ingest(get_redis()).run(meter_id, json.dumps(reading), now, 1).result == "applied"
    text_of(browser, "last-power", "1234.5", 2.0)
    seen_after = time.monotonic() - published
    shot = tmp_path / "meter-page.png"
    browser.save_screenshot(str(shot))
    print(f"reading on the page after {seen_after * 1000:.0f} ms; screenshot {shot}")
    assert seen_after < 2.0
    assert severe(browser) == []
    # The same consumer token on another meter's page: the stream refuses it and the page says so.
    browser.get(f"http://127.0.0.1:{port}/meter?id=someone-else")
    text_of(browser, "status", "not allowed", 10)
    browser.save_screenshot(str(tmp_path / "other-meter-refused.png"))

