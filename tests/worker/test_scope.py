"""Scope: header rules from the card's intended use, the pixel check, out_of_scope and its SR."""

import re
from pathlib import Path

import numpy as np
import pytest
from highdicom.sr import srread
from PIL import Image
from pydicom import dcmread
from sqlalchemy import select

from core import registry, scope
from core.db import Instance, InstanceState, Result
from core.settings import Settings
from ops.send import wrap_image
from tests.conftest import DATA, REAL_DICOM, register_with_scope
from tests.worker.test_worker import store
from training import models
from worker import classify, filters, housekeeping
from worker import delivery as sr_delivery
from worker.inference import Classifier

KERMANY_USE = scope.intended_use([scope.KERMANY_SITE])
UNDETERMINED, ABSENT, PRESENT = "373068000", "272519000", "52101004"


@pytest.mark.parametrize(("age", "born", "seen", "years"), [
    ("005Y", None, None, 5.0),
    ("018M", None, None, 1.5),
    ("003W", None, None, 21 / 365.25),
    ("010D", None, None, 10 / 365.25),
    ("81", None, None, 81.0),  # a bare number, as some senders write it: years
    ("", "19570101", "20040831", (47 * 365.25 + 243) / 365.25),
    ("", "01/02/1970", "20040831", None),  # not a DICOM date: unknown, not guessed
    ("", "d14a028c2a3a2bc9476102bb288234c415a2b01f828ea62ac5b3e42f", "20040831", None),
    ("", "20100101", "20050101", None),  # seen before born
    ("5 years", None, None, None),
    (None, None, None, None),
])
def test_age_from_patients_age_else_birth_date(age, born, seen, years) -> None:
    found = scope.age_in_years(age, born, seen)
    assert found == (pytest.approx(years, abs=0.01) if years is not None else None)


@pytest.mark.parametrize(("age", "view", "expected"), [
    (3.0, "AP", None),
    (1.5, None, None),
    (None, None, None),  # nothing in the header says otherwise: the pixel check decides
    (45.0, "AP", "patient age above the validated range 1-5 years"),
    (0.5, None, "patient age below the validated range 1-5 years"),
    (5.9, None, None),  # five years old until the sixth birthday
    (6.0, None, "patient age above"),
    (3.0, "PA", "view PA not among the validated views AP"),
])
def test_header_reason_against_the_kermany_card(age, view, expected) -> None:
    reason = scope.header_reason(KERMANY_USE, age, view)
    if expected is None:
        assert reason is None
    else:
        assert reason.startswith("out of scope: ") and expected in reason
        assert "45" not in reason  # the age itself is patient data: never in a reason or a log


def test_intended_use_of_two_sites_is_their_union() -> None:
    site = {"name": "nih", "population": "adults", "views": ["AP", "PA"], "age_years": [18, 83]}
    use = scope.intended_use([scope.KERMANY_SITE, site])
    assert use["views"] == ["AP", "PA"] and use["age_years"] == [1, 83]
    assert scope.intended_use([scope.KERMANY_SITE, {**site, "age_years": None}])["age_years"] is None


def _header(**values):
    dataset = dcmread(REAL_DICOM / "fuji_cr_chest_mono1_explicit.dcm", stop_before_pixels=True)
    for keyword in ("BodyPartExamined", "ViewPosition", *filters.DESCRIPTIONS):
        if keyword in dataset:
            delattr(dataset, keyword)
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    return dataset


@pytest.mark.parametrize(("values", "expected"), [
    ({"SeriesDescription": "TEETH"}, "not a chest image: SeriesDescription names TEETH"),
    ({"StudyDescription": "XR C-SPINE 2 VIEWS"}, "not a chest image: StudyDescription names SPINE"),
    ({"ProtocolName": "Panoramic"}, "not a chest image: ProtocolName names PANORAMIC"),
    ({"SeriesDescription": "CHEST PA"}, None),
    ({"SeriesDescription": "Chest and abdomen"}, None),  # names the chest too: pixels decide
    ({}, None),  # nothing says: no longer read as chest, the pixel check decides
])
def test_a_description_naming_another_body_part_is_evidence(values, expected) -> None:
    assert filters.ignore_reason(_header(**values)) == expected


