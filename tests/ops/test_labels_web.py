"""Labels from the dashboard and the scorecard page (issue 20 items 3c and 4): a signed-in
operator's agree/disagree becomes a label; anyone else, or a form from another site, is refused;
the scorecard page carries its four plots and its alerts; /metrics/scorecard exposes them."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from starlette.testclient import TestClient

from core.contract import NEGATIVE_CLASS, POSITIVE_CLASS
from core.db import AuditEvent, Label, LabelSource
from core.settings import Settings
from ops.dashboard import create_app
from ops.labels import record_label
from tests.conftest import REDIS_TEST_URL
from tests.ops.labelled import add_study, add_version

TOKEN = "labels-web-token-20"


def _client(tmp_path: Path, database_url: str) -> TestClient:
    settings = Settings(home=tmp_path / "home", database_url=database_url,
                        broker_url=f"{REDIS_TEST_URL}/15", models_dir=tmp_path / "models",
                        dashboard_token=TOKEN)
    return TestClient(create_app(settings), base_url="http://testserver", follow_redirects=False)


def test_a_signed_in_operator_agrees_or_disagrees_and_others_are_refused(tmp_path, database_url, sessions):
    with sessions() as session, session.begin():
        positive = add_study(session, [0.2, 0.9]).id  # one image positive: the study is
        negative = add_study(session, [0.1]).id
    client = _client(tmp_path, database_url)
    form = {"verdict": "agree", "reader": "AB"}
    assert client.post(f"/studies/{positive}/label", data=form).status_code == 401  # not signed in
    assert 'id="agree-' not in client.get("/labels").text
    assert client.post("/login", data={"token": TOKEN}).status_code == 303
    page = client.get("/labels").text
    assert f'id="agree-{positive}"' in page and "PNEUMONIA" in page
    crossed = client.post(f"/studies/{positive}/label", data=form,
                          headers={"Origin": "https://evil.example"})
    assert crossed.status_code == 403
    answer = client.post(f"/studies/{positive}/label", data=form)
    assert answer.status_code == 303 and "recorded" in answer.headers["location"]
    disagree = client.post(f"/studies/{negative}/label", data={"verdict": "disagree", "reader": "AB"})
    assert disagree.status_code == 303
    nameless = client.post(f"/studies/{negative}/label", data={"verdict": "agree", "reader": ""})
    assert "give%20your%20name" in nameless.headers["location"]
    assert client.post("/studies/99999999999999999999/label", data=form).status_code == 404
    with sessions() as session:
        rows = session.scalars(select(Label).order_by(Label.id)).all()
        # agreeing with PNEUMONIA, disagreeing with NORMAL: both say pneumonia
        assert [(r.label, r.source) for r in rows] == [(POSITIVE_CLASS, "dashboard")] * 2
        assert rows[0].who.startswith("AB (dashboard session ") and "agreed with" in rows[0].evidence
        audited = session.scalars(select(AuditEvent.detail).where(AuditEvent.entity == "label")).all()
        assert len(audited) == 2 and audited[0].startswith("dashboard: PNEUMONIA by AB")
    client.post("/logout")
    assert client.post(f"/studies/{positive}/label", data=form).status_code == 401  # signed out


def test_the_scorecard_page_has_its_plots_and_alerts(tmp_path, database_url, sessions):
    with sessions() as session, session.begin():
        add_version(session, "pneumonia-cnn", "v1", sensitivity=0.99, specificity=0.99)
        for index in range(30):
            study = add_study(session, [0.8 if index % 3 else 0.2])  # one in three missed
            record_label(session, label=POSITIVE_CLASS if index < 20 else NEGATIVE_CLASS,
                         source=LabelSource.CSV, who="t", evidence="t",
                         study_instance_uid=study.study_instance_uid)
    client = _client(tmp_path, database_url)
    page = client.get("/scorecard")
    assert page.status_code == 200
    assert page.text.count('<svg') == 4 and page.text.count('role="img"') == 4
    assert "scorecard-alert" in page.text and "sensitivity" in page.text
    assert "scorecard-alert" in client.get("/").text  # the main page's panel shows it too
    metrics = client.get("/metrics/scorecard").text
    assert ('pneumo_scorecard_alert{metric="sensitivity",model="pneumonia-cnn",site="PACS1",version="v1"} 1.0'
            in metrics)
    assert 'pneumo_scorecard_studies{model="pneumonia-cnn",site="PACS1",version="v1"} 30.0' in metrics
