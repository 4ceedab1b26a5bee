"""Fit a version's scope: its intended use from the training data and its pixel check.

Used at registration (`pneumo train`, `adapt`) and once for versions registered before pixel
checks existed (`pneumo scope fit`), which gets the same fit from the split their card records.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np

from core import registry, scope
from core.card import HyperParameters
from serving import models, pixelcheck
from serving.image import preprocess_many
from training import data

log = logging.getLogger(__name__)


def fit_detector(
    model: keras.Model,
    train_images: np.ndarray,
    train_groups: np.ndarray,
    held_out_images: np.ndarray,
    held_out_sites: np.ndarray | None = None,
    false_refusal_rate: float = pixelcheck.DEFAULT_FALSE_REFUSAL_RATE,
) -> tuple[pixelcheck.Detector, dict[str, Any]]:
    """The pixel check of `model`: Gaussians on its training images, threshold on held-out ones."""
    scoring, layers = models.with_features(model)
    _, train_features = models.predict_with_features(scoring, train_images)
    _, held_features = models.predict_with_features(scoring, held_out_images)
    return pixelcheck.fit(train_features, train_groups, held_features, layers, false_refusal_rate,
                   held_out_sites)


def scope_card(summary: dict[str, Any], sites: list[dict[str, Any]]) -> dict[str, Any]:
    """The card's `scope`: intended use and the detector's summary (file and hash added later)."""
    return {"intended_use": scope.intended_use(sites), "pixel_check": summary}


def kermany_groups(samples: list[data.Sample]) -> np.ndarray:
    return np.array([f"{scope.KERMANY_SITE['name']}/{s.class_name}" for s in samples])


def kermany_site(train_images: int) -> dict[str, Any]:
    return {**scope.KERMANY_SITE, "training_images": train_images}


def recorded_split(hyper: HyperParameters) -> tuple[float, int]:
    """The validation split a card records; training's defaults (0.15, seed 1337) where it says none."""
    return hyper.validation_split() or (0.15, 1337)


def fit_existing(
    spec: str, models_dir: Path, false_refusal_rate: float = pixelcheck.DEFAULT_FALSE_REFUSAL_RATE
) -> registry.ModelVersion:
    """Fit and record the scope of a Kermany-trained version registered without one."""
    model, version = models.load_version(spec, models_dir)
    if version.scope is not None:
        raise registry.RegistryError(f"{version.label} already has a scope")
    card_data = version.card.data
    hyper = version.card.hyper_parameters
    root = Path(card_data.root or "")
    if not (root / "train").is_dir():
        raise registry.RegistryError(
            f"{version.label}: its training data {root} is not here; fit its scope where it is")
    carved = data.carve_validation(root, *recorded_split(hyper))
    if data.fingerprint(carved.all_train, root) != card_data.train_fingerprint:
        raise registry.RegistryError(f"{version.label}: {root}/train differs from the data it "
                                     f"was trained on (fingerprint mismatch)")
    log.info("fitting the pixel check of %s on %d training images, threshold on %d validation",
             version.label, len(carved.train), len(carved.validation))
    detector, summary = fit_detector(
        model, preprocess_many([s.path for s in carved.train]), kermany_groups(carved.train),
        preprocess_many([s.path for s in carved.validation]), None, false_refusal_rate,
    )
    with tempfile.TemporaryDirectory() as folder:
        path = pixelcheck.save(detector, Path(folder))
        registry.record_scope(version, scope_card(summary, [kermany_site(len(carved.train))]), path)
    return registry.resolve(spec, models_dir)
