"""The pixel check: is an image like the ones a model version was trained and validated on?

Method: Mahalanobis distance on the version's own intermediate activations (Lee, Lee, Lee, Shin,
"A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks",
NeurIPS 2018): one Gaussian per (site, class) of the training images, with a covariance shared by
all of them (Ledoit-Wolf shrinkage), over the global-average-pooled outputs of three middle blocks.
The score is the distance to the nearest Gaussian. Why middle blocks: they describe texture and
anatomy before the classifier has thrown away what it did not need for its two labels; on the
served transfer model the last block's features refused 85% of adult NIH films, the middle three
100%, at the same false-refusal rate on the Kermany validation split (docs/models.md).
Why this method: no outlier images are needed to fit it, it adds one matrix product to a model
call, and its threshold is a plain percentile of held-out in-distribution scores.

The detector lives in the version folder as `scope.npz`; its SHA-256 is in the card (or in
`scope.json` for versions registered before the check existed) and is checked on load.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCOPE_FILE = "scope.npz"
METHOD = ("Mahalanobis distance to the nearest (site, class) Gaussian with a shared Ledoit-Wolf "
          "covariance, on global-average-pooled activations of middle blocks (Lee et al. 2018)")
DEFAULT_FALSE_REFUSAL_RATE = 0.01
# Middle blocks per architecture (see the module docstring); the first that a model has is used.
TRANSFER_LAYERS = ("block_5_add", "block_9_add", "block_12_add")


class ScopeError(Exception):
    """A detector cannot be built, fitted or loaded; the message says why."""


@dataclass(frozen=True)
class OutlierExposure:
    """A logistic regression on standardised features, fitted with in-scope images against
    out-of-scope ones (Hendrycks et al., "Deep Anomaly Detection with Outlier Exposure", ICLR
    2019): adults of another site, flipped, rotated and inverted chests. The distance alone keeps
    adult films that resemble children's (about 1 in 7 of the NIH development half)."""

    center: np.ndarray  # (features,)
    scale: np.ndarray  # (features,)
    coef: np.ndarray  # (features,)
    intercept: float
    logit_threshold: float  # the logit at which an image is refused

    def logit(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.center) / self.scale) @ self.coef + self.intercept


_blas: Any = None


