"""`pneumo calibrate`: a version's threshold chosen on a site's own studies, as a new version.

The site's labelled studies are split by patient (stratified by class, `data.patient_split`,
fixed seed) into a calibration half and an evaluation half. The threshold is chosen on the
calibration half's assessed images (those the version does not refuse) by RULE, the same rule
every version's threshold uses on its validation split (training.metrics.choose_threshold); the
evaluation half, which took no part in the choice, is reported at that threshold with the same
report as `pneumo accept`. The result is registered as a new version of the same name: the same
model file and pixel check (byte for byte), the new threshold, and a card naming the site data.
It is not served: serving it is a separate, deliberate `pneumo models serve`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from core import registry
from training import accept, data, metrics, site
from training.train import code_commit

DEFAULT_SPLIT_SEED = 20261202
RULE = ("Youden's J (sensitivity + specificity - 1) maximised on the calibration half, "
        "the middle of a plateau")
SPLIT_RULE = ("patients split in two halves, stratified by class (data.patient_split, fraction "
              "0.5): the held half evaluates, the other calibrates")
# Card fields that describe the parent's own threshold and results, not the weights.
_NOT_INHERITED = {"name", "version", "model_file", "model_sha256", "preprocessing", "threshold",
                  "threshold_rule", "metrics", "scope", "calibration", "parent", "registered",
                  "created"}


class CalibrationError(registry.RegistryError):
    """The site data cannot calibrate this version; the message says why."""


def _half(images: list[site.SiteImage], summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "images": len(images),
        "patients": len({i.patient_id for i in images}),
        "normal": sum(i.label == 0 for i in images),
        "pneumonia": sum(i.label == 1 for i in images),
        "assessed": summary["assessed"],
        "refused": summary["refused"],
    }


def _card_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("n", "refused", "refused_rate", "refusals", "assessed", *accept.METRIC_KEYS,
            "confusion_matrix", "ci95")
    return {k: summary[k] for k in keep}


def calibrate(
    spec: str,
    data_dir: Path,
    models_dir: Path = registry.DEFAULT_MODELS_DIR,
    split_seed: int = DEFAULT_SPLIT_SEED,
    decode_dicom: site.DicomDecoder | None = None,
    resamples: int = accept.BOOTSTRAP_RESAMPLES,
) -> tuple[registry.ModelVersion, dict[str, Any]]:
    """Choose the threshold on the calibration half, report the evaluation half, register."""
    data_dir = Path(data_dir)
    parent = registry.resolve(spec, models_dir)
    images = site.read_site(data_dir)
    calibration, evaluation = data.patient_split(images, 0.5, split_seed)
    if not calibration or not evaluation:
        raise CalibrationError(f"{data_dir}: too few patients to split in two halves "
                               f"({len({i.patient_id for i in images})})")
    loaded = site.load(images, decode_dicom)
    assessment = site.assess(parent.label, loaded, models_dir)
    calibration_patients = {i.patient_id for i in calibration}
    in_calibration = np.array([i.patient_id in calibration_patients for i in images], dtype=bool)
    usable = in_calibration & assessment.assessed
    if len(np.unique(assessment.labels[usable])) < 2:
        raise CalibrationError(
            f"the calibration half has {int(usable.sum())} assessed image(s) of "
            f"{int(in_calibration.sum())}, not both classes: no threshold can be chosen")
    threshold = metrics.choose_threshold(assessment.labels[usable],
                                         assessment.probabilities[usable])
    version = registry.new_version()
    label = f"{parent.name}@{version}"
    halves = {
        name: ([i for i, keep in zip(images, mask, strict=True) if keep],
               accept.subset(assessment, mask))
        for name, mask in (("calibration", in_calibration), ("evaluation", ~in_calibration))
    }
    summaries = {
        name: accept.summarize(part.labels, part.probabilities, part.reasons,
                               [i.patient_id for i in half_images], threshold, resamples)
        for name, (half_images, part) in halves.items()
    }
    evaluation_images, evaluation_part = halves["evaluation"]
    calibration_record = {
        "data": str(data_dir.resolve()),
        "site_fingerprint": site.fingerprint(images),
        "split_seed": split_seed,
        "split_rule": SPLIT_RULE,
        "halves": {name: _half(halves[name][0], summaries[name]) for name in halves},
        "metrics": {name: _card_metrics(summaries[name]) for name in halves},
        "parent_threshold": parent.threshold,
        "code_commit": code_commit(),  # of this calibration; the card's own is the training's
    }
    inherited = parent.card.dump(exclude=_NOT_INHERITED)
    card = {
        **inherited,
        "parent": parent.label,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "threshold": threshold,
        "threshold_rule": RULE,
        "calibration": accept.clean(calibration_record),
        "parent_metrics": parent.card.metrics.dump(),
    }
    # Same weights and pixel check as the parent: its assessment is the new version's, by name.
    relabelled = dataclasses.replace(evaluation_part, reasons=[
        r.replace(parent.label, label) if r else r for r in evaluation_part.reasons])
    with tempfile.TemporaryDirectory() as plots:
        new_report = accept.version_report(
            relabelled, evaluation_images, data_dir, threshold, label, RULE,
            Path(plots), "site_evaluation", resamples)
        parent_report = accept.version_report(
            evaluation_part, evaluation_images, data_dir, parent.threshold, parent.label,
            resamples=resamples)
        new_version = registry.register_copy(
            parent, card, models_dir, [Path(p) for p in new_report.get("plots", [])], version)
    new_report["plots"] = [str(new_version.path / Path(p).name) for p in new_report.get("plots", [])]
    report = {
        **accept.site_header(data_dir, evaluation_images, resamples),
        "half": "evaluation",
        "registered": new_version.label,
        "parent": parent.label,
        "served": False,
        "threshold": threshold,
        "threshold_rule": RULE,
        "calibration": calibration_record,
        "versions": [parent_report, new_report],
    }
    return new_version, accept.clean(report)


def format_report(report: dict[str, Any]) -> str:
    halves = report["calibration"]["halves"]
    cal, ev = halves["calibration"], halves["evaluation"]
    return "\n".join([
        f"registered {report['registered']} (not served): threshold {report['threshold']:.4f}, "
        f"parent {report['parent']} {report['calibration']['parent_threshold']:.4f}",
        f"rule: {report['threshold_rule']}",
        f"split by patient, seed {report['calibration']['split_seed']}: calibration "
        f"{cal['images']} images / {cal['patients']} patients ({cal['assessed']} assessed), "
        f"evaluation {ev['images']} images / {ev['patients']} patients ({ev['assessed']} assessed)",
        "",
        "evaluation half (took no part in the choice), each at its own threshold:",
        accept.format_report(report),
    ])
