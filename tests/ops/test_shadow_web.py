"""The dashboard's shadow panel and /shadow.json show each candidate's agreement with the served
version (the same figures as ops.shadow on the same rows), and say which version is silent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import update
from starlette.testclient import TestClient

from core import registry
from core.db import Result
from core.settings import Settings
from ops import shadow
from ops.dashboard import create_app
from tests.conftest import REDIS_TEST_URL
from tests.worker.test_shadow import IMAGES, NAME, classify_study, served_classifier, shadow_registry


@pytest.fixture
def models(tiny_registry: Path, tmp_path: Path) -> Path:
    return shadow_registry(tiny_registry, tmp_path / "models", resize=None)


def client(tmp_path: Path, database_url: str, models: Path) -> TestClient:
    return TestClient(create_app(Settings(home=tmp_path / "home", database_url=database_url,
                                          broker_url=f"{REDIS_TEST_URL}/10", models_dir=models)))


def test_the_panel_shows_the_candidates_agreement(
    sessions, database_url: str, models: Path, tmp_path: Path
) -> None:
    registry.mark_candidate(NAME, "test-2", models)
    classify_study(sessions, served_classifier(models), tmp_path, IMAGES)
    with sessions() as session:
        expected = shadow.agreement(session, NAME, "test-1", "test-2")
    assert expected.images == len(IMAGES) and 0 < expected.agree < len(IMAGES)

    web = client(tmp_path, database_url, models)
    figures = web.get("/shadow.json").json()
    (row,) = figures["candidates"]
    assert {k: row[k] for k in expected.dump()} == expected.dump()
    assert row["labelled"]["studies"] == 0 and figures["silent"] == {}

    page = web.get("/").text
    panel = page[page.index('id="shadow"'):]
    cells = re.findall(r"<td>(.*?)</td>", panel[:panel.index("</table>")])
    assert cells[:6] == [f"{NAME}@test-2", "test-1", str(len(IMAGES)),
                         f"{expected.percent_agree:.1f}%", f"{expected.kappa:.3f}", "0"]
    assert 'href="/shadow.json"' in page


def test_the_panel_says_a_version_is_silent(database_url: str, models: Path, tmp_path: Path) -> None:
    web = client(tmp_path, database_url, models)
    assert "No candidate runs in shadow." in web.get("/").text
    registry.mark_served(NAME, "test-1", models, silent=True)
    page = web.get("/").text
    assert f"{NAME}@test-1 is served <strong>silent</strong>" in page
    assert web.get("/shadow.json").json() == {"candidates": [], "silent": {NAME: "test-1"}}


def test_a_candidates_result_is_never_a_studys_finding(
    sessions, database_url: str, models: Path, tmp_path: Path
) -> None:
    """The dashboard's study list and `pneumo status` name the served version's finding, even
    where the candidate (recorded beside it, never sent) gave a higher probability."""
    from ops import status
    from ops.studies import recent_studies

    registry.mark_candidate(NAME, "test-2", models)
    classify_study(sessions, served_classifier(models), tmp_path, IMAGES)
    with sessions.begin() as session:  # the candidate sure of a finding the served version is not
        session.execute(update(Result).where(Result.model_version == "test-2").values(probability=0.99))
    with sessions() as session:
        (everything,) = recent_studies(session)
        (answered,) = recent_studies(session, candidates=registry.candidate_versions(models))
    assert everything.model == f"{NAME}@test-2"
    assert answered.model == f"{NAME}@test-1" and answered.probability < 0.99

    settings = Settings(home=tmp_path / "home", database_url=database_url,
                        broker_url=f"{REDIS_TEST_URL}/10", models_dir=models)
    assert "@test-2" not in status.render(settings) and f"{NAME}@test-1" in status.render(settings)
