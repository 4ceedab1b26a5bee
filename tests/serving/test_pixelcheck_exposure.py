"""The pixel check with outlier exposure: one score, each test at its own threshold, stored and
loaded from the version folder like the distance-only detectors registered before it."""

from __future__ import annotations

import numpy as np

from serving import pixelcheck


def _data(seed: int = 3):
    rng = np.random.default_rng(seed)
    inside = rng.normal(0.0, 1.0, (400, 12))
    groups = np.array(["0", "1"] * 200)
    inside[groups == "1", 0] += 1.0
    # Out of scope along a direction the in-scope spread also covers: the distance alone keeps
    # many of them, the regression that has seen them does not.
    outside = rng.normal(0.0, 1.0, (300, 12))
    outside[:, 1] += 4.5
    return inside, groups, outside


def _detector(inside, groups, outside, rate=0.02):
    weights = np.full(len(outside), 1.0 / len(outside))
    patients = np.arange(len(inside)) // 2  # two images per patient
    detector, out_of_fold = pixelcheck.fit_with_exposure(
        inside, groups, patients, outside, weights, ("a",), rate, folds=4, regularisation=1.0)
    assert abs(float(np.mean(out_of_fold > 1.0)) - rate) < 0.01
    return detector


def test_exposure_refuses_what_the_distance_keeps_at_the_stated_rate() -> None:
    inside, groups, outside = _data()
    detector = _detector(inside, groups, outside)
    new_inside, _, new_outside = _data(seed=4)
    assert detector.threshold == 1.0
    refused_inside = np.mean(detector.score(new_inside) > detector.threshold)
    assert refused_inside < 0.06
    distance_only = np.mean(detector.distance(new_outside) > detector.distance_threshold)
    combined = np.mean(detector.score(new_outside) > detector.threshold)
    assert distance_only < 0.8 and combined > 0.95


def test_a_detector_with_exposure_round_trips_and_an_old_one_still_loads() -> None:
    inside, groups, outside = _data()
    detector = _detector(inside, groups, outside)
    again = pixelcheck.Detector.from_bytes(detector.to_bytes())
    np.testing.assert_allclose(again.score(outside), detector.score(outside))
    assert again.exposure is not None and again.distance_threshold == detector.distance_threshold

    old = pixelcheck.Detector(("a",), detector.means, detector.precision, 42.0, 0.01)
    loaded = pixelcheck.Detector.from_bytes(old.to_bytes())
    assert loaded.exposure is None and loaded.threshold == 42.0
    np.testing.assert_allclose(loaded.score(inside), detector.distance(inside))
