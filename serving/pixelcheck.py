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
class Detector:
    """Fitted Gaussians and the refusal threshold; `score` is a squared Mahalanobis distance."""

    layers: tuple[str, ...]
    means: np.ndarray  # (groups, features)
    precision: np.ndarray  # (features, features)
    threshold: float
    false_refusal_rate: float

    def score(self, features: np.ndarray) -> np.ndarray:
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        distances = [
            np.einsum("ij,jk,ik->i", features - mean, self.precision, features - mean)
            for mean in self.means
        ]
        return np.min(distances, axis=0)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, layers=np.array(self.layers), means=self.means, precision=self.precision,
                 threshold=np.float64(self.threshold),
                 false_refusal_rate=np.float64(self.false_refusal_rate))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, content: bytes) -> Detector:
        with np.load(io.BytesIO(content), allow_pickle=False) as stored:
            return cls(tuple(str(n) for n in stored["layers"]), stored["means"], stored["precision"],
                       float(stored["threshold"]), float(stored["false_refusal_rate"]))


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
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, dtype=np.float64)
    groups = np.asarray(groups)
    names = sorted(set(groups.tolist()))
    if len(features) < 10 or len(held_out) < 5:
        raise ScopeError(f"too few images to fit a pixel check: {len(features)} training, "
                         f"{len(held_out)} held-out (at least 10 and 5)")
    means = np.stack([features[groups == name].mean(axis=0) for name in names])
    residuals = np.concatenate([features[groups == name] - means[i] for i, name in enumerate(names)])
    precision = LedoitWolf().fit(residuals).precision_
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