def _one_blas_thread() -> Any:
    """A context limiting BLAS to one thread (the controller found once: finding it costs ~1 ms)."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


@dataclass(frozen=True)
class Detector:
    """Fitted Gaussians and the refusal threshold.

    Without `exposure`, `score` is the squared Mahalanobis distance and `threshold` its limit.
    With it, `score` is the larger of the two tests, each scaled to 1 at its own threshold
    (distance / `distance_threshold`, exp(logit - logit_threshold)), and `threshold` is 1.
    """

    layers: tuple[str, ...]
    means: np.ndarray  # (groups, features)
    precision: np.ndarray  # (features, features)
    threshold: float
    false_refusal_rate: float
    distance_threshold: float | None = None
    exposure: OutlierExposure | None = None

    def distance(self, features: np.ndarray) -> np.ndarray:
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        # (d @ P) row-wise dot d: a BLAS product on one thread. The three-operand einsum loops in C
        # without BLAS, 10-12 ms per image and group with 1,472 features (near the model call); BLAS
        # threads right after the model's own threads fight them for the cores (issue 21).
        with _one_blas_thread():
            distances = [
                np.einsum("ij,ij->i", (features - mean) @ self.precision, features - mean)
                for mean in self.means
            ]
        return np.min(distances, axis=0)

    def score(self, features: np.ndarray) -> np.ndarray:
        distance = self.distance(features)
        if self.exposure is None or self.distance_threshold is None:
            return distance
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        logit = self.exposure.logit(features) - self.exposure.logit_threshold
        return np.maximum(distance / self.distance_threshold, np.exp(np.minimum(logit, 700.0)))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        extra: dict[str, Any] = {}
        if self.exposure is not None and self.distance_threshold is not None:
            extra = {"distance_threshold": np.float64(self.distance_threshold),
                     "oe_center": self.exposure.center, "oe_scale": self.exposure.scale,
                     "oe_coef": self.exposure.coef, "oe_intercept": np.float64(self.exposure.intercept),
                     "oe_logit_threshold": np.float64(self.exposure.logit_threshold)}
        np.savez(buffer, layers=np.array(self.layers), means=self.means, precision=self.precision,
                 threshold=np.float64(self.threshold),
                 false_refusal_rate=np.float64(self.false_refusal_rate), **extra)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, content: bytes) -> Detector:
        with np.load(io.BytesIO(content), allow_pickle=False) as stored:
            exposure, distance_threshold = None, None
            if "oe_coef" in stored:
                exposure = OutlierExposure(stored["oe_center"], stored["oe_scale"], stored["oe_coef"],
                                           float(stored["oe_intercept"]),
                                           float(stored["oe_logit_threshold"]))
                distance_threshold = float(stored["distance_threshold"])
            return cls(tuple(str(n) for n in stored["layers"]), stored["means"], stored["precision"],
                       float(stored["threshold"]), float(stored["false_refusal_rate"]),
                       distance_threshold, exposure)


def _gaussians(
    features: np.ndarray, groups: np.ndarray, names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """One mean per group and the precision of their shared, Ledoit-Wolf shrunk covariance."""
    from sklearn.covariance import LedoitWolf

    means = np.stack([features[groups == name].mean(axis=0) for name in names])
    residuals = np.concatenate([features[groups == name] - means[i] for i, name in enumerate(names)])
    return means, LedoitWolf().fit(residuals).precision_


def fit(
    features: np.ndarray,
    groups: np.ndarray,
    held_out: np.ndarray,
    layers: tuple[str, ...],
    false_refusal_rate: float = DEFAULT_FALSE_REFUSAL_RATE,
    held_out_groups: np.ndarray | None = None,
) -> tuple[Detector, dict[str, Any]]:
    """Fit on training features (one row per image, `groups` = site/class labels) and set the
    threshold so that `false_refusal_rate` of the held-out in-distribution images are refused.

    With `held_out_groups` (several sites), the threshold is the highest of the per-site
    percentiles, so no site's own images are refused more often than the stated rate because
    another, larger site dominates the held-out pool. Returns the detector and a summary.
    """
    features = np.asarray(features, dtype=np.float64)
    groups = np.asarray(groups)
    names = sorted(set(groups.tolist()))
    if len(features) < 10 or len(held_out) < 5:
        raise ScopeError(f"too few images to fit a pixel check: {len(features)} training, "
                         f"{len(held_out)} held-out (at least 10 and 5)")
    means, precision = _gaussians(features, groups, names)
    detector = Detector(layers, means, precision, 0.0, false_refusal_rate)
    held_scores = detector.score(held_out)
    if held_out_groups is None:
        held_out_groups = np.zeros(len(held_scores), dtype=int)
    held_out_groups = np.asarray(held_out_groups)
    per_site = {
        str(site): float(np.quantile(held_scores[held_out_groups == site], 1 - false_refusal_rate))
        for site in sorted(set(held_out_groups.tolist()))
    }
    threshold = max(per_site.values())
    detector = Detector(layers, means, precision, threshold, false_refusal_rate)
    summary = {
        "method": METHOD,
        "layers": list(layers),
        "groups": [str(n) for n in names],
        "fit_images": len(features),
        "held_out_images": len(held_scores),
        "false_refusal_rate": false_refusal_rate,
        "threshold": threshold,
        "threshold_rule": (f"the {1 - false_refusal_rate:.1%} percentile of held-out in-scope "
                           f"images' scores (highest over sites)"),
        "held_out_refused_rate": float(np.mean(held_scores > threshold)),
    }
    return detector, summary


def save(detector: Detector, folder: Path) -> Path:
    path = Path(folder) / SCOPE_FILE
    path.write_bytes(detector.to_bytes())
    return path


def load(folder: Path, expected_sha256: str) -> Detector:
    """The version's detector; refuses a file whose hash differs from the one recorded."""
    import hashlib

    path = Path(folder) / SCOPE_FILE
    if not path.exists():
        raise ScopeError(f"{path} is missing: this version has no pixel check; "
                         f"run `pneumo scope fit` for it")
    content = path.read_bytes()
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected_sha256:
        raise ScopeError(f"{path} has SHA-256 {actual[:16]}..., but the version records "
                         f"{str(expected_sha256)[:16]}...; it was changed after it was fitted")
    return Detector.from_bytes(content)


