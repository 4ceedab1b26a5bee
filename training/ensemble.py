"""`pneumo ensemble`: average registered versions of one model into a new version.

A deep ensemble (members differing only in seed) is the most robust known way to keep accuracy
and calibration under dataset shift, which is this data's problem (test normals differ from
train's). The ensemble is one Keras model file whose output is the mean of the members'
probabilities, so serving, hashing and the contract treat it like any other version. Members
must share the validation split: otherwise one member's validation images are another's training
images and the ensemble's threshold and validation metrics would be optimistic.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import keras

from core import contract, registry
from serving import models
from training.compare import shared_validation, split_of
from training.train import code_commit, load_split, provenance, register_evaluated


class EnsembleError(registry.RegistryError):
    """Members that cannot be averaged honestly; the message says which and why."""


def check_members(versions: list[registry.ModelVersion]) -> None:
    """Refuse members that are too few, repeated or already ensembles."""
    if len(versions) < 2:
        raise EnsembleError("an ensemble needs at least two member versions")
    labels = [v.label for v in versions]
    if len(set(labels)) != len(labels):
        raise EnsembleError(f"a version is named twice: {labels}")
    for version in versions:
        if version.card.members is not None:
            raise EnsembleError(f"{version.label} is itself an ensemble; name its members instead")
        if version.card.training is None or version.card.metrics.validation is None:
            raise EnsembleError(f"{version.label}: its card has no training record or validation "
                                f"metrics to carry into the ensemble's")


def average(members: list[keras.Model]) -> keras.Model:
    """One model whose output is the mean of the members' probabilities."""
    inputs = keras.Input(
        shape=(contract.INPUT_HEIGHT, contract.INPUT_WIDTH, contract.INPUT_CHANNELS), name="image"
    )
    for index, member in enumerate(members):
        member.name = f"member_{index}"  # nested models need unique names to save
    outputs = keras.layers.Average(name="pneumonia_probability")([m(inputs) for m in members])
    return keras.Model(inputs, outputs, name=f"mean_of_{len(members)}")


def member_summary(version: registry.ModelVersion) -> dict[str, Any]:
    card = version.card
    return {
        "label": version.label,
        "model_sha256": card.model_sha256,
        "code_commit": card.code_commit,
        "architecture": card.architecture,
        "seed": card.hyper_parameters.seed,
        "hyper_parameters": card.hyper_parameters.dump(),
        "validation_roc_auc": card.metrics.validation.roc_auc,
        "wall_seconds": card.training.wall_seconds,
        "epochs_run": card.training.epochs_run,
    }


def build_ensemble(
    name: str,
    member_versions: list[str],
    data_root: Path,
    models_dir: Path = registry.DEFAULT_MODELS_DIR,
    report_test: bool = False,
) -> registry.ModelVersion:
    """Load and check the members, average them, score on validation, register."""
    started = time.monotonic()
    commit = code_commit()
    loaded = [models.load_version(f"{name}@{v}", models_dir) for v in member_versions]
    versions = [version for _, version in loaded]
    check_members(versions)
    carved = shared_validation(versions, data_root)  # refuses members validated differently
    fraction, split_seed, train_fingerprint = split_of(versions[0].card)
    model = average([m for m, _ in loaded])
    first = versions[0].card
    card: dict[str, Any] = {
        **provenance(model, commit),
        "hyper_parameters": {
            "ensemble": "mean of member probabilities",
            "members": [v.label for v in versions],
            "validation_fraction": fraction,
            "split_seed": split_seed,
        },
        "members": [member_summary(v) for v in versions],
        "backbone": first.backbone,
        "data": {
            "root": str(data_root),
            "train_fingerprint": train_fingerprint,
            "train_images": len(carved.train),
            "validation_images": len(carved.validation),
            "duplicates_dropped": carved.duplicates_dropped,
            "validation_split": (
                f"{fraction:.0%} of train/ patients per class, seed {split_seed} (every member's)"
            ),
        },
        "class_imbalance": first.class_imbalance,
        "class_weights": first.class_weights,
        "augmentation": first.augmentation,
        "training": {
            "wall_seconds": round(sum(v.card.training.wall_seconds for v in versions), 1),
            "epochs_run": sum(v.card.training.epochs_run for v in versions),
            "ensemble_seconds": round(time.monotonic() - started, 1),
            "note": "wall_seconds and epochs_run are the members' sums (trained one after another)",
        },
        "dataset_licence": first.dataset_licence,
    }
    return register_evaluated(
        name, model, card, load_split(carved.validation), data_root, models_dir, report_test
    )
