"""Evaluation metrics and plots: discrimination, operating point and calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import binomtest
from sklearn import metrics as skm


def choose_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Youden's J on the validation split: the point that maximises sensitivity + specificity.

    Ties (a plateau of equal J) resolve to the middle of the plateau, which keeps the threshold
    away from the edge of the validation scores.
    """
    false_positive_rate, true_positive_rate, thresholds = skm.roc_curve(labels, probabilities)
    youden = true_positive_rate - false_positive_rate
    best = np.flatnonzero(np.isclose(youden, youden.max()))
    candidates = np.clip(thresholds[best], 0.0, 1.0)
    return float(np.clip((candidates.min() + candidates.max()) / 2.0, 1e-6, 1 - 1e-6))


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """Weighted mean |observed rate - mean probability| over equal-width probability bins.

    The per-bin rates are scikit-learn's `calibration_curve`; it drops empty bins and does not
    return the bins' sizes, so those are counted with the same binning (`np.searchsorted` on the
    inner edges, as scikit-learn bins).
    """
    from sklearn.calibration import calibration_curve

    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=np.float64)
    observed, predicted = calibration_curve(labels, probabilities, n_bins=bins, strategy="uniform")
    inner_edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    sizes = np.bincount(np.searchsorted(inner_edges, probabilities), minlength=bins)
    weights = sizes[sizes > 0] / len(probabilities)
    return float(np.sum(weights * np.abs(observed - predicted)))


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> list[float]:
    """Confidence interval of a proportion (Wilson score): with 624 test images an accuracy is
    only known to about +-2 points, which the report should say next to the number."""
    if trials == 0:
        return [float("nan"), float("nan")]
    interval = binomtest(successes, trials).proportion_ci(confidence, method="wilson")
    return [float(interval.low), float(interval.high)]


def compute_metrics(labels, probabilities, threshold: float) -> dict[str, object]:
    """All report metrics at `threshold` (label 1 = pneumonia), with 95% intervals of the
    proportions."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = (probabilities >= threshold).astype(np.int64)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel().tolist()
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    both_classes = len(np.unique(labels)) == 2
    return {
        "n": len(labels),
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, len(labels)),
        "loss": float(skm.log_loss(labels, clipped, labels=[0, 1])),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": float(skm.f1_score(labels, predicted, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(labels, probabilities)) if both_classes else float("nan"),
        "pr_auc": (
            float(skm.average_precision_score(labels, probabilities)) if both_classes else float("nan")
        ),
        "brier": float(skm.brier_score_loss(labels, probabilities)),
        "ece": expected_calibration_error(labels, probabilities),
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "ci95": {
            "accuracy": wilson_interval(tp + tn, len(labels)),
            "sensitivity": wilson_interval(tp, tp + fn),
            "specificity": wilson_interval(tn, tn + fp),
            "ppv": wilson_interval(tp, tp + fp),
            "npv": wilson_interval(tn, tn + fn),
        },
    }


def sensitivity_at_specificity(labels, probabilities, specificity: float) -> float:
    """Best sensitivity among operating points with at least `specificity` (report only)."""
    false_positive_rate, true_positive_rate, _ = skm.roc_curve(labels, probabilities)
    allowed = false_positive_rate <= 1.0 - specificity
    return float(true_positive_rate[allowed].max()) if allowed.any() else 0.0


def save_plots(labels, probabilities, threshold: float, folder: Path, prefix: str) -> list[Path]:
    """ROC curve and reliability diagram as PNG; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    folder.mkdir(parents=True, exist_ok=True)
    roc_path, reliability_path = folder / f"{prefix}_roc.png", folder / f"{prefix}_reliability.png"

    fpr, tpr, _ = skm.roc_curve(labels, probabilities)
    predicted = probabilities >= threshold
    point = (predicted[labels == 0].mean(), predicted[labels == 1].mean())
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot(fpr, tpr, label=f"AUC {skm.roc_auc_score(labels, probabilities):.3f}")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axis.scatter([point[0]], [point[1]], color="red", label=f"threshold {threshold:.3f}")
    axis.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC ({prefix})")
    axis.legend(loc="lower right")
    figure.savefig(roc_path, dpi=100, bbox_inches="tight")
    plt.close(figure)

    edges = np.linspace(0, 1, 11)
    index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, 9)
    centres, observed = [], []
    for b in range(10):
        if (index == b).any():
            centres.append(probabilities[index == b].mean())
            observed.append(labels[index == b].mean())
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axis.plot(centres, observed, marker="o", label="model")
    axis.set(xlabel="mean predicted probability", ylabel="observed pneumonia rate")
    axis.set_title(f"Reliability ({prefix}), ECE {expected_calibration_error(labels, probabilities):.3f}")
    axis.legend(loc="upper left")
    figure.savefig(reliability_path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return [roc_path, reliability_path]
