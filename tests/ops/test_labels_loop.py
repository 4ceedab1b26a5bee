"""Issue 20's "done when" for labels and the scorecard, in one run: studies labelled by an ORU^R01
from python-hl7's MLLP client, by `pneumo labels import` and by dashboard clicks, then
`pneumo scorecard --json` gives n, sensitivity, specificity and AUC equal to scikit-learn on the
same rows (each study's label as sent, its highest probability)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score
from starlette.testclient import TestClient

from core.settings import Settings
from ops.dashboard import create_app
from tests.conftest import REDIS_TEST_URL, REPO
from tests.ops.labelled import add_study
from tests.ops.test_hl7_listener import listener, oru, send  # noqa: F401 - the listener fixture

TOKEN = "labels-loop-20"


def test_hl7_csv_and_dashboard_labels_give_the_scorecard_scikit_learn_gives(
        listener, tmp_path: Path, database_url: str, sessions) -> None:  # noqa: F811
    rng = np.random.default_rng(20)
    truth: dict[int, tuple[int, float]] = {}  # study id -> (site's label, highest probability)
    with sessions() as session, session.begin():
        studies = [(add_study(session, list(rng.uniform(0, 1, size=rng.integers(1, 3))),
                              accession=f"L{index}"), index) for index in range(30)]
        keys = [(s.id, s.study_instance_uid, max(r.probability for i in s.instances for r in i.results), n)
                for s, n in studies]
    says = {sid: int(rng.random() < (0.8 if score >= 0.5 else 0.25)) for sid, _, score, _ in keys}
    for sid, uid, score, index in keys[:10]:  # the RIS, half coded, half report text
        code = "233604007^Pneumonia" if says[sid] else "17621005^Normal"
        text = "Right lower lobe pneumonia." if says[sid] else "No pneumonia."
        obx = (f"CWE|18782-3^Study observation^LN||{code}^SCT||||||F" if index % 2 else
               f"TX|18782-3^Report^LN||IMPRESSION: {text}||||||F")
        ack = send(listener["port"], oru(f"M{index}", study_uid=uid, obx=[obx]))
        assert str(ack.segment("MSA")(1)) == "AA"
        truth[sid] = (says[sid], score)
    table = tmp_path / "labels.csv"
    table.write_text("accession_number,label\n" + "".join(
        f"L{index},{'pneumonia' if says[sid] else 'normal'}\n" for sid, _, _, index in keys[10:20]))
    env = {**os.environ, "PNEUMO_HOME": str(tmp_path / "home"), "PNEUMO_DATABASE_URL": database_url}
    imported = subprocess.run([sys.executable, "-m", "ops.cli", "labels", "import", str(table)], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0 and "imported 10 label(s)" in imported.stdout, imported.stderr
    truth.update({sid: (says[sid], score) for sid, _, score, _ in keys[10:20]})
    client = TestClient(create_app(Settings(home=tmp_path / "home", database_url=database_url,
                                            broker_url=f"{REDIS_TEST_URL}/15", dashboard_token=TOKEN)))
    assert client.post("/login", data={"token": TOKEN}).status_code == 200  # followed to the page
    for sid, _, score, _ in keys[20:]:
        verdict = "agree" if says[sid] == int(score >= 0.5) else "disagree"
        page = client.post(f"/studies/{sid}/label", data={"verdict": verdict, "reader": "QA"})
        assert "recorded" in page.text
        truth[sid] = (says[sid], score)
    result = subprocess.run([sys.executable, "-m", "ops.cli", "scorecard", "--json"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    (card,) = json.loads(result.stdout)
    labels = np.array([label for label, _ in truth.values()])
    scores = np.array([score for _, score in truth.values()])
    tn, fp, fn, tp = confusion_matrix(labels, (scores >= 0.5).astype(int)).ravel()
    overall = card["overall"]
    assert overall["n"] == 30 == len(card["rows"])
    assert overall["sensitivity"]["value"] == pytest.approx(tp / (tp + fn), abs=1e-12)
    assert overall["specificity"]["value"] == pytest.approx(tn / (tn + fp), abs=1e-12)
    assert overall["auc"]["value"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
