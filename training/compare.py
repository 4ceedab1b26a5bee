"""`pneumo compare`: is a candidate version at least as good as the served one on validation?

The validation split is small (759 images) and every recent version scores ROC AUC 0.990-0.996
on it, so a raw difference of 0.001 says nothing. The paired bootstrap (the same resampled images
scored by both versions) gives the difference its standard error, so a decision can say whether
a gap is larger than the noise. Only versions scored on the same validation split compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from core import registry
from core.card import ModelCard
from serving import models
from serving.image import preprocess_many
from training import data, metrics


class ValidationMismatch(registry.RegistryError):
    """Versions validated on different images: comparing or averaging them would mislead."""


def split_of(card: ModelCard) -> tuple[float, int, str]:
    """(validation fraction, split seed, train fingerprint) a version was validated on."""
    split = card.hyper_parameters.validation_split()
    if split is None or card.data.train_fingerprint is None:
        raise registry.CardError(f"{card.label}: its card does not say which validation split it "
                                 f"was scored on (hyper_parameters, data.train_fingerprint)")
    return (*split, card.data.train_fingerprint)


def shared_validation(
    versions: list[registry.ModelVersion], data_root: Path
) -> data.TrainValidation:
    """The one validation split all `versions` were scored on, carved again from `data_root`."""
    splits = {v.label: split_of(v.card) for v in versions}
    if len(set(splits.values())) != 1:
        raise ValidationMismatch(
            "versions were validated on different splits (fraction, split seed, train data): "
            + "; ".join(f"{label}: {s[0]}, {s[1]}, {s[2][:12]}" for label, s in splits.items())
            + ". Train them with the same --split-seed on the same train/."
        )
    fraction, split_seed, fingerprint = next(iter(splits.values()))
    carved = data.carve_validation(data_root, fraction, split_seed)
    if data.fingerprint(carved.all_train, data_root) != fingerprint:
        raise ValidationMismatch(
            f"{data_root}/train differs from the data these versions were trained on "
            f"(fingerprint {fingerprint[:12]}...)"
        )
    return carved


def paired_bootstrap_auc(
    labels: np.ndarray,
    reference: np.ndarray,
    candidate: np.ndarray,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """ROC AUC of both, candidate minus reference, and the difference's bootstrap SE and 95% CI.

    The same resamples also give each version's Youden threshold a 5-95% range: at validation
    AUC 0.995 the classes barely overlap, J is nearly flat and a handful of images decide where
    its maximum falls, so how firm the operating point is deserves a number before serving.
    """
    rng = np.random.default_rng(seed)
    differences, thresholds = [], []
    for _ in range(resamples):
        index = rng.integers(0, len(labels), len(labels))
        if labels[index].min() == labels[index].max():
            continue  # a resample with one class has no AUC
        differences.append(
            roc_auc_score(labels[index], candidate[index])
            - roc_auc_score(labels[index], reference[index])
        )
        thresholds.append([metrics.choose_threshold(labels[index], scores[index])
                           for scores in (reference, candidate)])
    reference_auc = float(roc_auc_score(labels, reference))
    candidate_auc = float(roc_auc_score(labels, candidate))
    low, high = np.percentile(differences, [2.5, 97.5])
    threshold_ranges = np.percentile(thresholds, [5, 95], axis=0).T.tolist()
    return {
        "reference_roc_auc": reference_auc,
        "candidate_roc_auc": candidate_auc,
        "difference": candidate_auc - reference_auc,
        "bootstrap_se": float(np.std(differences, ddof=1)),
        "difference_ci95": [float(low), float(high)],
        "reference_threshold_range_90": threshold_ranges[0],
        "candidate_threshold_range_90": threshold_ranges[1],
        "resamples": len(differences),
    }


def compare(
    name: str,
    reference: str,
    candidate: str,
    data_root: Path,
    models_dir: Path = registry.DEFAULT_MODELS_DIR,
    resamples: int = 2000,
) -> dict[str, Any]:
    """Both versions on their shared validation split; `non_inferior` is difference >= -SE."""
    loaded = [models.load_version(f"{name}@{v}", models_dir) for v in (reference, candidate)]
    carved = shared_validation([version for _, version in loaded], data_root)
    labels = np.array([s.label for s in carved.validation])
    images = preprocess_many([s.path for s in carved.validation])
    reference_p, candidate_p = (
        np.asarray(model.predict(images, batch_size=64, verbose=0)).reshape(-1)
        for model, _ in loaded
    )
    result = paired_bootstrap_auc(labels, reference_p, candidate_p, resamples)
    return {
        "reference": loaded[0][1].label,
        "candidate": loaded[1][1].label,
        "validation_images": len(labels),
        "reference_threshold": loaded[0][1].threshold,
        "candidate_threshold": loaded[1][1].threshold,
        **result,
        "non_inferior": result["difference"] >= -result["bootstrap_se"],
    }
