"""The report in a real headless Chromium: no console error, no network request, plots drawn, the filter works.

Needs the Debian packages `chromium` and `chromium-driver` and the Python package `selenium` (driven through
/usr/bin/chromedriver given explicitly, so Selenium Manager never downloads anything). Without them the tests
skip locally and FAIL when the CI environment variable is set.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from grpo_llm_eval.evaluation.report import build_report
from grpo_llm_eval.training.records import read_jsonl
from tests.test_report import PAYLOADS, hostile_copy, report_run  # noqa: F401 (report_run: a shared fixture)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
INTERNAL_SCHEMES = ("chrome:", "chrome-untrusted:", "chrome-extension:", "devtools:", "about:")
VISIBLE_ROWS = "return Array.from(document.querySelectorAll('#rollouts tbody tr')).filter(r => r.offsetParent !== null).length"


def require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the Python package selenium")
    if missing:
        message = (f"browser test needs {', '.join(missing)}: apt-get install -y chromium chromium-driver; "
                   "pip install selenium")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def page(report_run, tmp_path_factory):  # noqa: F811 (the imported fixture)
    """(driver with the report open, report path, the hostile run folder)."""
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    run = hostile_copy(report_run, tmp_path_factory.mktemp("browser") / "run")
    report = build_report(run)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--proxy-server=127.0.0.1:9",  # anything that did try the network would fail, not leave the machine
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get_log("performance")  # drop the browser's own start-up page loads
        driver.get(report.as_uri())
        yield driver, report, run
    finally:
        driver.quit()


class TestReportInBrowser:
    def test_no_console_errors(self, page):
        driver = page[0]
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []

    def test_no_network_request_but_the_file_itself(self, page):
        driver, report, _ = page
        urls = []
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
        # chrome:// and the like are the browser's own pages, served from inside it.
        page_urls = [u for u in urls if not u.startswith(INTERNAL_SCHEMES)]
        assert report.as_uri() in page_urls
        assert all(u == report.as_uri() or u.startswith("data:") for u in page_urls), page_urls

    def test_at_least_six_plots_are_drawn(self, page):
        driver = page[0]
        drawn = driver.execute_script(
            "return Array.from(document.querySelectorAll('.plot svg')).filter(s => {"
            "const r = s.getBoundingClientRect(); return r.width > 200 && r.height > 100 && "
            "s.querySelectorAll('path').length > 0;}).length")
        assert drawn >= 6

    def test_untrusted_text_shows_as_text_and_runs_nothing(self, page):
        from selenium.common.exceptions import NoAlertPresentException

        driver = page[0]
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert  # noqa: B018 (the property raises when no alert is open)
        texts = driver.execute_script(
            "return Array.from(document.querySelectorAll('#rollouts td')).map(td => td.textContent)")
        assert PAYLOADS["completion"] in texts and PAYLOADS["feedback"] in texts
        assert driver.execute_script("return document.scripts.length") == 1
        assert driver.execute_script("return document.querySelectorAll('#rollouts img, #rollouts b').length") == 0

    def test_typing_in_the_filter_box_filters_the_rows(self, page):
        from selenium.webdriver.common.by import By

        driver, _, run = page
        total = len(read_jsonl(run / "rollouts.jsonl"))
        assert driver.execute_script(VISIBLE_ROWS) == total
        box = driver.find_element(By.ID, "rollout-filter")
        box.send_keys("alert(1)")
        assert driver.execute_script(VISIBLE_ROWS) == 1
        assert driver.find_element(By.ID, "rollout-shown").text == "1"
        box.clear()
        box.send_keys("x")  # clear() sends no input event; typing does
        box.send_keys("\b")
        assert driver.execute_script(VISIBLE_ROWS) == total

    def test_the_status_select_filters_by_judge_status(self, page):
        from selenium.webdriver.support.ui import Select

        driver, _, run = page
        rows = read_jsonl(run / "rollouts.jsonl")
        select = Select(driver.find_element("id", "status-filter"))
        select.select_by_value("ok")
        assert driver.execute_script(VISIBLE_ROWS) == sum(r["judge_status"] == "ok" for r in rows)
        select.select_by_value(PAYLOADS["judge_status"])
        assert driver.execute_script(VISIBLE_ROWS) == 1
        select.select_by_value("")
        assert driver.execute_script(VISIBLE_ROWS) == len(rows)
