"""The picture a reader sees in the viewer: each reported image with the model's heat map and its
answer burned in, as a DICOM Secondary Capture in its own series of the same study.

Why Secondary Capture (highdicom `SCImage`, RGB): every PACS viewer shows one, and the words "not
for diagnosis; heat map is not localisation" travel in the pixels, so no viewer can show the map
without them. A Pseudo-colour Softcopy Presentation State would keep the original untouched but
few viewers apply one (and a Grayscale one cannot colour the map); a Parametric Map (float pixels,
enhanced multi-frame) is stored by storescp and Orthanc alike but most viewers do not display it,
and neither can carry the label in what is displayed. A refused image gets a picture too, saying
"not assessed: <reason>".

The map itself (serving.saliency, Grad-CAM) is computed with the prediction and kept beside the
stored image (`keep_map`, a few hundred bytes); drawing needs only numpy and Pillow, so the
delivery worker never loads the model.
"""

from __future__ import annotations

import glob
import logging
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from serving.decode import grayscale_pixels
from worker.report import MANUFACTURER, ImageFinding, algorithm_equipment

log = logging.getLogger(__name__)

PICTURE_SERIES_NUMBER = 991
# The picture's longer side: legible words and map (the original is beside it in the viewer),
# 1.2 MB uncompressed; 1,024 doubled the drawing's cost (docs/benchmarks.md, "Pictures").
MAX_SIDE = 768
MIN_SIDE = 512  # a smaller image is enlarged so that the words stay legible
LABEL = "not for diagnosis; heat map is not localisation"
MAP_OPACITY = 0.5  # at the map's peak; where the map is 0 the image shows unchanged
_ORIENTATIONS = set("APLRHF")


@dataclass(frozen=True)
class Version:
    """The model version a picture speaks for."""

    name: str
    version: str
    threshold: float
    sha256: str | None = None


def map_path(image_path: Path, model_name: str, model_version: str) -> Path:
    """Where an image's heat map from one version is kept: beside the stored image."""
    return image_path.with_name(f"{image_path.name}.{model_name}@{model_version}.cam.npy")


def keep_map(image_path: Path, model_name: str, model_version: str, cam: np.ndarray | None) -> None:
    """Keep a prediction's map beside the image (written whole, then renamed); None: nothing.
    A map that cannot be written (disk full) is logged, never fails the classification: the
    picture is then drawn without it."""
    if cam is None:
        return
    target = map_path(image_path, model_name, model_version)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as file:
            np.save(file, np.asarray(cam, dtype=np.float16))
        os.replace(partial, target)
    except OSError as error:
        log.warning("heat map not kept: %s", type(error).__name__)
        partial.unlink(missing_ok=True)


def kept_maps(image_path: Path) -> list[Path]:
    """Every version's map kept beside an image (removed with it by `pneumo retention`)."""
    return sorted(image_path.parent.glob(f"{glob.escape(image_path.name)}.*.cam.npy"))


def load_map(image_path: Path, model_name: str, model_version: str) -> np.ndarray | None:
    path = map_path(image_path, model_name, model_version)
    return np.load(path).astype(np.float32) if path.exists() else None


def picture_uids(study_uid: str, sop_uid: str, model_name: str, model_version: str) -> tuple[str, str]:
    """(series, instance) UIDs of an image's picture: the same for every build, so a re-sent
    picture replaces the earlier one at the PACS."""
    return (generate_uid(entropy_srcs=[study_uid, model_name, model_version, "picture series"]),
            generate_uid(entropy_srcs=[sop_uid, model_name, model_version, "picture"]))


def _greyscale(pixels: np.ndarray) -> np.ndarray:
    """uint8 grey, MIN_SIDE to MAX_SIDE on its longer side, p0.5-p99.5 stretched (as the model
    sees it; the percentiles from every 4th pixel each way, enough for a display window)."""
    image = Image.fromarray(np.asarray(pixels, dtype=np.float32), mode="F")
    longer = max(image.size)
    scale = MAX_SIDE / longer if longer > MAX_SIDE else MIN_SIDE / longer if longer < MIN_SIDE else 1
    if scale < 0.5:  # whole source pixels averaged in blocks first: a quarter of a BOX resize's cost
        image = image.reduce(int(1 / scale))
        scale = MAX_SIDE / max(image.size)
    if scale != 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC)
    values = np.asarray(image)
    low, high = np.percentile(values[::4, ::4], (0.5, 99.5))
    stretched = (values - low) * np.float32(255 / max(high - low, 1e-6))
    return np.clip(stretched, 0, 255, out=stretched).astype(np.uint8)


def _jet_palette() -> bytes:
    """256 colours for map values 0-255: blue (low) through green and yellow to red."""
    values = np.linspace(0, 1, 256)
    channels = [np.clip(1.5 - np.abs(4 * values - offset), 0, 1) for offset in (3, 2, 1)]
    return (np.stack(channels, axis=-1) * 255).round().astype(np.uint8).tobytes()


_PALETTE = _jet_palette()


