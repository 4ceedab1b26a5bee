"""Refit a registered version for the films a modality sends: the same weights, the area resize
of the one input path, and a pixel check fitted at full resolution (`pneumo scope refit`).

Why a refit and not a retrain: the classifier held up at full resolution (its labels agree with
the 224 px copies' on the held-out originals), but the old pixel check was fitted on the 224 px
copies only and learned their JPEG quality-75 blocks, refusing every real film. Here it is fitted
on full-resolution originals passed through the one path, each also re-encoded the ways a PACS
stores it (JPEG 75/95, PNG, JPEG 2000, 500-1,024 px), next to the 224 px copies; and it is shown
what it must refuse (an adult site's development half, flipped, rotated and inverted chests).

The full-resolution originals are split by the parent's own validation split, so the held-out
originals are the ones whose 224 px copies the classifier never trained on: their accuracy at
full resolution and at 224 px is a fair pair. Thresholds come from out-of-fold scores of the fit
images (serving.pixelcheck.fit_with_exposure); the held-out images are only reported.
"""

from __future__ import annotations

import io
import logging
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core import registry
from serving import models, pixelcheck
from serving.image import load_grayscale, preprocess
from training import data, metrics, site
from training.scope import recorded_split
from training.train import code_commit

log = logging.getLogger(__name__)

RESIZE = "area"
FOLDS = 5
FALSE_REFUSAL_RATE = 0.01
ADULT_WEIGHT = 0.8  # of the out-of-scope side; the rest is the transformed children
SITE_SPLIT_SEED = 7


def feature_layers(model: Any) -> tuple[str, ...]:
    """The middle blocks the distance always read, and the last block: what an adult's chest
    looks like is in the last block too (on the NIH development half, the distance on the
    middle blocks alone refused 56%, with the last block 86%)."""
    middle = models.feature_layers(model)
    names = [layer.name for layer in model.layers]
    if "to_rgb" in names:
        return (*middle, "out_relu")
    pools = [name for name in names if re.fullmatch(r"block\d+_pool", name)]
    return tuple(dict.fromkeys((*middle, pools[-1])))


def reencoded(pixels: np.ndarray, fmt: str, short_side: int | None = None, **options) -> np.ndarray:
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    if short_side:
        factor = short_side / min(image.size)
        size = (max(2, round(image.width * factor)), max(2, round(image.height * factor)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("L"))


# How a PACS may hold the same film: each is a check at report time and an augmentation at fit.
ENCODINGS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "as sent": lambda p: p,
    "JPEG quality 75": lambda p: reencoded(p, "JPEG", quality=75),
    "JPEG quality 95, 512 px": lambda p: reencoded(p, "JPEG", 512, quality=95),
    "PNG, 500 px": lambda p: reencoded(p, "PNG", 500),
    "JPEG 2000 lossy 20:1, 1,024 px": lambda p: reencoded(
        p, "JPEG2000", 1024, quality_mode="rates", quality_layers=[20], irreversible=True),
}
# Real-world header errors: a film the wrong way up, mirrored or with inverted polarity.
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "upside down": np.flipud,
    "mirrored": np.fliplr,
    "inverted": lambda p: p.max() + p.min() - p,
    "rotated 90 degrees": np.rot90,
}


@dataclass(frozen=True)
class Item:
    """One image for the feature pass: how to get its pixels, and what it is."""

    pixels: Callable[[], np.ndarray]
    kind: str
    label: int
    patient: str
    name: str


