"""The heat map and the picture (issue 20 item 1).

The map (serving.saliency): the head read from the served model reproduces its probability, the
Grad-CAM gradient is the head's true gradient, and the map passes Adebayo et al.'s (2018) model
randomisation check: on the served version, the maps of randomised weights (the dense head alone;
every weight) are unlike the trained model's (mean Spearman rank correlation below 0.5, where the
trained model against itself gives 1). The picture (worker.picture): colour where the map is
high, none where it is zero, the words burned in, a Secondary Capture in its own series of the
image's study, with the attributes highdicom's `SCImage` gave it; drawn from the grey image kept
at classify time, without decoding the original again; written beside the SR and referenced by
it; turned off by the setting.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest
from highdicom.sc import SCImage
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from scipy.stats import spearmanr

from ops.send import wrap_image
from serving import models, saliency
from serving.decode import grayscale_pixels
from serving.image import preprocess
from tests.conftest import DATA, REPO
from tests.helpers import requires_program
from tests.worker.test_sr_purpose import KNOWN_WARNINGS
from worker import picture
from worker.report import MANUFACTURER, ImageFinding, algorithm_equipment

SERVED = "pneumonia-transfer@20261207T171404Z"
IMAGES = sorted((DATA / "test" / "PNEUMONIA").iterdir())[:8]
RANDOMISED_RHO_BOUND = 0.5  # measured: 0.03 (all weights), 0.11 (head only) over 8 images
VERSION = picture.Version("pneumonia-transfer", "20261207T171404Z", 0.184, "ab" * 32)


@pytest.fixture(scope="module")
def served():
    model, _ = models.load_version(SERVED, REPO / "models")
    inputs = np.stack([preprocess(grayscale_pixels(wrap_image(path))) for path in IMAGES])
    return model, inputs


def _maps(model: keras.Model, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scoring, _ = models.with_features(model, ("block_5_add",))
    with_map, head = saliency.with_map(scoring)
    probabilities, _, conv = with_map.predict_on_batch(inputs)
    return np.asarray(probabilities).reshape(-1), saliency.grad_cam(conv, head)


def _mean_rho(first: np.ndarray, second: np.ndarray) -> float:
    """Mean Spearman correlation of paired maps; a constant map (all zero: nothing raised the
    logit) shares no ranking with any other, so counts 0."""
    assert all(np.ptp(a) > 0 for a in first)  # the reference maps have structure
    return float(np.mean([spearmanr(a.ravel(), b.ravel()).statistic if np.ptp(b) > 0 else 0.0
                          for a, b in zip(first, second, strict=True)]))


def test_the_head_read_from_the_model_gives_its_probability(served) -> None:
    model, inputs = served
    scoring, _ = models.with_features(model, ("block_5_add",))
    conv_map, head = saliency.pooled_map(scoring)
    assert tuple(conv_map.shape[1:]) == (7, 7, 1280) and len(head.dense) == 1  # GAP -> one unit: CAM
    extended, _ = saliency.with_map(scoring)
    probabilities, _, conv = extended.predict_on_batch(inputs)
    logits = head.logit(np.asarray(conv).mean(axis=(1, 2)))
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), np.asarray(probabilities).ravel(), atol=1e-5)


def test_the_gradient_is_the_heads_gradient() -> None:
    """A two-layer ReLU head (as pneumonia-cnn's): the analytic gradient against central
    differences of the head's own logit."""
    rng = np.random.default_rng(3)
    head = saliency.Head(((rng.normal(size=(6, 4)), rng.normal(size=4), "relu"),
                          (rng.normal(size=(4, 1)), rng.normal(size=1), "sigmoid")))
    pooled = rng.normal(size=(3, 6))
    step = 1e-6
    numeric = np.stack([(head.logit(pooled + step * np.eye(6)[k]) - head.logit(pooled - step * np.eye(6)[k]))
                        / (2 * step) for k in range(6)], axis=1)
    np.testing.assert_allclose(head.logit_gradient(pooled), numeric, atol=1e-5)


def test_the_map_fails_when_the_weights_are_randomised(served) -> None:
    """Adebayo et al. 2018, model parameter randomisation: a map that survives random weights
    shows the image, not what the model learned."""
    model, inputs = served
    _, trained = _maps(model, inputs)
    assert _mean_rho(trained, _maps(model, inputs)[1]) > 0.99
    keras.utils.set_random_seed(7)
    every_weight = keras.models.clone_model(model)  # fresh initialisation of every layer
    assert _mean_rho(trained, _maps(every_weight, inputs)[1]) < RANDOMISED_RHO_BOUND
    head_only = keras.models.clone_model(model)
    head_only.set_weights(model.get_weights())
    dense = head_only.get_layer("pneumonia_probability")
    kernel, bias = dense.get_weights()
    dense.set_weights([np.random.default_rng(7).normal(0, kernel.std(), kernel.shape).astype(kernel.dtype),
                       bias])
    assert _mean_rho(trained, _maps(head_only, inputs)[1]) < RANDOMISED_RHO_BOUND


def _coloured(rgb: np.ndarray) -> np.ndarray:
    """Pixels whose channels differ: only the map colours a grey image."""
    spread = rgb.max(axis=2).astype(int) - rgb.min(axis=2).astype(int)
    return spread > 40


def test_the_picture_colours_where_the_map_is_high_and_burns_the_words_in() -> None:
    dataset = wrap_image(IMAGES[0])
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[4:6, 1:3] = 1.0  # lower left
    lines = picture.picture_lines(VERSION, 0.8, True, None)
    assert picture.LABEL in lines and picture.LABEL == "not for diagnosis; heat map is not localisation"
    rgb = picture.render(dataset, cam, lines)
    height, width, _ = rgb.shape
    assert max(height, width) >= picture.MIN_SIDE
    coloured = _coloured(rgb)
    band = height // 5  # the text band at the top (yellow first line is coloured too)
    below = coloured[band:]
    rows, cols = np.nonzero(below)
    assert below.mean() > 0.02
    assert rows.mean() + band > height / 2 and cols.mean() < width / 2  # where the map is
    assert not coloured[band:, int(width * 0.75):].any()  # nothing where it is zero
    plain = picture.render(dataset, None, lines)
    assert not _coloured(plain)[band:].any()
    # The words: another text changes the band, not the image below it.
    other = picture.render(dataset, cam, picture.picture_lines(VERSION, 0.3, False, None))
    assert (other[:band] != rgb[:band]).any() and (other[height // 2:] == rgb[height // 2:]).all()
    unlabelled = picture.render(dataset, cam, lines[:2])
    assert (unlabelled[:band] != rgb[:band]).any()


def test_a_refused_image_gets_a_not_assessed_picture() -> None:
    lines = picture.picture_lines(VERSION, None, None, "outside the intended use (adult)")
    assert lines[0] == "not assessed: outside the intended use (adult)"
    rgb = picture.render(None, None, lines)  # even when the image does not decode
    assert rgb.shape[2] == 3 and (rgb[:40] > 0).any()


@requires_program("dciodvfy", "dicom3tools")
def test_the_picture_is_a_secondary_capture_in_the_images_study(tmp_path: Path) -> None:
    source = wrap_image(IMAGES[0])
    source.save_as(tmp_path / "image.dcm", enforce_file_format=True)
    cam = np.eye(7, dtype=np.float32)
    picture.keep_map(tmp_path / "image.dcm", VERSION.name, VERSION.version, cam)
    np.testing.assert_allclose(picture.load_map(tmp_path / "image.dcm", VERSION.name, VERSION.version),
                               cam, atol=1e-3)
    header = dcmread(tmp_path / "image.dcm", stop_before_pixels=True)
    made, failed = picture.write_pictures([(tmp_path / "image.dcm", ImageFinding(header, 0.8, True))],
                                          VERSION, tmp_path / "out")
    assert failed == 0
    reference = made[str(source.SOPInstanceUID)]
    stored = dcmread(tmp_path / "out" / f"{reference.SOPInstanceUID}.dcm")
    assert stored.SOPClassUID == SecondaryCaptureImageStorage
    assert stored.StudyInstanceUID == source.StudyInstanceUID
    assert stored.SeriesInstanceUID not in (source.SeriesInstanceUID, "")
    assert stored.BurnedInAnnotation == "YES" and stored.PhotometricInterpretation == "RGB"
    assert stored.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    (equipment,) = [e for e in stored.ContributingEquipmentSequence if "DeviceUID" in e]
    assert (equipment.ManufacturerModelName, equipment.SoftwareVersions) == (VERSION.name, VERSION.version)
    assert _coloured(stored.pixel_array).mean() > 0.02
    verify = subprocess.run(["dciodvfy", str(tmp_path / "out" / f"{reference.SOPInstanceUID}.dcm")],
                            capture_output=True, text=True, errors="replace")
    assert not [line for line in verify.stderr.splitlines() if line.startswith(("Error", "Warning"))
                and not any(known in line for known in KNOWN_WARNINGS)], verify.stderr
    again, _ = picture.write_pictures([(tmp_path / "image.dcm", ImageFinding(header, 0.8, True))],
                                      VERSION, tmp_path / "again")
    assert again[str(source.SOPInstanceUID)].SOPInstanceUID == reference.SOPInstanceUID  # replaces


def _with_highdicom(header, rgb: np.ndarray, number: int):
    """The picture as highdicom's `SCImage` built it before (the reference for the direct build)."""
    series_uid, instance_uid = picture.picture_uids(str(header.StudyInstanceUID), str(header.SOPInstanceUID),
                                                    VERSION.name, VERSION.version)
    built = SCImage.from_ref_dataset(
        ref_dataset=header, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid,
        series_number=picture.PICTURE_SERIES_NUMBER, sop_instance_uid=instance_uid, instance_number=number,
        manufacturer=MANUFACTURER, patient_orientation=tuple(header.PatientOrientation),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[algorithm_equipment(VERSION.name, VERSION.version, VERSION.sha256)],
        series_description="AI pneumonia heat map (not for diagnosis)")
    built.BodyPartExamined, built.BurnedInAnnotation = "CHEST", "YES"
    built.ImageType = ["DERIVED", "SECONDARY"]
    built.DerivationDescription = f"Grad-CAM heat map and result of {VERSION.name} {VERSION.version}"
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
    built.SourceImageSequence = [source]
    return built


def test_the_direct_build_has_highdicoms_attributes(tmp_path: Path) -> None:
    """Built with pydicom (highdicom's per-instance checks cost as much as the drawing), the
    picture keeps every attribute and value highdicom gave it; only the times and the library
    that made it differ."""
    source = wrap_image(IMAGES[0])
    source.InstitutionName, source.StationName = "Site", "DX1"  # copied into the acquisition item
    source.save_as(tmp_path / "image.dcm", enforce_file_format=True)
    header = dcmread(tmp_path / "image.dcm", stop_before_pixels=True)
    rgb = picture.render(source, np.eye(7, dtype=np.float32), picture.picture_lines(VERSION, 0.8, True, None))
    picture.build_picture(header, rgb, VERSION, 3).save_as(tmp_path / "direct.dcm", enforce_file_format=True)
    _with_highdicom(header, rgb, 3).save_as(tmp_path / "reference.dcm", enforce_file_format=True)
    direct, reference = dcmread(tmp_path / "direct.dcm"), dcmread(tmp_path / "reference.dcm")
    timed = {"InstanceCreationTime", "ContentTime", "TimeOfSecondaryCapture"}
    assert {e.keyword for e in direct} == {e.keyword for e in reference}
    for element in reference:
        if element.keyword not in timed | {"ContributingEquipmentSequence"}:
            assert direct[element.tag] == element, element.keyword
    *ours, library = direct.ContributingEquipmentSequence
    *theirs, _ = reference.ContributingEquipmentSequence
    assert ours == list(theirs) and len(ours) == 2 and ours[0].InstitutionName == "Site"
    assert library.ManufacturerModelName == "pydicom"
    assert direct.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert direct.file_meta.MediaStorageSOPInstanceUID == direct.SOPInstanceUID


def test_the_picture_is_drawn_from_the_grey_kept_at_classify_time(tmp_path: Path) -> None:
    """The classify path keeps a small grey copy of what it decoded: the picture is the same as
    one drawn from the original, and is made when the original can no longer be read."""
    source = wrap_image(IMAGES[1])
    stored = tmp_path / "image.dcm"
    source.save_as(stored, enforce_file_format=True)
    cam = np.eye(7, dtype=np.float32)
    picture.keep_map(stored, VERSION.name, VERSION.version, cam, grayscale_pixels(source))
    grey = picture.load_grey(stored)
    assert grey is not None and grey.dtype == np.uint8
    assert picture.MIN_SIDE <= max(grey.shape) <= picture.MAX_SIDE
    assert picture.grey_path(stored) in picture.kept_maps(stored)  # removed with the image
    lines = picture.picture_lines(VERSION, 0.8, True, None)
    np.testing.assert_array_equal(picture.render(None, cam, lines, grey), picture.render(source, cam, lines))
    header = dcmread(stored, stop_before_pixels=True)
    stored.write_bytes(b"not DICOM any more")  # the picture must not need it
    made, failed = picture.write_pictures([(stored, ImageFinding(header, 0.8, True))], VERSION,
                                          tmp_path / "out")
    assert failed == 0
    shown = dcmread(tmp_path / "out" / f"{made[str(source.SOPInstanceUID)].SOPInstanceUID}.dcm").pixel_array
    np.testing.assert_array_equal(shown, picture.render(source, cam, lines))
    picture.grey_path(stored).write_bytes(b"half a file")  # unreadable: the original is decoded instead
    assert picture.load_grey(stored) is None
