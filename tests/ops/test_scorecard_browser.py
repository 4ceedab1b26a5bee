"""The scorecard page and a dashboard label in headless Chromium (Selenium): `pneumo dashboard`
as deployed, over a SQLite database of labelled studies; the page draws its four plots with no
console error, and an operator's agree click becomes a label. A screenshot goes to artifacts/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from core.contract import NEGATIVE_CLASS, POSITIVE_CLASS
from core.db import Label, LabelSource, session_factory
from core.migrate import upgrade
from ops.labels import record_label
from tests.conftest import REDIS_TEST_URL, REPO
from tests.helpers import free_port, requires_program, wait_for
from tests.ops.labelled import add_study, add_version

pytestmark = [pytest.mark.slow, requires_program("chromium", "chromium"),
              requires_program("chromedriver", "chromium-driver")]
TOKEN = "scorecard-browser-20"
ARTIFACTS = Path(os.environ.get("PNEUMO_ARTIFACTS", REPO / "artifacts"))


@pytest.fixture
def dashboard(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'pneumo.db'}"
    upgrade(url)
    sessions = session_factory(url)
    with sessions() as session, session.begin():
        add_version(session, "pneumonia-cnn", "v1", sensitivity=0.9, specificity=0.9)
        for index in range(40):
            study = add_study(session, [0.15 + 0.02 * index])
            record_label(session, label=POSITIVE_CLASS if index % 3 else NEGATIVE_CLASS,
                         source=LabelSource.CSV, who="t", evidence="t",
                         study_instance_uid=study.study_instance_uid)
        unlabelled = add_study(session, [0.93]).id
    port = free_port()
    env = {**os.environ, "PNEUMO_HOME": str(tmp_path / "home"), "PNEUMO_DATABASE_URL": url,
           "PNEUMO_BROKER_URL": f"{REDIS_TEST_URL}/15", "PNEUMO_MODELS_DIR": str(tmp_path / "models"),
           "PNEUMO_DASHBOARD_HOST": "127.0.0.1", "PNEUMO_DASHBOARD_PORT": str(port),
           "PNEUMO_DASHBOARD_TOKEN": TOKEN}
    process = subprocess.Popen([sys.executable, "-m", "ops.cli", "dashboard"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(process.stdout.read().decode(errors="replace") if process.stdout else "")
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, 60, "the dashboard to answer")
        yield {"base": base, "sessions": sessions, "unlabelled": unlabelled}
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_scorecard_plots_render_without_console_errors_and_an_agree_click_is_a_label(dashboard, browser):
    browser.get(f"{dashboard['base']}/scorecard")
    charts = browser.find_elements(By.CSS_SELECTOR, "svg.chart")
    assert len(charts) == 4
    for chart in charts:  # drawn: laid out with a size, with its plot paths
        assert chart.size["width"] > 200 and chart.size["height"] > 100
        assert chart.find_elements(By.TAG_NAME, "path")
    titles = [chart.find_element(By.TAG_NAME, "title").get_attribute("textContent") for chart in charts]
    assert titles[0] == "ROC (study level)" and titles[3].startswith("Study scores")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "scorecard.png"))
    browser.get(f"{dashboard['base']}/")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "sign-in").click()
    WebDriverWait(browser, 30).until(expected_conditions.presence_of_element_located((By.ID, "message")))
    browser.get(f"{dashboard['base']}/labels")
    study = dashboard["unlabelled"]
    browser.find_element(By.ID, f"reader-{study}").send_keys("QA")
    button = browser.find_element(By.ID, f"agree-{study}")
    button.click()
    wait = WebDriverWait(browser, 30, ignored_exceptions=(WebDriverException,))
    wait.until(expected_conditions.staleness_of(button))
    message = wait.until(expected_conditions.presence_of_element_located((By.ID, "message"))).text
    assert f"Study {study}: label" in message and "you agreed" in message
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
    with dashboard["sessions"]() as session:
        labels = session.scalars(select(Label).where(Label.source == "dashboard")).all()
    assert [(label.label, label.who.split(" ")[0]) for label in labels] == [(POSITIVE_CLASS, "QA")]