# --- the served model's pixel check ---------------------------------------------------------------

@pytest.fixture(scope="module")
def served() -> Classifier:
    """The served transfer model and its committed pixel check, as the workers load them."""
    return Classifier("pneumonia-transfer", registry.DEFAULT_MODELS_DIR)


def synthetic_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:512, 0:512]
    return {
        "noise": rng.random((512, 512)),
        "gradient": x / 511.0,
        "rings": np.sin(np.hypot(x - 256, y - 256) / 9.0),
    }


def test_served_pixel_check_refuses_synthetic_images_and_passes_test_images(served) -> None:
    from serving.image import preprocess, preprocess_file

    for name, image in synthetic_images().items():
        prediction = served.predict(preprocess(image))
        assert prediction.scope_score > served.scope_threshold, name
    test_files = [p for c in ("NORMAL", "PNEUMONIA") for p in sorted((DATA / "test" / c).iterdir())[::40]]
    scores = [served.predict(preprocess_file(p)).scope_score for p in test_files]
    assert len(scores) >= 10 and max(scores) <= served.scope_threshold


def test_served_model_refuses_what_it_was_not_validated_on(served, sessions, tmp_path: Path) -> None:
    """Through the worker: a dog's thorax passes the header filters (THORAX, age 5) and is refused
    by the pixel check; an adult's film by its birth date; an adult PA film by its view."""
    expected = {
        "canine_dx_thorax.dcm": "pixel check score",
        "dx_16bit_j2k_flipped.dcm": "patient age above the validated range 1-5 years",
        "fuji_cr_chest_mono1_explicit.dcm": "view PA not among the validated views AP",
    }
    for name, reason in expected.items():
        instance_id = store(REAL_DICOM / name, sessions, tmp_path)
        assert classify.classify_instance(sessions, instance_id, lambda: served) == InstanceState.OUT_OF_SCOPE
        with sessions() as session:
            instance = session.get(Instance, instance_id)
            assert reason in instance.reason and served.version.label in instance.reason
            assert (instance.scope_model_name, instance.scope_model_version) == (
                "pneumonia-transfer", served.version.version)
            assert session.scalars(select(Result).where(Result.instance_id == instance_id)).all() == []


def _png(tmp_path: Path, name: str, image: np.ndarray) -> Path:
    path = tmp_path / f"{name}.png"
    scaled = (image - image.min()) / (np.ptp(image) or 1)
    Image.fromarray((scaled * 255).astype(np.uint8)).save(path)
    return path


def _study_sr(sessions, tmp_path: Path, classifier, paths: list[Path]):
    first = wrap_image(paths[0])
    states = []
    for path in paths:
        dataset = wrap_image(path, first)
        dataset.ViewPosition = "AP"
        instance_id = store(dataset, sessions, tmp_path)
        states.append(classify.classify_instance(sessions, instance_id, classifier))
    queued: list[int] = []
    housekeeping.finalise_stable_studies(sessions, Settings(home=tmp_path / "home", quiet_seconds=0),
                                     queued.append)
    assert len(queued) == 1  # one SR for the study, whatever was refused
    return states, srread(sr_delivery.write_sr(sessions, queued[0], tmp_path / "sr"))


def _evaluations(report) -> list[tuple[str, str | None]]:
    found = []
    for group in report.content.get_image_measurement_groups():
        value = group.get_qualitative_evaluations()[0].value.value
        comments = [item.TextValue for item in group[0].ContentSequence
                    if item.ConceptNameCodeSequence[0].CodeValue == "121106"]
        found.append((value, comments[0] if comments else None))
    return found


def test_a_refused_image_is_reported_not_assessed(served, sessions, tmp_path: Path) -> None:
    chest = sorted((DATA / "test" / "PNEUMONIA").iterdir())[5]
    noise = _png(tmp_path, "noise", synthetic_images()["noise"])
    states, report = _study_sr(sessions, tmp_path, lambda: served, [chest, noise])
    assert states == [InstanceState.CLASSIFIED, InstanceState.OUT_OF_SCOPE]
    (first, first_comment), (second, comment) = _evaluations(report)
    assert first in (PRESENT, ABSENT) and first_comment is None
    assert second == UNDETERMINED  # never Absent for what was not assessed
    assert comment.startswith("not assessed: out of scope: image unlike those pneumonia-transfer@")


