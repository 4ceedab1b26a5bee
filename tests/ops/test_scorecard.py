"""The running scorecard (issue 20 item 4): `pneumo scorecard --json` on labelled studies gives
the n, sensitivity, specificity, PPV and AUC an independent scikit-learn computation gives on the
same rows, per ISO week too, Wilson intervals by the formula, and alerts only where the site's
figures are significantly below the card's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import precision_score, recall_score, roc_auc_score

from core.contract import NEGATIVE_CLASS, POSITIVE_CLASS
from core.db import LabelSource
from ops.labels import record_label
from tests.conftest import REPO
from tests.ops.labelled import add_study, add_version

WEEKS = {"2026-W48": datetime(2026, 11, 25, 10), "2026-W49": datetime(2026, 12, 2, 10)}


def _populate(sessions, version: str, flip: float, seed: int) -> list[tuple[int, float, str]]:
    """Sixty labelled studies of 1-3 images for `version` (plus unlabelled ones); `flip`: how
    often the site's label disagrees with what the scores suggest. Returns (label, study score,
    week) per labelled study, computed here from what was written."""
    rng = np.random.default_rng(seed)
    truth = []
    with sessions() as session, session.begin():
        for index in range(70):
            positive = index % 2 == 0
            images = list(np.clip(rng.normal(0.7 if positive else 0.3, 0.2, size=rng.integers(1, 4)), 0, 1))
            week = list(WEEKS)[(index // 2) % 2]
            study = add_study(session, images, model=("pneumonia-cnn", version), received=WEEKS[week],
                              calling_ae="PACS1", accession=f"{version[:4]}{index}")
            if index >= 60:
                continue  # no label: not scored
            said = positive != (rng.random() < flip)
            record_label(session, label=POSITIVE_CLASS if said else NEGATIVE_CLASS, source=LabelSource.CSV,
                         who="test", evidence="test", study_instance_uid=study.study_instance_uid)
            truth.append((int(said), float(max(images)), week))
        add_version(session, "pneumonia-cnn", version, sensitivity=0.95, specificity=0.95)
    return truth


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_scorecard_json_equals_an_independent_computation_on_the_same_rows(
        tmp_path: Path, database_url: str, sessions) -> None:
    good = _populate(sessions, "good", flip=0.0, seed=1)
    poor = _populate(sessions, "poor", flip=0.35, seed=2)
    env = {**os.environ, "PNEUMO_HOME": str(tmp_path / "home"), "PNEUMO_DATABASE_URL": database_url}
    result = subprocess.run([sys.executable, "-m", "ops.cli", "scorecard", "--json"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    cards = {card["model_version"]: card for card in json.loads(result.stdout)}
    assert set(cards) == {"good", "poor"}
    for version, truth in (("good", good), ("poor", poor)):
        card = cards[version]
        assert card["site"] == "PACS1"
        for period, rows in [("overall", truth), *[(w, [r for r in truth if r[2] == w]) for w in WEEKS]]:
            figures = card["overall"] if period == "overall" else card["weeks"][period]
            labels = np.array([r[0] for r in rows])
            scores = np.array([r[1] for r in rows])
            predicted = (scores >= 0.5).astype(int)  # any image at or above the threshold
            assert figures["n"] == len(rows)
            assert figures["sensitivity"]["value"] == pytest.approx(recall_score(labels, predicted),
                                                                    abs=1e-12)
            assert figures["specificity"]["value"] == pytest.approx(
                recall_score(labels, predicted, pos_label=0), abs=1e-12)
            assert figures["ppv"]["value"] == pytest.approx(precision_score(labels, predicted), abs=1e-12)
            assert figures["auc"]["value"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
            sens = figures["sensitivity"]
            assert (sens["low"], sens["high"]) == pytest.approx(_wilson(sens["k"], sens["n"]), abs=1e-9)
            assert figures["auc"]["low"] <= figures["auc"]["value"] <= figures["auc"]["high"]
            assert figures["ece"]["low"] <= figures["ece"]["value"] <= figures["ece"]["high"]
        assert card["reference"]["source"] == "card test"
    assert cards["good"]["alerts"] == []
    assert any(alert.startswith("sensitivity") for alert in cards["poor"]["alerts"])
    assert any(alert.startswith("specificity") for alert in cards["poor"]["alerts"])
    text = subprocess.run([sys.executable, "-m", "ops.cli", "scorecard"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert "ALERT: sensitivity" in text.stdout and "any image it assessed is positive" in text.stdout


def test_delong_from_midranks_equals_the_pairwise_definition_with_ties() -> None:
    """DeLong's placement values by their definition (every positive against every negative,
    ties half) give the AUC and interval the midrank computation gives."""
    from ops.scorecard import Z95, delong_auc

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.uniform(0, 1, 300) + 0.3 * labels, 1)  # rounded: many ties
    positives, negatives = scores[labels == 1], scores[labels == 0]
    pairs = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
    variance = (pairs.mean(axis=1).var(ddof=1) / len(positives)
                + pairs.mean(axis=0).var(ddof=1) / len(negatives))
    found = delong_auc(labels, scores)
    assert found.value == pytest.approx(pairs.mean(), abs=1e-12)
    assert found.high - found.value == pytest.approx(Z95 * math.sqrt(variance), abs=1e-12)
