"""Read the Kaggle chest X-ray folder layout and carve a patient-level validation split.

The official `val/` has 16 images, so validation is carved out of `train/` by patient: images of
one child never sit on both sides. The test split is only read by the final report.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from core import contract

CLASS_NAMES = contract.LABELS  # label index 0, 1
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}

_PNEUMONIA_NAME = re.compile(r"^(person\d+)_", re.IGNORECASE)
_NORMAL_NAME = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    """One labelled image file."""

    path: Path
    label: int
    patient_id: str

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]


def patient_id_from_name(file_name: str, class_name: str) -> str:
    """Patient id from a Kermany file name (`person12_virus_3`, `IM-0115-0001`, `NORMAL2-IM-...`).

    The class is part of the id because the two naming schemes number patients independently.
    An unknown name is its own patient: it can never leak across the split.
    """
    stem = Path(file_name).stem
    match = _PNEUMONIA_NAME.match(stem) or _NORMAL_NAME.match(stem)
    key = match.group(1) if match else stem
    return f"{class_name}/{key}"


def read_split(root: Path, split: str) -> list[Sample]:
    """All images of `<root>/<split>/{NORMAL,PNEUMONIA}/*`, sorted by path."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no '{split}' folder under {root}: expected <root>/{split}/NORMAL")
    samples = []
    for label, class_name in enumerate(CLASS_NAMES):
        class_dir = split_dir / class_name
        if not class_dir.is_dir():
            raise FileNotFoundError(f"missing class folder {class_dir}")
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(Sample(path, label, patient_id_from_name(path.name, class_name)))
    if not samples:
        raise ValueError(f"no images under {split_dir}")
    return samples


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def drop_duplicates(samples: list[Sample]) -> tuple[list[Sample], int]:
    """Keep the first of each group of byte-identical files; return the rest's count too."""
    seen: set[str] = set()
    kept = []
    for sample in samples:
        digest = file_sha256(sample.path)
        if digest not in seen:
            seen.add(digest)
            kept.append(sample)
    return kept, len(samples) - len(kept)


class Labelled(Protocol):
    label: int
    patient_id: str


L = TypeVar("L", bound=Labelled)


def patient_split(
    samples: list[L], validation_fraction: float = 0.15, seed: int = 1337
) -> tuple[list[L], list[L]]:
    """Split by patient, stratified by class, reproducible by seed: (train, validation).

    The one patient split: training's validation set, and a site's halves (calibrate, adapt). A
    patient with images of both classes is drawn once (with the first class)."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    patients_by_label: dict[int, set[str]] = defaultdict(set)
    for sample in samples:
        patients_by_label[sample.label].add(sample.patient_id)
    rng = random.Random(seed)
    validation_patients: set[str] = set()
    for label in sorted(patients_by_label):
        patients = sorted(patients_by_label[label] - validation_patients)
        rng.shuffle(patients)
        count = max(1, round(len(patients) * validation_fraction))
        validation_patients.update(patients[:count])
    train = [s for s in samples if s.patient_id not in validation_patients]
    validation = [s for s in samples if s.patient_id in validation_patients]
    return train, validation


@dataclass(frozen=True)
class TrainValidation:
    """`train/` as read, and the training and validation samples carved from it."""

    all_train: list[Sample]
    train: list[Sample]
    validation: list[Sample]
    duplicates_dropped: int


def carve_validation(root: Path, validation_fraction: float, seed: int) -> TrainValidation:
    """`train/` with byte-identical duplicates dropped, split by patient. The one recipe both
    training and ensembling use, so an ensemble is scored on exactly its members' validation."""
    all_train = read_split(root, "train")
    unique, dropped = drop_duplicates(all_train)
    train, validation = patient_split(unique, validation_fraction, seed)
    return TrainValidation(all_train, train, validation, dropped)


def fingerprint(samples: list[Sample], root: Path) -> str:
    """Hash of the file list (paths relative to root, labels) and each file's contents."""
    digest = hashlib.sha256()
    for sample in sorted(samples, key=lambda s: str(s.path)):
        relative = Path(os.path.relpath(Path(sample.path).absolute(), Path(root).absolute()))
        digest.update(f"{relative}\t{sample.label}\t{file_sha256(sample.path)}\n".encode())
    return digest.hexdigest()


def class_weights(samples: list[Sample]) -> dict[int, float]:
    """Balanced class weights, n / (k * n_class): scikit-learn's `compute_class_weight`."""
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([s.label for s in samples])
    classes = np.arange(len(CLASS_NAMES))
    missing = [int(c) for c in classes if not (labels == c).any()]
    if missing:
        counts = [int((labels == c).sum()) for c in classes]
        raise ValueError(f"a class has no training images: counts {counts}")
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    return {int(c): float(w) for c, w in zip(classes, weights, strict=True)}
