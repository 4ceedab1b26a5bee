"""`pneumo accept`: a site's labelled studies through a version's scope, pixel check and threshold."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from typer.testing import CliRunner

from core import registry
from ops.cli import app
from ops.send import wrap_image
from serving import pixelcheck
from serving.image import preprocess_many
from tests.conftest import DATA, REAL_DICOM, SMALL_MOBILENET
from training import accept, data
from training.scope import fit_detector, kermany_site, scope_card

NAME = "pneumonia-transfer"
AGE_ABOVE = "out of scope: patient age above the validated range 1-5 years"
VIEW_PA = "out of scope: view PA not among the validated views AP"
PIXEL_KIND = f"out of scope: image unlike those {NAME}@base was validated on"


def spread(split: str, class_name: str, count: int, skip: int = 0) -> list[Path]:
    files = sorted((DATA / split / class_name).iterdir())
    return files[skip:: max(1, len(files) // count)][:count]


def build_registry(folder: Path) -> Path:
    """`pneumonia-transfer@base` (served): small MobileNetV2, untrained head, Kermany pixel check
    fitted on 40 train images with its threshold on 20 others; `@low`: same, threshold 0.3."""
    import keras

    from training import models

    keras.utils.set_random_seed(1)
    model = models.build_transfer("mobilenet_v2_0.35", str(SMALL_MOBILENET))
    fit = [*spread("train", "NORMAL", 20), *spread("train", "PNEUMONIA", 20)]
    held = [*spread("train", "NORMAL", 10, skip=3), *spread("train", "PNEUMONIA", 10, skip=3)]
    groups = np.array([f"kermany/{p.parent.name}" for p in fit])
    detector, summary = fit_detector(model, preprocess_many(fit), groups, preprocess_many(held))
    stash = folder / ".detector"
    stash.mkdir(parents=True)
    card = {"threshold": 0.5, "threshold_rule": "Youden's J on the validation split",
            "data": {"root": str(DATA)}, "scope": scope_card(summary, [kermany_site(len(fit))])}
    for version, threshold in (("base", 0.5), ("low", 0.3)):
        registry.register(NAME, model, {**card, "threshold": threshold}, folder, version=version,
                          detector_file=pixelcheck.save(detector, stash))
    return folder


def noise_png(path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path)
    return path


def write_labels(folder: Path, rows: list[dict[str, str]]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def jpeg_site(folder: Path) -> Path:
    """24 in-scope test images (ages 1-5, AP), 3 outside the age range, 1 PA, 1 noise image."""
    folder.mkdir(parents=True)
    rows = []

    def add(source: Path, label: str, age: str, view: str) -> None:
        (folder / source.name).symlink_to(source)
        rows.append({"file": source.name, "label": label, "age": age, "view": view,
                     "patient_id": data.patient_id_from_name(source.name, label)})

    for class_name in ("NORMAL", "PNEUMONIA"):
        for index, path in enumerate(spread("test", class_name, 12)):
            add(path, class_name, str(1 + index % 5), "AP")
    extra = spread("test", "NORMAL", 3, skip=5) + spread("test", "PNEUMONIA", 1, skip=5)
    for path, label, age, view in zip(extra, ["NORMAL", "NORMAL", "NORMAL", "PNEUMONIA"],
                                      ["45", "12", "3", "70"], ["AP", "AP", "PA", "AP"], strict=True):
        add(path, label, age, view)
    noise_png(folder / "noise.png")
    rows.append({"file": "noise.png", "label": "NORMAL", "age": "3", "view": "AP",
                 "patient_id": "noise"})
    write_labels(folder, rows)
    return folder


def dicom_site(folder: Path) -> Path:
    """6 Kermany test images wrapped as DX AP with Patient's Age 3, one adult by Patient's Age,
    one adult by Birth Date against Study Date (no Patient's Age), and the real hip CR."""
    folder.mkdir(parents=True)
    rows = []
    sources = [(p, "NORMAL") for p in spread("test", "NORMAL", 4, skip=7)] + \
              [(p, "PNEUMONIA") for p in spread("test", "PNEUMONIA", 4, skip=7)]
    for index, (source, label) in enumerate(sources):
        dataset = wrap_image(source)
        dataset.ViewPosition = "AP"
        if index in (0, 4):
            dataset.PatientAge = "045Y" if index == 0 else ""
            if index == 4:
                dataset.PatientBirthDate, dataset.StudyDate = "19900101", "20250601"
        else:
            dataset.PatientAge = "003Y"
        name = f"image{index}.dcm"
        dataset.save_as(folder / name, enforce_file_format=True)
        rows.append({"file": name, "label": label, "patient_id": f"p{index}"})
    (folder / "hip.dcm").symlink_to(REAL_DICOM / "cr_hip_jpeg_lossless.dcm")
    rows.append({"file": "hip.dcm", "label": "NORMAL", "patient_id": "hip"})
    write_labels(folder, rows)
    return folder


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_registry(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return jpeg_site(tmp_path_factory.mktemp("site") / "hospital-a")


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def in_unit(value: float) -> bool:
    return 0.0 <= value <= 1.0


def test_accept_counts_refusals_and_reports_metrics_per_view_and_age_band(
    models_dir: Path, jpeg_folder: Path, tmp_path: Path
) -> None:
    code, out, err = run_cli("accept", "--model", NAME, "--data", str(jpeg_folder), "--models-dir",
                             str(models_dir), "--out", str(tmp_path / "plots"), "--json",
                             "--resamples", "200")
    assert code == 0, err
    report = json.loads(out)
    assert report["n"] == 29 and report["site_fingerprint"]
    [version] = report["versions"]
    assert version["model"] == f"{NAME}@base" and version["threshold"] == 0.5

    by_file = {image["file"]: image for image in version["images"]}
    assert by_file["noise.png"]["reason"].startswith(PIXEL_KIND)
    assert by_file["noise.png"]["probability"] is None
    assert "pixel check score" in by_file["noise.png"]["reason"]
    refusals = version["refusals"]
    assert refusals[AGE_ABOVE] == 3  # 45, 12 and 70 years
    assert refusals[VIEW_PA] == 1
    assert refusals[PIXEL_KIND] >= 1
    assert sum(refusals.values()) == version["refused"] == 29 - version["assessed"]
    assert version["refused_rate"] == pytest.approx(version["refused"] / 29)
    assessed = [i for i in version["images"] if i["reason"] is None]
    assert len(assessed) == version["assessed"] >= 12  # most in-scope test images pass
    assert all(in_unit(i["probability"]) and i["pixel_score"] is not None for i in assessed)

    for key in ("roc_auc", "accuracy", "sensitivity", "specificity"):
        assert in_unit(version[key]), key
        low, high = version["ci95"][key]
        assert 0.0 <= low <= version[key] <= high <= 1.0, key
    matrix = version["confusion_matrix"]
    assert sum(matrix.values()) == version["assessed"]
    assert version["accuracy"] == pytest.approx((matrix["tp"] + matrix["tn"]) / version["assessed"])

    bands = version["by_age_band"]
    assert set(bands) == {"0-5", "6-17", "40-64", "65+"}
    assert bands["0-5"]["n"] == 26 and bands["0-5"]["assessed"] == version["assessed"]
    for band in ("6-17", "40-64", "65+"):
        assert bands[band]["n"] == bands[band]["refused"] == 1
        assert bands[band]["refusals"] == {AGE_ABOVE: 1} and bands[band]["roc_auc"] is None
    views = version["by_view"]
    assert set(views) == {"AP", "PA"}
    assert views["PA"]["refusals"] == {VIEW_PA: 1}
    assert views["AP"]["n"] == 28 and in_unit(views["AP"]["roc_auc"])

    assert [Path(p).name for p in version["plots"]] == [
        f"{NAME}_base_roc.png", f"{NAME}_base_reliability.png"]
    for plot in version["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accept_puts_versions_side_by_side_in_a_table(
    models_dir: Path, jpeg_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default plots folder is ./accept-<site folder>
    code, out, err = run_cli("accept", "--model", f"{NAME}@base", "--model", f"{NAME}@low",
                             "--data", str(jpeg_folder), "--models-dir", str(models_dir),
                             "--resamples", "100")
    assert code == 0, err
    header = next(line for line in out.splitlines() if f"{NAME}@base" in line and "@low" in line)
    assert header.index("@base") < header.index("@low")
    assert re.search(r"\nthreshold\s+0\.500\s+0\.300\s*\n", out)
    for row in ("all images", "view AP", "view PA", "age 0-5", "age 65+", "roc_auc", "accuracy",
                "sensitivity", "specificity", "refused"):
        assert row in out, row
    assert f"{AGE_ABOVE}" in out and "Wilson" in out and "bootstrap over patients" in out
    plots = sorted(p.name for p in (tmp_path / "accept-hospital-a").iterdir())
    assert plots == sorted(f"{NAME}_{v}_{kind}.png" for v in ("base", "low")
                           for kind in ("roc", "reliability"))


def test_accept_reads_dicom_through_the_workers_filters_and_header_ages(
    models_dir: Path, tmp_path: Path
) -> None:
    folder = dicom_site(tmp_path / "dicom-site")
    assert dcmread(folder / "image4.dcm").get("PatientAge") == ""
    report = accept.accept([NAME], folder, models_dir, tmp_path / "plots", _decoder(),
                           resamples=50)
    [version] = report["versions"]
    by_file = {image["file"]: image for image in version["images"]}
    assert by_file["hip.dcm"]["reason"] == "not a chest image: body part HIP"
    assert by_file["image0.dcm"]["reason"] == AGE_ABOVE  # Patient's Age 045Y
    assert by_file["image4.dcm"]["reason"] == AGE_ABOVE  # born 1990, studied 2025
    assert version["refusals"]["not a chest image: body part HIP"] == 1
    assert version["refusals"][AGE_ABOVE] == 2
    assert version["n"] == 9 and version["refused"] >= 3
    others = [by_file[f"image{i}.dcm"] for i in (1, 2, 3, 5, 6, 7)]
    assert sum(o["reason"] is None for o in others) >= 4  # in-scope children pass
    assert all(in_unit(o["probability"]) for o in others if o["reason"] is None)
    # Ages and views come from the headers: the bands say where the refusals fall.
    assert version["by_age_band"]["0-5"]["n"] == 6
    assert version["by_age_band"]["18-39"]["refusals"] == {AGE_ABOVE: 1}
    assert version["by_age_band"]["40-64"]["refusals"] == {AGE_ABOVE: 1}
    assert version["by_age_band"]["unknown"]["n"] == 1  # the hip: no age in its header
    assert set(version["by_view"]) >= {"AP"}
    json.dumps(report, allow_nan=False)  # plain JSON: no NaN anywhere


def test_accept_says_what_is_wrong_with_a_folder(models_dir: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("accept", "--model", NAME, "--data", str(tmp_path),
                           "--models-dir", str(models_dir))
    assert code == 2 and "neither labels.csv" in err
    code, _, err = run_cli("accept", "--model", f"{NAME}@nope", "--data", str(tmp_path),
                           "--models-dir", str(models_dir))
    assert code == 2 and "no model" in err


def test_patient_bootstrap_interval_is_wider_when_images_repeat_a_patient() -> None:
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], 40)
    patients = [str(i // 10) for i in range(80)]  # 8 patients of 10 films each
    patient_effect = np.repeat(rng.normal(0, 0.8, 8), 10)  # a patient's films look alike
    scores = labels + patient_effect + rng.normal(0, 0.2, labels.size)
    single = accept.auc_interval(labels, scores, [str(i) for i in range(80)], resamples=400)
    grouped = accept.auc_interval(labels, scores, patients, resamples=400)
    assert single[0] < accept._fast_auc(labels, scores) < single[1]
    assert grouped[1] - grouped[0] > 1.5 * (single[1] - single[0])  # images as if independent
    from sklearn.metrics import roc_auc_score
    assert accept._fast_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def _decoder():
    from worker.scope import decode_site_file

    return decode_site_file


def test_refusals_are_counted_by_kind_and_ages_fall_in_bands() -> None:
    corrupt = ("pixel data could not be decoded (JPEG 2000 Image Compression (Lossless Only)): "
               "Unable to decode as exceptions were raised by all available plugins:\n  pylibjpeg: x")
    assert accept.reason_kind(corrupt) == (
        "pixel data could not be decoded: Unable to decode as exceptions were raised by all "
        "available plugins")
    assert accept.reason_kind(f"{PIXEL_KIND} (pixel check score 3416.0 > threshold 394.3)") == PIXEL_KIND
    assert accept.reason_kind("not a frontal view: lateral view (ViewPosition LL)") == (
        "not a frontal view: lateral view")
    assert [accept.age_band(a) for a in (None, 0.4, 5.9, 6, 17.99, 18, 39, 40, 64.5, 65, 101)] == [
        "unknown", "0-5", "0-5", "6-17", "6-17", "18-39", "18-39", "40-64", "40-64", "65+", "65+"]


def test_the_served_version_is_assessed_with_its_own_pixel_check_layers() -> None:
    """A refitted pixel check scores other layers than the default (the served transfer
    version's has four): accept scores each image as the worker does, not a broadcast error."""
    from tests.conftest import REPO
    from training.site import SiteImage, assess, load
    from worker.inference import Classifier

    models_dir = REPO / "models"
    images = [SiteImage(path, label, f"p{i}") for i, (path, label) in enumerate(
        [(p, 1) for p in spread("train", "PNEUMONIA", 3)] + [(p, 0) for p in spread("train", "NORMAL", 3)])]
    loaded = load(images)
    assessed = assess(NAME, loaded, models_dir)
    worker = Classifier(NAME, models_dir)
    expected = [worker.predict(tensor).scope_score for tensor in loaded.tensors]
    np.testing.assert_allclose(assessed.scores, expected, rtol=1e-4, atol=1e-5)
