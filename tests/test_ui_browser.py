"""The page end to end, in headless Chromium (Selenium + Debian's chromium and chromium-driver): `lmedit ui` on
the embedded model, bad input shown beside its field, a ROME edit whose P(new) rises on the page, a revert that
brings it back. With LMEDIT_SCREENSHOT=docs/ui.png the screenshot after the edit becomes the README's picture.

Needs `make browser-deps` (apt-get install chromium chromium-driver); without them this test fails and says so.
Deselect it with `-m "not browser"` on a machine that cannot have them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[1]
# The README's picture is taken by this test on request only (LMEDIT_SCREENSHOT=docs/ui.png pytest ...): an ordinary
# run leaves the tracked file alone and writes its screenshot under pytest's tmp_path.
SCREENSHOT = os.environ.get("LMEDIT_SCREENSHOT")
STATS_N = "20000"  # the statistics tests/test_smollm2.py computes too: cached once for both


def _browser() -> tuple[str, str]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.fail("headless Chromium and chromedriver are needed: run `make browser-deps` (Debian: apt-get install "
                    "chromium chromium-driver), or deselect this test with -m 'not browser'", pytrace=False)
    return binary, driver


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`lmedit ui --port 0` as a user starts it; yields its URL. The log is shown if it never comes up."""
    _browser()
    log = tmp_path_factory.mktemp("ui") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lmedit.cli", "ui", "--port", "0"], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        deadline, url = time.monotonic() + 300, None
        while url is None:
            found = re.search(r"at (http://127\.0\.0\.1:\d+/)", log.read_text())
            url = found and found.group(1)
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"lmedit ui did not come up:\n{log.read_text()[-3000:]}", pytrace=False)
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver = _browser()
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(arg)
    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium sends no usage statistics
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    yield chrome
    chrome.quit()


def _value(browser, col: str, key: str = "p_new", row: int = 0) -> float | None:
    from selenium.webdriver.common.by import By

    cells = browser.find_elements(By.CSS_SELECTOR, f'tr[data-row="{row}"] td[data-col="{col}"][data-key="{key}"]')
    value = cells[0].get_attribute("data-value") if cells else None
    return float(value) if value else None


def _type(browser, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def _error_after_edit(browser, wait, field: str) -> str:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "edit-button").click()
    wait.until(lambda b: b.find_element(By.ID, f"error-{field}").text.strip())
    return browser.find_element(By.ID, f"error-{field}").text


def _screenshot(browser, path: Path) -> None:
    """The whole page, top to bottom (not only the part in the window), as a PNG."""
    import base64

    width, height = browser.execute_script("return [document.documentElement.scrollWidth, "
                                           "document.documentElement.scrollHeight]")
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 2400), "scale": 1}})
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def test_edit_on_the_page_raises_p_new_and_revert_brings_it_back(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(server)
    wait.until(lambda b: b.find_elements(By.ID, "setting-stats_n"))
    assert Select(browser.find_element(By.ID, "method")).first_selected_option.get_attribute("value") == "rome"
    assert "smollm2-135m" in browser.find_element(By.ID, "model").text

    # Bad input: the message beside its field, and the server keeps serving.
    _type(browser, "subject", "Big Ben")
    assert "does not occur in the prompt" in _error_after_edit(browser, wait, "subject")
    assert "invalid" in browser.find_element(By.ID, "subject").get_attribute("class")
    _type(browser, "subject", "The Eiffel Tower")
    _type(browser, "target_new", " ")
    assert "target_new is empty" in _error_after_edit(browser, wait, "target_new")
    _type(browser, "target_new", "Rome")
    _type(browser, "setting-layers", "99")
    assert "layer 99 is out of range" in _error_after_edit(browser, wait, "setting-layers")
    _type(browser, "setting-layers", "6")
    browser.execute_script("const s = document.getElementById('method'); s.add(new Option('no-such', 'no-such'));"
                           "s.value = 'no-such';")  # a method this server does not offer (a stale tab, say)
    assert "unknown method 'no-such'" in _error_after_edit(browser, wait, "method")
    Select(browser.find_element(By.ID, "method")).select_by_value("rome")
    assert "Traceback" not in browser.page_source

    # The edit, with live progress.
    _type(browser, "setting-layers", "6")
    _type(browser, "setting-stats_n", STATS_N)
    browser.find_element(By.ID, "edit-button").click()
    seen: set[str] = set()

    def finished(b) -> bool:
        status = b.find_element(By.ID, "status")
        seen.add(status.get_attribute("data-state") or "")
        if b.find_elements(By.CSS_SELECTOR, "#bars progress"):
            seen.add("a progress bar")
        return status.get_attribute("data-state") in ("done", "failed")

    WebDriverWait(browser, 600, poll_frequency=0.1).until(finished)
    assert browser.find_element(By.ID, "status").get_attribute("data-state") == "done", \
        browser.find_element(By.ID, "error-form").text
    assert {"running", "a progress bar"} <= seen, seen
    before, after = _value(browser, "before"), _value(browser, "after")
    assert after > before + 0.3, (before, after)  # "Rome" after the Eiffel Tower prompt
    assert _value(browser, "now") == after
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart rect")) >= 3 * 4  # legend + two prompts' bars
    [entry] = browser.find_elements(By.CSS_SELECTOR, "#stack li")
    assert "rome: The Eiffel Tower: Paris → Rome" in entry.text
    shot = ROOT / SCREENSHOT if SCREENSHOT else tmp_path / "ui.png"
    _screenshot(browser, shot)
    assert shot.stat().st_size > 20_000  # a page, not a blank frame

    # Revert: the probabilities of the model now fall back to those before the edit.
    entry.find_element(By.CSS_SELECTOR, "button.revert").click()
    wait.until(lambda b: b.find_element(By.ID, "stack-empty").is_displayed() and _value(b, "now") != after)
    assert abs(_value(browser, "now") - before) < 1e-6
    assert not browser.find_elements(By.CSS_SELECTOR, "#stack li")
    assert "Traceback" not in browser.page_source