EXPOSURE_METHOD = (
    "the larger of two tests, each at its own threshold: the Mahalanobis distance to the nearest "
    "class Gaussian (shared Ledoit-Wolf covariance; Lee et al. 2018) and a logistic regression "
    "of in-scope against out-of-scope images (outlier exposure; Hendrycks et al. 2019), on "
    "global-average-pooled activations of three middle blocks and the last"
)


def fit_with_exposure(
    inside: np.ndarray,
    inside_groups: np.ndarray,
    inside_patients: np.ndarray,
    outside: np.ndarray,
    outside_weights: np.ndarray,
    layers: tuple[str, ...],
    false_refusal_rate: float,
    folds: int = 5,
    regularisation: float = 0.001,
) -> tuple[Detector, np.ndarray]:
    """A detector whose two thresholds are set on out-of-fold scores of in-scope images, and
    those scores (1 at the threshold).

    Each in-scope image is scored by a detector fitted without its patient (`folds` groups of
    patients): in-sample scores are optimistic (the regression has seen the very image), and a
    threshold on them refuses more than its stated rate on new images. Each test's threshold is
    its (1 - rate/2) quantile, so the two together refuse about `false_refusal_rate`.
    `outside_weights` sum to one over the out-of-scope images.
    """
    inside = np.asarray(inside, dtype=np.float64)
    inside_groups, inside_patients = np.asarray(inside_groups), np.asarray(inside_patients)
    unique = np.array(sorted(set(inside_patients.tolist())))
    np.random.default_rng(11).shuffle(unique)
    distances, logits = np.zeros(len(inside)), np.zeros(len(inside))
    for fold in np.array_split(unique, folds):
        held = np.isin(inside_patients, fold)
        part = fit_parts(inside[~held], inside_groups[~held], outside, outside_weights, layers,
                         regularisation)
        distances[held] = part.distance(inside[held])
        logits[held] = part.exposure.logit(inside[held])  # type: ignore[union-attr]
    distance_threshold = float(np.quantile(distances, 1 - false_refusal_rate / 2))
    logit_threshold = float(np.quantile(logits, 1 - false_refusal_rate / 2))
    base = fit_parts(inside, inside_groups, outside, outside_weights, layers, regularisation)
    exposure = OutlierExposure(base.exposure.center, base.exposure.scale,  # type: ignore[union-attr]
                               base.exposure.coef, base.exposure.intercept,  # type: ignore[union-attr]
                               logit_threshold)
    detector = Detector(layers, base.means, base.precision, 1.0, false_refusal_rate,
                        distance_threshold, exposure)
    out_of_fold = np.maximum(distances / distance_threshold,
                             np.exp(np.minimum(logits - logit_threshold, 700.0)))
    return detector, out_of_fold


def fit_parts(
    inside: np.ndarray,
    inside_groups: np.ndarray,
    outside: np.ndarray,
    outside_weights: np.ndarray,
    layers: tuple[str, ...],
    regularisation: float = 0.001,
) -> Detector:
    """Both tests fitted, thresholds not yet set (`distance` and `exposure.logit` are raw)."""
    from sklearn.linear_model import LogisticRegression

    inside = np.asarray(inside, dtype=np.float64)
    outside = np.asarray(outside, dtype=np.float64)
    groups = np.asarray(inside_groups)
    names = sorted(set(groups.tolist()))
    if len(inside) < 10 or len(outside) < 10:
        raise ScopeError(f"too few images to fit a pixel check: {len(inside)} in scope, "
                         f"{len(outside)} out of scope (at least 10 each)")
    means, precision = _gaussians(inside, groups, names)
    both = np.concatenate([inside, outside])
    center, scale = both.mean(axis=0), both.std(axis=0) + 1e-6
    targets = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    # Each side weighs half, whatever its count; within the out-of-scope side, as the caller says.
    weights = np.r_[np.full(len(inside), 0.5 / len(inside)), 0.5 * np.asarray(outside_weights)]
    regression = LogisticRegression(C=regularisation, max_iter=5000)
    regression.fit((both - center) / scale, targets, sample_weight=weights * len(targets))
    exposure = OutlierExposure(center, scale, regression.coef_[0].astype(np.float64),
                               float(regression.intercept_[0]), 0.0)
    return Detector(layers, means, precision, 1.0, 0.0, 1.0, exposure)
