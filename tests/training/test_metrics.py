"""The report's numbers on cases small enough to check by hand."""

import numpy as np
import pytest

from training import metrics

LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
SCORES = np.array([0.1, 0.2, 0.3, 0.7, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99])


def test_metrics_at_a_threshold_match_the_confusion_matrix() -> None:
    result = metrics.compute_metrics(LABELS, SCORES, 0.5)
    assert result["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 5}
    assert result["accuracy"] == pytest.approx(0.8)
    assert result["sensitivity"] == pytest.approx(5 / 6)
    assert result["specificity"] == pytest.approx(3 / 4)
    assert result["ppv"] == pytest.approx(5 / 6) and result["npv"] == pytest.approx(3 / 4)
    assert result["roc_auc"] == pytest.approx(22 / 24)  # 22 of 24 (positive, negative) pairs ordered


def test_intervals_are_wilson_and_contain_the_estimate() -> None:
    result = metrics.compute_metrics(LABELS, SCORES, 0.5)
    for key, (low, high) in result["ci95"].items():
        assert low < result[key] < high, key
    # 575/624 (our transfer model's test accuracy) against the Wilson score formula written out.
    n, p, z = 624, 575 / 624, 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert metrics.wilson_interval(575, 624) == pytest.approx([centre - half, centre + half], abs=1e-6)
    assert np.isnan(metrics.wilson_interval(0, 0)).all()


def test_threshold_is_the_middle_of_youdens_plateau() -> None:
    labels = np.array([0, 0, 1, 1])
    # Any threshold in (0.3, 0.7] separates perfectly; the rule takes the middle of the ROC's
    # candidate thresholds on that plateau, away from the validation scores' edge.
    threshold = metrics.choose_threshold(labels, np.array([0.1, 0.3, 0.7, 0.9]))
    assert 0.3 < threshold <= 0.7
    assert metrics.compute_metrics(labels, np.array([0.1, 0.3, 0.7, 0.9]), threshold)["accuracy"] == 1.0


def test_sensitivity_at_specificity_takes_the_best_allowed_operating_point() -> None:
    # Specificity 3/4 allows the negative at 0.7 above the threshold: then all six positives are.
    assert metrics.sensitivity_at_specificity(LABELS, SCORES, 0.75) == pytest.approx(1.0)
    # No false positive allowed: the threshold goes above 0.7 and two positives fall below it.
    assert metrics.sensitivity_at_specificity(LABELS, SCORES, 1.0) == pytest.approx(4 / 6)
