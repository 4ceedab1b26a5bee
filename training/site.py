"""A site's labelled studies, and what a version says about each: `accept`, `calibrate`, `adapt`.

A site folder holds `labels.csv` (file, label, optional patient_id, age, view; more columns are
ignored) and the images it names: JPEG/PNG, or DICOM decoded exactly as the worker decodes them
(the face passes that decoder in, so training never imports the worker). A folder without
labels.csv in the Kermany layout (`NORMAL/`, `PNEUMONIA/`) is read with patient ids from the names.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core import contract, registry, scope
from serving import models, pixelcheck
from serving.header import Decoded
from serving.image import preprocess_file
from training import data, progress

LABELS_FILE = "labels.csv"
DICOM_SUFFIXES = {".dcm", ".dicom", ""}


@dataclass(frozen=True)
class SiteImage:
    path: Path
    label: int  # 1 = pneumonia
    patient_id: str
    age_years: float | None = None
    view: str | None = None


DicomDecoder = Callable[[Path], Decoded]


class SiteDataError(Exception):
    """The folder is not a site data set; the message says what is wrong."""


def read_site(folder: Path) -> list[SiteImage]:
    """Every labelled image of the folder, in labels.csv order (or sorted, Kermany layout)."""
    folder = Path(folder)
    labels = folder / LABELS_FILE
    if not labels.exists():
        if all((folder / name).is_dir() for name in contract.LABELS):
            return [SiteImage(s.path, s.label, s.patient_id)
                    for s in data.read_split(folder.parent, folder.name)]
        raise SiteDataError(f"{folder} has neither {LABELS_FILE} nor NORMAL/ and PNEUMONIA/ folders")
    images = []
    with labels.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"file", "label"} - set(reader.fieldnames or [])
        if missing:
            raise SiteDataError(f"{labels} lacks the column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            label = row["label"].strip().upper()
            if label not in data.CLASS_NAMES:
                raise SiteDataError(f"{labels} line {line}: label {row['label']!r} is not "
                                    f"NORMAL or PNEUMONIA")
            path = folder / row["file"]
            if not path.is_file():
                raise SiteDataError(f"{labels} line {line}: {row['file']} does not exist")
            age = (row.get("age") or "").strip()
            images.append(SiteImage(
                path, data.CLASS_NAMES.index(label),
                (row.get("patient_id") or "").strip() or f"file:{row['file']}",
                float(age) if age else None, (row.get("view") or "").strip().upper() or None,
            ))
    if not images:
        raise SiteDataError(f"{labels} lists no images")
    return images


def fingerprint(images: list[SiteImage]) -> str:
    """Hash of the file names, labels and contents: which data a card's figures came from."""
    digest = hashlib.sha256()
    for image in sorted(images, key=lambda i: str(i.path)):
        digest.update(f"{image.path.name}\t{image.label}\t{data.file_sha256(image.path)}\n".encode())
    return digest.hexdigest()


@dataclass
class Loaded:
    """Tensors of the images that could be decoded, and the reasons for the others."""

    images: list[SiteImage]
    tensors: np.ndarray
    decoded: list[bool]  # per image: has a tensor
    reasons: list[str | None]  # per image: why not (ignored or failed), else None
    ages: list[float | None] = field(default_factory=list)
    views: list[str | None] = field(default_factory=list)


def load(images: list[SiteImage], decode_dicom: DicomDecoder | None = None) -> Loaded:
    """Decode every image once: JPEG/PNG with the training loader, DICOM as the worker does.

    A DICOM header's age and view count where labels.csv leaves them out.
    """
    tensors, decoded, reasons, ages, views = [], [], [], [], []
    for image in progress.track(images, "reading site images"):
        age, view = image.age_years, image.view
        if image.path.suffix.lower() in data.IMAGE_SUFFIXES:
            tensor, reason = preprocess_file(image.path), None
        else:
            if decode_dicom is None:
                raise SiteDataError(f"{image.path.name}: DICOM input needs the worker's decoder")
            result = decode_dicom(image.path)
            tensor, reason = result.tensor, result.reason
            age = age if age is not None else result.age_years
            view = view or result.view
        decoded.append(tensor is not None)
        reasons.append(reason)
        ages.append(age)
        views.append(view)
        if tensor is not None:
            tensors.append(tensor)
    stack = (np.stack(tensors) if tensors else
             np.zeros((0, contract.INPUT_HEIGHT, contract.INPUT_WIDTH, 1), np.float32))
    return Loaded(images, stack, decoded, reasons, ages, views)


@dataclass
class Assessment:
    """One version on one site: per image, a probability (assessed) or the refusal reason."""

    version: registry.ModelVersion
    labels: np.ndarray
    probabilities: np.ndarray  # nan where not assessed
    scores: np.ndarray  # pixel check score, nan where not decoded or refused on the header
    reasons: list[str | None]  # None where assessed
    ages: list[float | None]
    views: list[str | None]

    @property
    def assessed(self) -> np.ndarray:
        return np.array([r is None for r in self.reasons], dtype=bool)


def assess(spec: str, loaded: Loaded, models_dir: Path) -> Assessment:
    """What the worker would do with each image: refuse (header, pixel check) or give a score."""
    model, version = models.load_version(spec, models_dir)
    scope_of = version.scope
    use = scope_of.intended_use if scope_of else None
    if not use:
        raise registry.RegistryError(f"{version.label} has no scope; run `pneumo scope fit`")
    detector = pixelcheck.load(version.path, scope_of.detector_sha256)
    scoring, _ = models.with_features(model, detector.layers)  # the layers its check was fitted on
    probabilities, features = models.predict_with_features(scoring, loaded.tensors)
    pixel_scores = detector.score(features) if len(features) else np.zeros(0)
    n = len(loaded.images)
    all_p, all_s = np.full(n, np.nan), np.full(n, np.nan)
    reasons: list[str | None] = []
    row = 0
    for index in range(n):
        reason = loaded.reasons[index]
        if loaded.decoded[index]:
            all_s[index] = pixel_scores[row]
            reason = scope.header_reason(use, loaded.ages[index], loaded.views[index])
            if reason is None and pixel_scores[row] > detector.threshold:
                reason = scope.pixel_reason(float(pixel_scores[row]), detector.threshold, version.label)
            if reason is None:
                all_p[index] = probabilities[row]
            row += 1
        reasons.append(reason)
    labels = np.array([i.label for i in loaded.images])
    return Assessment(version, labels, all_p, all_s, reasons, loaded.ages, loaded.views)


def site_summary(name: str, images: list[SiteImage], loaded: list[Loaded]) -> dict[str, Any]:
    """A site as the card's intended use names it: the views and ages of its images (labels.csv,
    else the DICOM header); an age range only when every image's age is known."""
    ages = [a for part in loaded for a in part.ages if a is not None]
    views = sorted({v for part in loaded for v in part.views if v})
    return {
        "name": name,
        "population": f"site {name}: {len(images)} labelled images"
                      + (f", ages {int(min(ages))}-{int(max(ages))} years" if ages else "")
                      + (f", views {'/'.join(views)}" if views else ""),
        "views": views,
        "age_years": [int(min(ages)), int(max(ages))] if len(ages) == len(images) else None,
        "fingerprint": fingerprint(images),
        "images": len(images),
    }
