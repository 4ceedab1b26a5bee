"""`pneumo adapt`: one version for two populations, the base's training data plus a site's studies.

Starts from the served version's weights (the base), fine-tunes its top backbone layers with
augmentation on the base's training split and the site's training patients together, each site
carrying half the weight and each class half of its site's; stops early on the same mix of both
sites' validation images; chooses the threshold there; refits the pixel check on both sites.
The site's images are split by patient inside the site: no patient is on both sides.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from core import contract, registry
from serving import pixelcheck
from serving.image import preprocess_many
from serving.models import load_version
from training import data, metrics, models, site
from training.scope import fit_detector, kermany_groups, kermany_site, recorded_split, scope_card
from training.train import (
    Split,
    TrainConfig,
    code_commit,
    compile_for_training,
    fit_phase,
    predict,
    provenance,
)

log = logging.getLogger(__name__)
THRESHOLD_RULE = ("Youden's J averaged over the sites (each site's sensitivity + specificity - 1, "
                  "mean of the sites), on the validation images of both sites")


@dataclass
class AdaptConfig:
    """Hyper-parameters; all land in the card."""

    site_validation_fraction: float = 0.25  # of the site's patients, per class
    site_repeat: int = 3  # the site's training images appear this often per epoch (augmented)
    fine_tune_layers: int = 80
    learning_rate: float = 3e-5  # T3's fine-tuning rate; chosen over 1e-4 on validation (model log)
    epochs: int = 10
    batch_size: int = 32
    label_smoothing: float = 0.05
    early_stopping_patience: int = 3
    seed: int = 1337
    split_seed: int = 1337
    max_base_images: int | None = None  # tests only: cap the base training images
    false_refusal_rate: float = pixelcheck.DEFAULT_FALSE_REFUSAL_RATE


def site_weights(site_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-image weights: every site the same total, every class half of its site's; mean 1."""
    weights = np.zeros(len(labels), dtype=np.float64)
    sites = sorted(set(site_ids.tolist()))
    for site_id in sites:
        for label in (0, 1):
            chosen = (site_ids == site_id) & (labels == label)
            if chosen.any():
                weights[chosen] = 1.0 / (len(sites) * 2 * chosen.sum())
    return weights * len(labels) / weights.sum()


def mean_site_youden(labels: np.ndarray, probabilities: np.ndarray, site_ids: np.ndarray) -> float:
    """The threshold maximising the sites' mean Youden J; the middle of a plateau."""
    candidates = np.unique(np.clip(probabilities, 1e-6, 1 - 1e-6))
    scores = np.zeros(len(candidates))
    for site_id in set(site_ids.tolist()):
        chosen = site_ids == site_id
        y, p = labels[chosen], probabilities[chosen]
        positives, negatives = max(1, (y == 1).sum()), max(1, (y == 0).sum())
        sensitivity = np.array([((p >= t) & (y == 1)).sum() / positives for t in candidates])
        specificity = np.array([((p < t) & (y == 0)).sum() / negatives for t in candidates])
        scores += sensitivity + specificity - 1
    best = candidates[np.isclose(scores, scores.max())]
    return float((best.min() + best.max()) / 2)


def _site_split(images: list[site.SiteImage], loaded: site.Loaded) -> Split:
    kept = [i for i, ok in zip(loaded.images, loaded.decoded, strict=True) if ok]
    labels = np.array([i.label for i in kept], dtype=np.int64)
    samples = [data.Sample(i.path, i.label, i.patient_id) for i in kept]
    return Split(loaded.tensors, labels, samples)


