"""The pixel check's distance is the squared Mahalanobis distance to the nearest group mean,
whatever product computes it (a BLAS product since issue 21: the einsum loop cost more than the
model call)."""

from __future__ import annotations

import numpy as np

from serving.pixelcheck import Detector


def test_distance_is_the_squared_mahalanobis_distance_to_the_nearest_mean() -> None:
    rng = np.random.default_rng(3)
    features = 40
    root = rng.normal(size=(features, features))
    precision = root @ root.T + features * np.eye(features)  # symmetric positive definite
    means = rng.normal(size=(2, features))
    detector = Detector(("layer",), means, precision, threshold=1.0, false_refusal_rate=0.01)
    images = np.vstack([means[1] + 0.01, rng.normal(size=(5, features)) * 3])
    expected = [min(float((x - m) @ precision @ (x - m)) for m in means) for x in images]
    np.testing.assert_allclose(detector.distance(images), expected, rtol=1e-12)
    np.testing.assert_allclose(detector.distance(images[0]), expected[:1], rtol=1e-12)  # one image
    assert detector.distance(images)[0] < 0.01 * min(expected[1:])  # near its own mean
