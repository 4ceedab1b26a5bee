"""`pneumo calibrate`: a site's own threshold, chosen on one half of its patients, as a new version."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from core import registry
from serving import models
from serving.image import preprocess_many
from tests.training.test_accept import NAME, build_registry, run_cli, spread, write_labels
from training import calibrate, data, metrics, site

SEED = 20261202


def site_folder(folder: Path) -> Path:
    """40 Kermany test images (20 per class), several patients with more than one image."""
    folder.mkdir(parents=True)
    rows = []
    for class_name in ("NORMAL", "PNEUMONIA"):
        for path in spread("test", class_name, 20, skip=1):
            (folder / path.name).symlink_to(path)
            rows.append({"file": path.name, "label": class_name, "age": "4", "view": "AP",
                         "patient_id": data.patient_id_from_name(path.name, class_name)})
    write_labels(folder, rows)
    return folder


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    models_dir = build_registry(tmp_path_factory.mktemp("models"))
    folder = site_folder(tmp_path_factory.mktemp("site") / "hospital-b")
    code, out, err = run_cli("calibrate", "--model", f"{NAME}@base", "--data", str(folder),
                             "--models-dir", str(models_dir), "--json", "--resamples", "100")
    assert code == 0, err
    return models_dir, folder, json.loads(out)


def test_calibrate_registers_the_same_weights_with_the_calibration_halfs_threshold(
    calibrated: tuple[Path, Path, dict]
) -> None:
    models_dir, folder, report = calibrated
    parent = registry.resolve(f"{NAME}@base", models_dir)
    new = registry.resolve(report["registered"], models_dir)
    assert new.name == NAME and new.version != "base"
    registry.verify(new)
    assert new.card.model_sha256 == parent.card.model_sha256
    assert registry.sha256_file(new.model_file) == registry.sha256_file(parent.model_file)
    scope = new.card.scope
    assert scope.detector_sha256 == parent.scope.detector_sha256
    assert registry.sha256_file(new.path / scope.detector_file) == scope.detector_sha256
    assert scope.intended_use == parent.scope.intended_use
    assert new.card.parent == parent.label and new.card.data == parent.card.data
    assert new.card.threshold_rule == calibrate.RULE
    assert new.card.created > (parent.card.created or "")  # its own, not the parent's
    assert registry.served_versions(models_dir) == {NAME: "base"}  # not served

    # The threshold, recomputed apart: the calibration half's images that the parent assesses,
    # scored by the parent's Keras model, Youden's J as metrics.choose_threshold applies it.
    images = site.read_site(folder)
    calibration, evaluation = data.patient_split(images, 0.5, SEED)
    parent_report = next(v for v in report["versions"] if v["model"] == parent.label)
    assert {i["file"] for i in parent_report["images"]} == {i.path.name for i in evaluation}
    assessment = site.assess(parent.label, site.load(images), models_dir)
    reasons = {i.path.name: r for i, r in zip(images, assessment.reasons, strict=True)}
    kept = [i for i in calibration if reasons[i.path.name] is None]
    model, _ = models.load_version(parent.label, models_dir)
    probabilities = np.asarray(model.predict(preprocess_many([i.path for i in kept]),
                                             verbose=0)).reshape(-1)
    expected = metrics.choose_threshold(np.array([i.label for i in kept]), probabilities)
    assert new.threshold == pytest.approx(expected, abs=1e-5)
    assert new.threshold != parent.threshold
    assert report["threshold"] == new.threshold


def test_calibrate_card_names_the_data_and_the_halves_share_no_patient(
    calibrated: tuple[Path, Path, dict]
) -> None:
    models_dir, folder, report = calibrated
    new = registry.resolve(report["registered"], models_dir)
    record = new.card.calibration
    images = site.read_site(folder)
    assert record["site_fingerprint"] == site.fingerprint(images)
    assert record["data"] == str(folder.resolve()) and record["split_seed"] == SEED
    calibration, evaluation = data.patient_split(images, 0.5, SEED)
    halves = record["halves"]
    assert halves["calibration"]["images"] == len(calibration)
    assert halves["evaluation"]["images"] == len(evaluation) == report["n"]
    assert halves["calibration"]["images"] + halves["evaluation"]["images"] == 40
    cal_patients = {i.patient_id for i in calibration}
    eval_patients = {i.patient_id for i in evaluation}
    assert not cal_patients & eval_patients
    assert (halves["calibration"]["patients"], halves["evaluation"]["patients"]) == (
        len(cal_patients), len(eval_patients))
    assert halves["calibration"]["normal"] > 0 and halves["calibration"]["pneumonia"] > 0
    for half in ("calibration", "evaluation"):
        measured = record["metrics"][half]
        assert measured["n"] == halves[half]["images"]
        assert 0 <= measured["accuracy"] <= 1 and 0 <= measured["roc_auc"] <= 1

    # The report covers the evaluation half only, both versions at their own thresholds.
    parent_row, new_row = report["versions"]
    assert (parent_row["model"], new_row["model"]) == (f"{NAME}@base", new.label)
    assert (parent_row["threshold"], new_row["threshold"]) == (0.5, new.threshold)
    for row in (parent_row, new_row):
        assert row["n"] == len(evaluation)
        assert {i["patient_id"] for i in row["images"]} == eval_patients
    assert new_row["accuracy"] == record["metrics"]["evaluation"]["accuracy"]
    assert new_row["roc_auc"] == parent_row["roc_auc"]  # same weights, same images
    assert [Path(p).parent for p in new_row["plots"]] == [new.path, new.path]
    assert all(Path(p).is_file() for p in new_row["plots"])


def test_calibrate_help_states_the_rule_and_a_bad_spec_is_a_clear_error(
    calibrated: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    code, out, _ = run_cli("calibrate", "--help")
    assert code == 0
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())
    assert calibrate.RULE in text
    assert "--split-seed" in text and "20261202" in text

    models_dir, folder, _ = calibrated
    code, _, err = run_cli("calibrate", "--model", f"{NAME}@missing", "--data", str(folder),
                           "--models-dir", str(models_dir))
    assert code == 2 and "no model" in err
    one_patient = tmp_path / "one"
    one_patient.mkdir()
    source = spread("test", "NORMAL", 1)[0]
    (one_patient / source.name).symlink_to(source)
    write_labels(one_patient, [{"file": source.name, "label": "NORMAL", "patient_id": "a"}])
    code, _, err = run_cli("calibrate", "--model", f"{NAME}@base", "--data", str(one_patient),
                           "--models-dir", str(models_dir))
    assert code == 2 and "error:" in err
