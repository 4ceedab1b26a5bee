"""The drift alert must not fire on noise: production scores drawn from the model card's own
validation score histogram alert in under 1% of windows, at every window size the dashboard shows
(a rolling 24 h and per-day windows of any count from the 20-result minimum up), and a real shift
still alerts."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from core import registry
from core.settings import Settings
from ops.drift import THRESHOLD_GRID, drift, drift_alert, drift_threshold, psi_many
from tests.conftest import REPO

MODELS = REPO / "models"
# Window sizes: the minimum, sizes between and on the simulation grid, and past its end.
WINDOW_SIZES = (20, 21, 24, 31, 44, 50, 77, 100, 137, 200, 333, 500, 999, 1000, 2500, 12000)


def served_histograms() -> dict[str, list[int]]:
    histograms = {}
    for name, version in registry.served_versions(MODELS).items():
        card = registry.resolve(f"{name}@{version}", MODELS).card
        histograms[f"{name}@{version}"] = card.validation_score_histogram
    assert histograms, "no served model with a validation score histogram"
    return histograms


@pytest.mark.parametrize("label", sorted(served_histograms()))
def test_scores_drawn_from_the_card_alert_in_under_one_percent_of_windows(label: str) -> None:
    expected = served_histograms()[label]
    settings = Settings()
    card = np.asarray(expected, dtype=float) / sum(expected)
    rng = np.random.default_rng(16)
    draws = 2000
    for n in WINDOW_SIZES:
        windows = rng.multinomial(n, card, size=draws)
        threshold = max(settings.drift_psi_alert,
                        drift_threshold(tuple(expected), n, settings.drift_false_alarm_rate))
        rate = float(np.mean(psi_many(expected, windows) > threshold))
        assert rate < 0.01, f"{label}: {rate:.1%} of {draws} windows of {n} results alert"
        # drift_alert (what the dashboard calls) agrees with the vectorised check on a few windows.
        for window in windows[:3]:
            alert, value, used = drift_alert(expected, window.tolist(), settings.drift_psi_alert,
                                             settings.drift_false_alarm_rate)
            assert used == pytest.approx(threshold) and alert == (value > threshold)


def transfer_histogram() -> list[int]:
    return served_histograms()[f"pneumonia-transfer@{registry.served_versions(MODELS)['pneumonia-transfer']}"]


def test_the_old_fixed_psi_cut_would_alert_on_most_small_windows() -> None:
    """Guard for the test above: it draws windows where PSI > 0.25 is common by chance."""
    expected = transfer_histogram()
    windows = np.random.default_rng(1).multinomial(50, np.asarray(expected) / sum(expected), size=500)
    assert np.mean(psi_many(expected, windows) > 0.25) > 0.5


@pytest.mark.parametrize("n", [200, 1000])
def test_a_real_shift_still_alerts(n: int) -> None:
    """Half the production scores in the middle of the range (a new protocol the model is unsure
    of) must alert at 200 results and more."""
    expected = transfer_histogram()
    card = np.asarray(expected, dtype=float) / sum(expected)
    shifted = 0.5 * card + 0.5 * np.eye(len(card))[len(card) // 2]
    rng = np.random.default_rng(2)
    settings = Settings()
    alerts = [drift_alert(expected, rng.multinomial(n, shifted).tolist(), settings.drift_psi_alert,
                          settings.drift_false_alarm_rate)[0] for _ in range(50)]
    assert all(alerts)


def test_thresholds_fall_with_the_window_size_and_are_reproducible() -> None:
    expected = tuple(transfer_histogram())
    values = [drift_threshold(expected, n, 0.001) for n in THRESHOLD_GRID]
    assert values == sorted(values, reverse=True)
    assert drift_threshold(expected, 20, 0.001) > 1  # 20 results: PSI > 1 happens by chance
    assert drift_threshold(expected, 150, 0.001) == drift_threshold(expected, 199, 0.001)


def test_the_dashboards_windows_stay_quiet_on_scores_from_the_validation_population(tmp_path: Path) -> None:
    """drift() as the dashboard and /metrics call it: a small site's rolling 24 h (50 results) and
    three days of 31, 50 and 120 results, all drawn from the served card's histogram: no alert."""
    from core.db import Instance, InstanceState, Result, Series, Study, session_factory, utcnow
    from core.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'pneumo.db'}"
    upgrade(url)
    sessions = session_factory(url)
    version = registry.served_versions(MODELS)["pneumonia-transfer"]
    expected = transfer_histogram()
    rng = np.random.default_rng(7)
    now = utcnow()
    with sessions() as session, session.begin():
        study = Study(study_instance_uid="1.2.826.0.1", first_received_at=now, last_received_at=now)
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_instance_uid="1.2.826.0.2", modality="DX")
        session.add(series)
        session.flush()
        index = 0
        for age, n in ((timedelta(minutes=5), 50), (timedelta(days=3), 31), (timedelta(days=4), 50),
                       (timedelta(days=5), 120)):
            bins = rng.choice(len(expected), size=n, p=np.asarray(expected) / sum(expected))
            for score in (bins + rng.uniform(size=n)) / len(expected):
                index += 1
                instance = Instance(
                    study_id=study.id, series_id=series.id, sop_instance_uid=f"1.2.826.0.3.{index}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path="/nonexistent", size_bytes=1, sha256="0" * 64, calling_ae_title="MODALITY1",
                    state=InstanceState.CLASSIFIED, attempts=1, received_at=now - age)
                session.add(instance)
                session.flush()
                session.add(Result(instance_id=instance.id, model_name="pneumonia-transfer",
                                   model_version=version, probability=float(score), threshold=0.5,
                                   label="PNEUMONIA" if score >= 0.5 else "NORMAL", decode_ms=1.0,
                                   inference_ms=1.0, created_at=now - age))
    settings = Settings()
    with sessions() as session:
        rows = [row for row in drift(session, MODELS, settings.drift_psi_alert,
                                     false_alarm_rate=settings.drift_false_alarm_rate)
                if row.model_name == "pneumonia-transfer"]
    assert sorted(row.n for row in rows) == [31, 50, 50, 50, 120]  # last 24 h, then 4 days
    assert not any(row.alert for row in rows), [(r.day, r.n, r.psi, r.threshold) for r in rows]
    assert all(row.threshold > row.psi for row in rows)