def _features(scoring: Any, items: list[Item], batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, features) of every item through the one input path."""
    probabilities, features = [], []
    for start in range(0, len(items), batch):
        tensors = np.stack([preprocess(item.pixels(), RESIZE) for item in items[start:start + batch]])
        p, f = models.predict_with_features(scoring, tensors, batch)
        probabilities.append(p)
        features.append(f)
        log.info("features: %d of %d images", min(start + batch, len(items)), len(items))
    return np.concatenate(probabilities), np.concatenate(features)


def _inside(samples: Iterable[data.Sample], copies: Path, encodings: Iterable[str]) -> list[Item]:
    items = []
    for sample in samples:
        for encoding in encodings:
            items.append(Item(lambda s=sample, e=encoding: ENCODINGS[e](load_grayscale(s.path)),
                              encoding, sample.label, sample.patient_id, sample.path.name))
        copy = copies / sample.class_name / sample.path.name
        if copy.is_file():
            items.append(Item(lambda c=copy: load_grayscale(c), "224 px copy", sample.label,
                              sample.patient_id, sample.path.name))
    return items


def _transformed(samples: Iterable[data.Sample]) -> list[Item]:
    return [Item(lambda s=sample, t=kind: TRANSFORMS[t](load_grayscale(s.path)), kind, -1,
                 sample.patient_id, sample.path.name)
            for sample in samples for kind in TRANSFORMS]


def _adults(images: Iterable[site.SiteImage], prefix: str) -> list[Item]:
    items = []
    for image in images:
        for kind, encoding in (("as shared", "as sent"), ("JPEG quality 75", "JPEG quality 75")):
            items.append(Item(lambda i=image, e=encoding: ENCODINGS[e](load_grayscale(i.path)),
                              f"{prefix}, {kind}", image.label, image.patient_id, image.path.name))
        items.append(Item(lambda i=image: _upscaled(load_grayscale(i.path)),
                          f"{prefix}, PNG 1,024 px", image.label, image.patient_id, image.path.name))
    return items


def _upscaled(pixels: np.ndarray, side: int = 1024) -> np.ndarray:
    image = Image.fromarray(pixels).resize((side, side), Image.Resampling.BICUBIC)
    return reencoded(np.asarray(image), "PNG")


def _rates(scores: np.ndarray, kinds: np.ndarray) -> dict[str, dict[str, float | int]]:
    return {str(kind): {"images": int((kinds == kind).sum()),
                        "refused": round(float(np.mean(scores[kinds == kind] > 1.0)), 4)}
            for kind in sorted(set(kinds.tolist()))}


def _classifier_pair(items: list[Item], probabilities: np.ndarray, scores: np.ndarray,
                     threshold: float) -> dict[str, Any]:
    """Accuracy, AUC, sensitivity, specificity on the held-out originals as sent and on their
    224 px copies (assessed images only), and how often the two labels agree."""
    kinds = np.array([i.kind for i in items])
    names = np.array([i.name for i in items])
    labels = np.array([i.label for i in items])
    result: dict[str, Any] = {}
    by_name = {}
    for kind, key in (("as sent", "full_resolution"), ("224 px copy", "copy_224")):
        mask = (kinds == kind) & (scores <= 1.0)
        found = metrics.compute_metrics(labels[mask], probabilities[mask], threshold)
        result[key] = {name: found[name] for name in
                       ("n", "accuracy", "roc_auc", "sensitivity", "specificity")}
        by_name[kind] = dict(zip(names[mask], probabilities[mask] >= threshold, strict=True))
    both = set(by_name["as sent"]) & set(by_name["224 px copy"])
    agree = [by_name["as sent"][n] == by_name["224 px copy"][n] for n in both]
    result["label_agreement"] = {"images": len(both),
                                 "agree": round(float(np.mean(agree)), 4) if agree else None}
    return result


def _consistency(items: list[Item], scores: np.ndarray) -> dict[str, Any]:
    """Share of held-out originals whose decision (assessed or refused) is the same in every
    encoding of ENCODINGS."""
    decisions: dict[str, set[bool]] = {}
    for item, score in zip(items, scores, strict=True):
        if item.kind in ENCODINGS:
            decisions.setdefault(item.name, set()).add(bool(score > 1.0))
    same = [len(d) == 1 for d in decisions.values()]
    return {"images": len(same), "encodings": list(ENCODINGS),
            "same_decision": round(float(np.mean(same)), 4) if same else None}


def refit(spec: str, fullres: Path, adults: Path, models_dir: Path) -> registry.ModelVersion:
    """Register a new version of `spec`: its weights, the area resize, a full-resolution pixel
    check, and a card with the full-resolution validation. Not marked served."""
    model, parent = models.load_version(spec, models_dir)
    if parent.card.data.root is None:
        raise registry.CardError(f"{parent.label}: its card names no training data (data.root)")
    copies = Path(parent.card.data.root) / "train"
    fit_children, held_children = held_out_split(parent.label, fullres, models_dir)
    originals = fit_children + held_children
    adult_images = site.read_site(Path(adults))
    adult_fit, adult_held = data.patient_split(adult_images, 0.5, SITE_SPLIT_SEED)
    log.info("%d originals: %d fit, %d held out (the parent's validation patients); adults %d/%d",
             len(originals), len(fit_children), len(held_children), len(adult_fit), len(adult_held))

    layers = feature_layers(model)
    scoring, _ = models.with_features(model, layers)
    inside_items = _inside(fit_children, copies, ENCODINGS)
    outside_items = _transformed(fit_children) + _adults(adult_fit, "adult")
    _, inside = _features(scoring, inside_items)
    _, outside = _features(scoring, outside_items)
    groups = np.array([str(i.label) for i in inside_items])
    patients = np.array([i.patient for i in inside_items])
    is_adult = np.array([i.kind.startswith("adult") for i in outside_items])
    weights = np.where(is_adult, ADULT_WEIGHT / is_adult.sum(),
                       (1 - ADULT_WEIGHT) / max(1, (~is_adult).sum()))
    detector, oof_scores = pixelcheck.fit_with_exposure(
        inside, groups, patients, outside, weights, layers, FALSE_REFUSAL_RATE, FOLDS)

    held_items = (_inside(held_children, copies, ENCODINGS) + _transformed(held_children)
                  + _adults(adult_held, "adult (held-out half)"))
    probabilities, held = _features(scoring, held_items)
    scores = detector.score(held)
    kinds = np.array([i.kind for i in held_items])
    validation = {
        "code_commit": code_commit(),  # of this refit; the card's own is the training's
        "data": {"originals": str(fullres), "adults": str(adults),
                 "split": (f"originals whose patients are in {parent.label}'s validation split "
                           f"held out ({len(held_children)}), the rest fitted "
                           f"({len(fit_children)}); adults split by patient in halves "
                           f"(seed {SITE_SPLIT_SEED}): fitted {len(adult_fit)}, held out "
                           f"{len(adult_held)}")},
        "out_of_fold_refused_in_scope": round(float(np.mean(oof_scores > 1.0)), 4),
        "held_out_refused": _rates(scores, kinds),
        "classifier": _classifier_pair(held_items, probabilities, scores, parent.threshold),
        "encoding_consistency": _consistency(held_items, scores),
    }
    summary = {
        "method": pixelcheck.EXPOSURE_METHOD,
        "layers": list(layers),
        "groups": sorted(set(groups.tolist())),
        "fit_images": len(inside_items),
        "outlier_images": len(outside_items),
        "held_out_images": len(held_items),
        "false_refusal_rate": FALSE_REFUSAL_RATE,
        "threshold": 1.0,
        "threshold_rule": (f"each test at the {1 - FALSE_REFUSAL_RATE / 2:.1%} quantile of "
                           f"{FOLDS}-fold out-of-fold scores of in-scope fit images (by patient)"),
        "held_out_refused_rate": validation["held_out_refused"].get("as sent", {}).get("refused"),
    }
    card = {
        # The same trained weights: the parent's training record holds (as for a calibration).
        **parent.card.dump(exclude={"name", "version", "model_file", "model_sha256",
                                    "preprocessing", "scope", "created", "parent"}),
        "parent": parent.label,
        "scope": {"intended_use": parent.scope.intended_use.dump() if parent.scope
                  and parent.scope.intended_use else None, "pixel_check": summary},
        "full_resolution_validation": validation,
    }
    with tempfile.TemporaryDirectory() as folder:
        path = pixelcheck.save(detector, Path(folder))
        return registry.register_copy(parent, card, models_dir, detector_file=path, resize=RESIZE)


def held_out_split(spec: str, fullres: Path, models_dir: Path) -> tuple[list[data.Sample], list[data.Sample]]:
    """(fitted, held-out) originals as `refit` splits them (for tests and reports)."""
    parent = registry.resolve(spec, models_dir)
    carved = data.carve_validation(Path(parent.card.data.root or ""),
                                   *recorded_split(parent.card.hyper_parameters))
    names = {s.path.name for s in carved.validation}
    originals = data.read_split(Path(fullres), "train")
    return ([s for s in originals if s.path.name not in names],
            [s for s in originals if s.path.name in names])