def adapt(
    name: str,
    site_name: str,
    site_dir: Path,
    models_dir: Path = registry.DEFAULT_MODELS_DIR,
    config: AdaptConfig | None = None,
    decode_dicom: site.DicomDecoder | None = None,
    verbose: int = 2,
) -> registry.ModelVersion:
    """Train, choose the threshold, refit the pixel check, register (not served)."""
    config = config or AdaptConfig()
    started = time.monotonic()
    commit = code_commit()
    keras.utils.set_random_seed(config.seed)
    model, base = load_version(name, models_dir)
    if not base.scope:
        raise registry.RegistryError(f"{base.label} has no scope; run `pneumo scope fit` first")

    # Data: the base's own split, and the site's patients split inside the site.
    hyper = base.card.hyper_parameters
    if base.card.data.root is None:
        raise registry.CardError(f"{base.label}: its card names no training data (data.root)")
    root = Path(base.card.data.root)
    carved = data.carve_validation(root, *recorded_split(hyper))
    base_train = carved.train
    if config.max_base_images:
        rng = np.random.default_rng(config.seed)
        base_train = [base_train[i] for i in sorted(rng.choice(len(base_train), config.max_base_images,
                                                               replace=False))]
    site_images = site.read_site(site_dir)
    site_train_images, site_val_images = data.patient_split(
        site_images, config.site_validation_fraction, config.split_seed)
    site_train_loaded = site.load(site_train_images, decode_dicom)
    site_val_loaded = site.load(site_val_images, decode_dicom)
    site_train, site_val = _site_split(site_train_images, site_train_loaded), _site_split(
        site_val_images, site_val_loaded)
    undecoded = sum(not ok for ok in site_train_loaded.decoded + site_val_loaded.decoded)
    base_train_split = Split(preprocess_many([s.path for s in base_train]),
                             np.array([s.label for s in base_train]), base_train)
    base_val_split = Split(preprocess_many([s.path for s in carved.validation]),
                           np.array([s.label for s in carved.validation]), carved.validation)
    log.info("adapt %s to %s: base %d train / %d validation, site %d train / %d validation "
             "(%d site files not decodable, left out)", base.label, site_name, len(base_train),
             len(carved.validation), len(site_train.labels), len(site_val.labels), undecoded)

    repeat = max(1, config.site_repeat)
    train = Split(
        np.concatenate([base_train_split.images, *[site_train.images] * repeat]),
        np.concatenate([base_train_split.labels, *[site_train.labels] * repeat]),
        base_train + site_train.samples * repeat,
    )
    train_sites = np.array([0] * len(base_train) + [1] * (len(site_train.labels) * repeat))
    validation = Split(np.concatenate([base_val_split.images, site_val.images]),
                       np.concatenate([base_val_split.labels, site_val.labels]),
                       carved.validation + site_val.samples)
    validation_sites = np.array([0] * len(carved.validation) + [1] * len(site_val.labels))

    # Fine-tune from the base's weights on both sites at once.
    unfrozen = models.unfreeze_top(model, config.fine_tune_layers)
    training_model = models.with_augmentation(model, config.seed, hyper.augmentation or "standard")
    compile_for_training(training_model, config.learning_rate, config.label_smoothing)
    fit_config = TrainConfig(model_name=name, batch_size=config.batch_size, seed=config.seed,
                             early_stopping_monitor="val_loss",
                             early_stopping_patience=config.early_stopping_patience)
    log.info("fine-tuning %d backbone layers with weights at %g", unfrozen, config.learning_rate)
    history = fit_phase(training_model, train, validation, fit_config, config.epochs, None, verbose,
                        site_weights(train_sites, train.labels),
                        site_weights(validation_sites, validation.labels))
    train_seconds = time.monotonic() - started

    # Threshold and metrics on both sites' validation images.
    probabilities = predict(model, validation.images)
    threshold = mean_site_youden(validation.labels, probabilities, validation_sites)
    per_site = {
        site_id: metrics.compute_metrics(validation.labels[validation_sites == index],
                                         probabilities[validation_sites == index], threshold)
        for index, site_id in enumerate([kermany_site(0)["name"], site_name])
    }

    # The pixel check on both sites: a Gaussian per (site, class), threshold per site.
    site_groups = np.array([f"{site_name}/{data.CLASS_NAMES[y]}" for y in site_train.labels])
    detector, summary = fit_detector(
        model, np.concatenate([base_train_split.images, site_train.images]),
        np.concatenate([kermany_groups(base_train), site_groups]),
        validation.images, validation_sites, config.false_refusal_rate,
    )
    site_entry = {**site.site_summary(site_name, site_images, [site_train_loaded, site_val_loaded]),
                  "training_images": len(site_train.labels),
                  "validation_images": len(site_val.labels), "data": str(site_dir)}
    card: dict[str, Any] = {
        **provenance(model, commit),
        "parent": base.label,
        "adapted_to": site_entry,
        "hyper_parameters": {**hyper.dump(), "adapt": asdict(config)},
        "backbone": base.card.backbone,
        "data": {**base.card.data.dump(), "train_images": len(base_train),
                 "site": site_entry},
        "class_imbalance": "per-image weights: each site half, each class half of its site",
        "augmentation": base.card.augmentation,
        "training": {"wall_seconds": round(train_seconds, 1),
                     "epochs_run": len(history.get("loss", [])), "history": history},
        "threshold": threshold,
        "threshold_rule": THRESHOLD_RULE,
        "validation_score_histogram": contract.score_histogram(probabilities),
        "metrics": {"validation": metrics.compute_metrics(validation.labels, probabilities, threshold),
                    "validation_by_site": per_site},
        "dataset_licence": base.card.dataset_licence,
        "scope": scope_card(summary, [kermany_site(len(base_train)), site_entry]),
    }
    with tempfile.TemporaryDirectory() as folder:
        detector_file = pixelcheck.save(detector, Path(folder))
        version = registry.register(name, model, card, models_dir, detector_file=detector_file)
    log.info("registered %s: validation %s", version.label,
             {k: round(v["roc_auc"], 4) for k, v in per_site.items()})
    return version
