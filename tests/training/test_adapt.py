"""`pneumo adapt` end to end on a few dozen images with the small MobileNetV2 weights."""

import csv
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from core import registry
from ops.send import wrap_image
from tests.conftest import SHARED, SMALL_MOBILENET, register_with_scope
from training import adapt, data, site

NIH = SHARED / "data" / "nih_site"


@pytest.fixture(scope="module")
def site_folder(tmp_path_factory) -> Path:
    """16 NIH images per class (links), two of them as DICOM files carrying the age and view."""
    folder = tmp_path_factory.mktemp("site")
    rows = list(csv.DictReader((NIH / "labels.csv").open()))
    chosen = [r for c in ("NORMAL", "PNEUMONIA") for r in [r for r in rows if r["label"] == c][::12][:16]]
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["file", "label", "patient_id", "age", "view"])
        writer.writeheader()
        for index, row in enumerate(chosen):
            name = Path(row["file"]).name
            entry = {"file": name, "label": row["label"], "patient_id": row["patient_id"],
                     "age": row["age"], "view": row["view"]}
            if index % 8 == 0:  # DICOM: age and view from the header, not labels.csv
                dataset = wrap_image(NIH / row["file"])
                dataset.PatientAge = f"{int(row['age']):03d}Y"
                dataset.ViewPosition = row["view"]
                name = f"{Path(name).stem}.dcm"
                dataset.save_as(folder / name, enforce_file_format=True)
                entry.update(file=name, age="", view="")
            else:
                (folder / name).symlink_to(NIH / row["file"])
            writer.writerow(entry)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_data: Path) -> Path:
    import keras

    from training import models

    folder = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(5)
    model = models.build_transfer("mobilenet_v2_0.35", str(SMALL_MOBILENET))
    card = {"data": {"root": str(tiny_data)},
            "hyper_parameters": {"validation_fraction": 0.15, "split_seed": 1337}}
    register_with_scope(model, "pneumonia-transfer", folder, "base", card=card, images=12)
    return folder


def test_site_weights_give_each_site_and_class_its_share() -> None:
    sites = np.array([0] * 90 + [1] * 10)
    labels = np.array([0] * 30 + [1] * 60 + [0] * 4 + [1] * 6)
    weights = adapt.site_weights(sites, labels)
    assert weights.mean() == pytest.approx(1.0)
    for site_id in (0, 1):
        for label in (0, 1):
            chosen = (sites == site_id) & (labels == label)
            assert weights[chosen].sum() == pytest.approx(25.0)


def test_mean_site_youden_balances_the_sites() -> None:
    labels = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    probabilities = np.array([0.1, 0.2, 0.8, 0.9, 0.5, 0.6, 0.7, 0.75])
    sites = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    threshold = adapt.mean_site_youden(labels, probabilities, sites)
    assert 0.6 < threshold <= 0.7  # both sites perfectly separated only between 0.6 and 0.7


def test_site_split_is_by_patient(site_folder: Path) -> None:
    images = site.read_site(site_folder)
    rest, held = data.patient_split(images, 0.25, 1337)
    assert {i.patient_id for i in rest}.isdisjoint({i.patient_id for i in held})
    assert {i.label for i in held} == {0, 1} and len(rest) + len(held) == len(images) == 32


def test_adapt_registers_a_version_for_both_sites(base: Path, site_folder: Path) -> None:
    from ops.cli import app
    from serving.image import preprocess
    from worker.inference import Classifier

    result = CliRunner().invoke(app, [
        "adapt", "--model", "pneumonia-transfer", "--site", "test-site", "--data", str(site_folder),
        "--epochs", "1", "--models-dir", str(base)])
    assert result.exit_code == 0, result.output
    assert "(not served)" in result.output
    assert registry.served_versions(base) == {"pneumonia-transfer": "base"}
    new = [v for v in registry.list_versions(base) if v.version != "base"]
    assert len(new) == 1
    card = new[0].card
    assert card.parent == "pneumonia-transfer@base"
    assert card.adapted_to.name == "test-site"
    assert card.adapted_to.fingerprint == site.fingerprint(site.read_site(site_folder))
    by_site = card.metrics.validation_by_site
    assert set(by_site) == {"guangzhou-kermany", "test-site"} and by_site["test-site"].n >= 6
    assert card.threshold_rule == adapt.THRESHOLD_RULE
    use = card.scope.intended_use
    ages = [int(r["age"]) for r in csv.DictReader((site_folder / "labels.csv").open()) if r["age"]]
    assert use.views == ["AP", "PA"] and use.age_years[0] == 1
    assert use.age_years[1] >= max(ages)
    assert {"guangzhou-kermany/NORMAL", "test-site/PNEUMONIA"} <= set(card.scope.pixel_check.groups)

    served = Classifier(new[0].label, base)  # the refitted pixel check loads, its hash matches
    rng = np.random.default_rng(1)
    assert served.predict(preprocess(rng.random((256, 256)))).scope_score > served.scope_threshold
    assert served.intended_use == use


def test_adapt_says_what_is_wrong_with_the_site_folder(base: Path, tmp_path: Path) -> None:
    from ops.cli import app

    (tmp_path / "labels.csv").write_text("file,label\nmissing.png,NORMAL\n")
    result = CliRunner().invoke(app, ["adapt", "--model", "pneumonia-transfer", "--site", "x",
                                      "--data", str(tmp_path), "--models-dir", str(base)])
    assert result.exit_code == 2 and "missing.png does not exist" in result.output