def overlay(grey: np.ndarray, cam: np.ndarray) -> Image.Image:
    """RGB: the grey image with the map, upsampled smoothly to its size, blended in by its value
    (MAP_OPACITY at the peak, nothing where it is 0). Drawn by Pillow in 8 bits: a picture
    costs a few milliseconds, not the tens that float arithmetic over its pixels took."""
    height, width = grey.shape
    levels = Image.fromarray((np.clip(cam, 0, 1) * 255).round().astype(np.uint8), mode="L")
    levels = levels.resize((width, height), Image.Resampling.BICUBIC)
    colour = Image.frombytes("P", levels.size, levels.tobytes())
    colour.putpalette(_PALETTE)
    weight = levels.point(lambda value: round(value * MAP_OPACITY))
    base = Image.fromarray(grey, mode="L").convert("RGB")
    return Image.composite(colour.convert("RGB"), base, weight)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def burn_in(image: Image.Image, lines: list[str]) -> np.ndarray:
    """The text on a dark band across the top, sized to the picture, wrapped to its width."""
    size = max(14, image.width // 48)
    font = _font(size)
    per_line = max(20, int(image.width / (0.55 * size)))
    wrapped = [part for line in lines for part in textwrap.wrap(line, per_line) or [""]]
    band = (size + 6) * len(wrapped) + 8
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, image.width, band), fill=(0, 0, 0))
    for index, line in enumerate(wrapped):
        draw.text((6, 4 + index * (size + 6)), line, fill=(255, 255, 0) if index == 0 else (255, 255, 255),
                  font=font)
    return np.asarray(image)


def picture_lines(version: Version, probability: float | None, present: bool | None,
                  not_assessed: str | None) -> list[str]:
    """The words burned in: the answer (or why there is none), the version, the label."""
    if not_assessed:
        answer = f"not assessed: {not_assessed}"
    else:
        answer = (f"AI pneumonia {'PRESENT' if present else 'absent'}: probability {probability:.3f}, "
                  f"threshold {version.threshold:.3f}")
    return [answer, f"{version.name} {version.version}", LABEL]


def render(dataset: Dataset | None, cam: np.ndarray | None, lines: list[str]) -> np.ndarray:
    """The picture's RGB pixels: the image (a blank one when it cannot be decoded), its map when
    given, the lines burned in."""
    try:
        # JPEG and JPEG 2000 decode at a reduced scale that still fills the picture (serving.reduced).
        grey = _greyscale(grayscale_pixels(dataset, MAX_SIDE * 3 // 4)) if dataset is not None else None
    except Exception:  # a refused image may not decode: the words still say why
        grey = None
    if grey is None:
        grey = np.zeros((MAX_SIDE * 3 // 4, MAX_SIDE), dtype=np.uint8)
    rgb = overlay(grey, cam) if cam is not None else Image.fromarray(grey, mode="L").convert("RGB")
    return burn_in(rgb, lines)


def build_picture(header: Dataset, rgb: np.ndarray, version: Version, number: int) -> SCImage:
    """The Secondary Capture of `rgb` in the image's study (`header`: the image's header as the SR
    copies it), its own series per study and version, naming the version (AIR) and the image."""
    series_uid, instance_uid = picture_uids(str(header.StudyInstanceUID), str(header.SOPInstanceUID),
                                            version.name, version.version)
    orientation = [str(v) for v in header.get("PatientOrientation") or []]
    known = len(orientation) == 2 and all(v in _ORIENTATIONS for v in orientation)
    picture = SCImage.from_ref_dataset(
        ref_dataset=header, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid,
        series_number=PICTURE_SERIES_NUMBER, sop_instance_uid=instance_uid, instance_number=number,
        manufacturer=MANUFACTURER, patient_orientation=tuple(orientation) if known else ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[algorithm_equipment(version.name, version.version, version.sha256)],
        series_description="AI pneumonia heat map (not for diagnosis)",
    )
    if not known:
        picture.PatientOrientation = None  # type 2: unknown stays empty, never guessed
    # What every reported image is (the served versions' intended use): unpaired, so no
    # Laterality (type 2C) unless the image has one.
    picture.BodyPartExamined = "CHEST"
    laterality = str(header.get("Laterality") or "")
    if laterality in ("R", "L"):
        picture.Laterality = laterality
    picture.ImageType = ["DERIVED", "SECONDARY"]
    picture.BurnedInAnnotation = "YES"
    picture.DerivationDescription = f"Grad-CAM heat map and result of {version.name} {version.version}"
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    picture.SourceImageSequence = [source]
    return picture


def write_pictures(
    images: Sequence[tuple[Path, ImageFinding]], version: Version, folder: Path
) -> tuple[dict[str, Dataset], int]:
    """Each image's picture (`images`: stored file and finding, headers made fit for the SR)
    written to `folder` as <SOP Instance UID>.dcm. Returns what the SR references (the picture's
    UIDs by the image's SOP Instance UID) and how many could not be made: a picture that fails
    is left out, never the SR."""
    folder.mkdir(parents=True, exist_ok=True)
    made, failed = {}, 0
    for number, (path, finding) in enumerate(images, start=1):
        try:
            dataset = dcmread(path, defer_size=1 << 20)  # the pixel data is read when drawn
            cam = None if finding.not_assessed else load_map(path, version.name, version.version)
            lines = picture_lines(version, finding.probability, finding.present, finding.not_assessed)
            picture = build_picture(finding.source, render(dataset, cam, lines), version, number)
            picture.save_as(folder / f"{picture.SOPInstanceUID}.dcm", enforce_file_format=True)
        except Exception as error:  # the SR goes without this picture; the cause is logged
            log.warning("picture %d of %s not made: %s", number, version.version, type(error).__name__)
            failed += 1
            continue
        reference = Dataset()
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            setattr(reference, keyword, picture[keyword].value)
        made[str(finding.source.SOPInstanceUID)] = reference
    return made, failed


def referenced_pictures(sr_path: Path) -> list[Path]:
    """The pictures an SR references that are kept beside it, to be sent before it."""
    sr = dcmread(sr_path, stop_before_pixels=True)
    return [path for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
            for series in study.get("ReferencedSeriesSequence", [])
            for sop in series.get("ReferencedSOPSequence", [])
            if sop.ReferencedSOPClassUID == SecondaryCaptureImageStorage
            and (path := sr_path.with_name(f"{sop.ReferencedSOPInstanceUID}.dcm")).exists()]
