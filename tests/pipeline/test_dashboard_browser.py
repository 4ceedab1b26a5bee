"""The dashboard in a real browser (Debian's headless Chromium driven by Selenium) over the real
pipeline: a study whose SR delivery was dead-lettered (PACS down) is re-sent from the page once the
PACS is back, and the page shows the delivery change state. A screenshot is kept in artifacts/.
The charts over time are drawn, named for screen readers, and leave the console empty.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from core.db import Delivery, DeliveryState, Result, session_factory
from ops.send import wrap_image
from tests.conftest import DATA
from tests.helpers import dcmtk, requires_program, wait_for
from tests.pipeline.conftest import REPO, database_url, sr_files, start_storescp

pytestmark = [pytest.mark.slow, requires_program("chromium", "chromium"),
              requires_program("chromedriver", "chromium-driver")]
TOKEN = "browser-test-token-91c2"
ARTIFACTS = Path(os.environ.get("PNEUMO_ARTIFACTS", REPO / "artifacts"))
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for errors
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def message_after(browser, button_id: str) -> str:
    """Click a form button and return the banner of the page it leads to. A click returns before the
    POST/redirect has loaded, so wait for the old page to go stale and the new banner to appear.
    Mid-navigation Chromium may answer "node does not belong to the document" instead of "stale":
    that is the page changing, so the wait polls again rather than failing."""
    button = browser.find_element(By.ID, button_id)
    button.click()
    wait = WebDriverWait(browser, 30, ignored_exceptions=(WebDriverException,))
    wait.until(expected_conditions.staleness_of(button))
    return wait.until(expected_conditions.presence_of_element_located((By.ID, "message"))).text


@pytest.fixture
def dead_letter_env(pipeline_env: dict[str, str]) -> dict[str, str]:
    pipeline_env.update({"PNEUMO_DELIVERY_MAX_ATTEMPTS": "1", "PNEUMO_DASHBOARD_TOKEN": TOKEN})
    return pipeline_env


@pytest.mark.parametrize("pipeline_env", ["postgresql-redis"], indirect=True)
def test_resend_a_dead_letter_from_the_dashboard(
    dead_letter_env, running: dict[str, str], pacs_address: dict, browser, tmp_path: Path
) -> None:
    dataset = wrap_image(sorted((DATA / "test" / "PNEUMONIA").iterdir())[0])
    path = tmp_path / "image.dcm"
    dataset.save_as(path, enforce_file_format=True)
    subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1",
                    running["PNEUMO_PORT"], str(path)], check=True, capture_output=True)
    sessions = session_factory(database_url(running))

    def delivery_state() -> str | None:
        with sessions() as session:
            return session.scalar(select(Delivery.state))

    wait_for(lambda: delivery_state() == DeliveryState.DEAD, 120, "the SR delivery to be dead-lettered")
    with sessions() as session:
        delivery_id = session.scalar(select(Delivery.id))

    url = f"http://127.0.0.1:{running['PNEUMO_DASHBOARD_PORT']}/"
    browser.get(url)
    row = browser.find_element(By.ID, f"delivery-{delivery_id}")
    assert "dead" in row.text and dataset.StudyInstanceUID in browser.page_source

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    assert "Signed in" in message_after(browser, "sign-in")

    pacs = start_storescp(pacs_address["folder"], pacs_address["port"])
    try:
        assert "queued again" in message_after(browser, f"resend-{delivery_id}")
        wait_for(lambda: delivery_state() == DeliveryState.DELIVERED, 60, "the re-sent SR to be delivered")
        browser.get(url)
        studies = browser.find_element(By.ID, "studies").text
        with sessions() as session:
            label = session.scalar(select(Result.label))  # the tiny test model's call, whichever it is
        assert "delivered" in studies and label in studies
        assert "none" in browser.find_element(By.ID, "attention").text  # nothing left to act on
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        assert len(sr_files(pacs_address["folder"])) == 1
    finally:
        pacs.terminate()
        pacs.wait(timeout=10)


def test_recent_studies_fit_a_1400_px_screen(browser, tmp_path: Path) -> None:
    """64-character UIDs made the studies table wider than the screen (issue 16): they are cut
    with an ellipsis and kept whole in the tooltip."""
    from datetime import timedelta

    from starlette.testclient import TestClient

    from core.db import Delivery, Instance, InstanceState, Series, Study, utcnow
    from core.migrate import upgrade
    from core.settings import Settings
    from ops.dashboard import create_app
    from tests.conftest import REDIS_TEST_URL

    url = f"sqlite:///{tmp_path / 'pneumo.db'}"
    upgrade(url)
    sessions = session_factory(url)
    now = utcnow()
    uids = [f"1.2.826.0.1.3680043.8.498.{n}" + "1" * (64 - 28) for n in range(10, 15)]
    with sessions() as session, session.begin():
        for n, uid in enumerate(uids):
            study = Study(study_instance_uid=uid, accession_number=f"A{n:015d}",
                          first_received_at=now - timedelta(seconds=60), last_received_at=now)
            session.add(study)
            session.flush()
            series = Series(study_id=study.id, series_instance_uid=uid[:-1] + "2", modality="DX")
            session.add(series)
            session.flush()
            session.add(Instance(
                study_id=study.id, series_id=series.id, sop_instance_uid=uid[:-1] + "3",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                path="/nonexistent", size_bytes=1, sha256="0" * 64, calling_ae_title="MODALITY1",
                state=InstanceState.FAILED, reason="cannot decode pixel data: corrupt JPEG 2000 stream",
                attempts=1, received_at=now - timedelta(seconds=60), finished_at=now))
            classified = Instance(
                study_id=study.id, series_id=series.id, sop_instance_uid=uid[:-1] + "4",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                path="/nonexistent", size_bytes=1, sha256="0" * 64, calling_ae_title="MODALITY1",
                state=InstanceState.CLASSIFIED, attempts=1, received_at=now - timedelta(seconds=60),
                finished_at=now)
            session.add(classified)
            session.flush()
            session.add(Result(instance_id=classified.id, model_name="pneumonia-transfer",
                               model_version="20261126T171331Z", probability=0.91, threshold=0.5,
                               label="PNEUMONIA", decode_ms=1.0, inference_ms=1.0))
            session.add(Delivery(study_id=study.id, model_name="pneumonia-transfer",
                                 model_version="20261126T171331Z", destination="PACS@10.0.0.1:104",
                                 sr_sop_instance_uid=uid[:-1] + "9", attempts=6, state=DeliveryState.DEAD,
                                 last_error="association with PACS failed: connection refused"))
    settings = Settings(home=tmp_path / "home", database_url=url, broker_url=f"{REDIS_TEST_URL}/8",
                        models_dir=tmp_path / "models")
    page = tmp_path / "dashboard.html"
    page.write_text(TestClient(create_app(settings)).get("/").text)
    browser.get(page.as_uri())
    for table in ("studies", "attention", "failures"):
        right = browser.execute_script(
            f"return document.getElementById('{table}').getBoundingClientRect().right")
        assert right <= browser.execute_script("return window.innerWidth"), table
    assert f'title="{uids[0]}"' in browser.page_source


def test_charts_over_time_in_chromium_without_console_errors(browser, tmp_path: Path) -> None:
    """Served over HTTP with the dashboard's own headers (its Content-Security-Policy allows no
    script): the four charts of / and of /trends are visible SVG with an accessible name, first
    in their empty state, then drawn; Chromium's console has no error (a CSP violation, a 404)."""
    from core.db import utcnow
    from core.migrate import upgrade
    from core.settings import Settings
    from devtools.processes import served_in_thread
    from ops.dashboard import create_app
    from tests.conftest import REDIS_TEST_URL
    from tests.ops.test_dashboard_trends import _populate

    url = f"sqlite:///{tmp_path / 'pneumo.db'}"
    upgrade(url)
    settings = Settings(home=tmp_path / "home", database_url=url, broker_url=f"{REDIS_TEST_URL}/12",
                        models_dir=tmp_path / "models")
    with served_in_thread(create_app(settings)) as port:

        def charts(path: str) -> list[dict]:
            browser.get(f"http://127.0.0.1:{port}{path}")
            return browser.execute_script("""
                return [...document.querySelectorAll('svg.chart')].map(svg => ({
                  role: svg.getAttribute('role'), empty: svg.classList.contains('empty'),
                  width: svg.getBoundingClientRect().width, height: svg.getBoundingClientRect().height,
                  name: svg.getAttribute('aria-labelledby').split(' ')
                           .map(id => document.getElementById(id).textContent).join(' | ')}));""")

        empty = charts("/")
        assert [c["empty"] for c in empty] == [True] * 4
        assert any("no SR delivered in the last 24 h" in c["name"] for c in empty)
        _populate(session_factory(url), utcnow())
        for path in ("/", "/trends?window=30d"):
            drawn = charts(path)
            assert len(drawn) == 4 and not any(c["empty"] for c in drawn), path
            assert all(c["role"] == "img" and c["width"] > 300 and c["height"] > 100 for c in drawn), drawn
            assert all("latest" in c["name"] and "highest" in c["name"] for c in drawn), drawn
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "dashboard-trends.png"))