def test_a_study_of_refused_images_still_gets_its_sr(served, sessions, tmp_path: Path) -> None:
    images = synthetic_images()
    paths = [_png(tmp_path, name, images[name]) for name in ("gradient", "rings")]
    states, report = _study_sr(sessions, tmp_path, lambda: served, paths)
    assert states == [InstanceState.OUT_OF_SCOPE] * 2
    assert [value for value, _ in _evaluations(report)] == [UNDETERMINED] * 2


# --- fitting and keeping the detector -------------------------------------------------------------

def test_detector_refit_is_reproducible_and_its_hash_is_checked(tmp_path: Path) -> None:
    import keras

    keras.utils.set_random_seed(3)
    model = models.build_cnn(filters=(4, 8, 8), dense_units=4)
    first = register_with_scope(model, "pneumonia-transfer", tmp_path / "a", "v1", images=12)
    second = register_with_scope(model, "pneumonia-transfer", tmp_path / "b", "v1", images=12)
    assert first.card.scope.detector_sha256 == second.card.scope.detector_sha256
    assert first.card.scope.pixel_check.groups == ["kermany/NORMAL", "kermany/PNEUMONIA"]
    Classifier("pneumonia-transfer", tmp_path / "a")  # loads: hash matches

    detector_file = first.path / "scope.npz"
    detector_file.chmod(0o644)
    detector_file.write_bytes(detector_file.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(registry.RegistryError, match="changed after it was fitted"):
        Classifier("pneumonia-transfer", tmp_path / "a")
    detector_file.unlink()
    with pytest.raises(registry.RegistryError, match="no pixel check"):
        Classifier("pneumonia-transfer", tmp_path / "a")


def test_a_version_without_a_pixel_check_is_not_served(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ops.cli import app

    registry.register("pneumonia-cnn", models.build_cnn(filters=(4,)), {"threshold": 0.5}, tmp_path,
                      version="old")
    with pytest.raises(registry.RegistryError, match="no pixel check"):
        Classifier("pneumonia-cnn@old", tmp_path)
    result = CliRunner().invoke(app, ["models", "serve", "pneumonia-cnn", "old", "--models-dir",
                                      str(tmp_path)])
    assert result.exit_code == 2 and "pneumo scope fit" in result.output


def test_both_served_versions_carry_a_scope() -> None:
    for name, version in registry.served_versions().items():
        found = registry.resolve(f"{name}@{version}")
        assert found.scope.intended_use.age_years == [1, 5], found.label
        assert found.scope.pixel_check.held_out_refused_rate <= 0.02, found.label
        assert (found.path / found.scope.detector_file).exists()


def test_refusals_are_counted_by_rule_on_metrics_and_status(served, database_url, sessions,
                                                            tmp_path: Path) -> None:
    from ops import metrics, monitoring, status

    for name in ("canine_dx_thorax.dcm", "dx_16bit_j2k_flipped.dcm", "cr_hip_jpeg_lossless.dcm"):
        classify.classify_instance(sessions, store(REAL_DICOM / name, sessions, tmp_path), lambda: served)
    with sessions() as session:
        counts = monitoring.not_classified_by_reason(session)
    assert counts == {("out_of_scope", "out of scope (pixel check)"): 1,
                      ("out_of_scope", "out of scope (patient age)"): 1,
                      ("ignored", "not a chest image"): 1}
    text = metrics.exposition(lambda: monitoring.Snapshot(failures_by_reason=counts)).decode()
    assert ('pneumo_instance_failures_total{reason="out of scope (pixel check)",state="out_of_scope"} 1.0'
            in text)
    settings = Settings(home=tmp_path / "home", database_url=database_url,
                        broker_url="redis://127.0.0.1:1/0")  # no broker: status still answers
    shown = status.render(settings)
    assert re.search(r"out_of_scope +1  out of scope \(patient age\)", shown), shown
