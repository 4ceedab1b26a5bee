"""The picture a reader sees in the viewer: each reported image with the model's heat map and its
answer burned in, as a DICOM Secondary Capture in its own series of the same study.

Why Secondary Capture (RGB): every PACS viewer shows one, and the words "not
for diagnosis; heat map is not localisation" travel in the pixels, so no viewer can show the map
without them. A Pseudo-colour Softcopy Presentation State would keep the original untouched but
few viewers apply one (and a Grayscale one cannot colour the map); a Parametric Map (float pixels,
enhanced multi-frame) is stored by storescp and Orthanc alike but most viewers do not display it,
and neither can carry the label in what is displayed. A refused image gets a picture too, saying
"not assessed: <reason>".

The map itself (serving.saliency, Grad-CAM) is computed with the prediction and kept beside the
stored image (`keep_map`, a few hundred bytes), with the picture's grey image (uint8, 384-768 px
on its longer side, ~0.2 MB) made from the pixels the classify path has already decoded: the
delivery worker never loads the model nor decodes the original again. The dataset is built with
pydicom (the attributes highdicom's `SCImage` gave it, without its per-instance checks, which
cost about as much as drawing): docs/benchmarks.md, "Pictures".
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from serving.decode import grayscale_pixels
from worker.report import MANUFACTURER, ImageFinding, algorithm_equipment

log = logging.getLogger(__name__)

PICTURE_SERIES_NUMBER = 991
# The picture's longer side: legible words and map (the original is beside it in the viewer),
# at most 1.2 MB uncompressed; 1,024 doubled the drawing's cost (docs/benchmarks.md, "Pictures").
# A larger image is averaged in whole blocks, so its picture is between MAX_SIDE / 2 and MAX_SIDE.
MAX_SIDE = 768
# Below this an image is enlarged: from here the words (14 px) fit one line each.
MIN_SIDE = 448
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


def grey_path(image_path: Path) -> Path:
    """Where the picture's grey image is kept: beside the stored image (one for every version)."""
    return image_path.with_name(f"{image_path.name}.picture-grey.npy")


def _save(target: Path, array: np.ndarray) -> None:
    """Written whole, then renamed: a reader never sees half a file."""
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as file:
            np.save(file, array)
        os.replace(partial, target)
    except OSError as error:
        log.warning("%s not kept: %s", "heat map" if target.name.endswith(".cam.npy") else "picture grey",
                    type(error).__name__)
        partial.unlink(missing_ok=True)


def keep_map(image_path: Path, model_name: str, model_version: str, cam: np.ndarray | None,
             pixels: np.ndarray | None = None) -> None:
    """Keep a prediction's map (None: none) and, given the decoded `pixels`, the picture's grey
    image beside the image. What cannot be written (disk full) is logged, never fails the
    classification: the picture is then drawn without the map, or from the original."""
    if cam is not None:
        _save(map_path(image_path, model_name, model_version), np.asarray(cam, dtype=np.float16))
    if pixels is not None:
        try:
            grey = _greyscale(pixels)
        except Exception as error:  # the picture decodes the original instead
            log.warning("picture grey not kept: %s", type(error).__name__)
            return
        _save(grey_path(image_path), grey)


def kept_maps(image_path: Path) -> list[Path]:
    """Every version's map and the picture's grey image kept beside an image (removed with it
    by `pneumo retention`)."""
    grey = grey_path(image_path)
    return sorted([*image_path.parent.glob(f"{glob.escape(image_path.name)}.*.cam.npy"),
                   *([grey] if grey.exists() else [])])


def load_map(image_path: Path, model_name: str, model_version: str) -> np.ndarray | None:
    path = map_path(image_path, model_name, model_version)
    return np.load(path).astype(np.float32) if path.exists() else None


def load_grey(image_path: Path) -> np.ndarray | None:
    """The kept grey image, or None (none kept, or unreadable: the original is decoded instead)."""
    try:
        grey = np.load(grey_path(image_path))
    except (OSError, ValueError):
        return None
    return grey if grey.dtype == np.uint8 and grey.ndim == 2 else None


def picture_uids(study_uid: str, sop_uid: str, model_name: str, model_version: str) -> tuple[str, str]:
    """(series, instance) UIDs of an image's picture: the same for every build, so a re-sent
    picture replaces the earlier one at the PACS."""
    return (generate_uid(entropy_srcs=[study_uid, model_name, model_version, "picture series"]),
            generate_uid(entropy_srcs=[sop_uid, model_name, model_version, "picture"]))


def _greyscale(pixels: np.ndarray) -> np.ndarray:
    """uint8 grey, MIN_SIDE to MAX_SIDE on its longer side, p0.5-p99.5 stretched (as the model
    sees it; the percentiles from every 4th pixel each way, enough for a display window).
    A large image is averaged in whole blocks of source pixels (a third of a resampling pass's
    cost, in the classify path): its picture is between MIN_SIDE and MAX_SIDE, not always MAX_SIDE."""
    values = np.asarray(pixels, dtype=np.float32)
    if (factor := -(-max(values.shape) // MAX_SIDE)) > 1:
        # Rows summed by numpy (whole rows at a time), columns averaged by Pillow: Pillow copies a
        # quarter of the image or less, not all of it (8 -> 5 ms at 2,500 x 3,000 px). The sums'
        # scale goes in the stretch below; the last rows that do not fill a block are left out.
        rows = values.shape[0] // factor
        values = values[:rows * factor].reshape(rows, factor, -1).sum(axis=1)
    image = Image.fromarray(values, mode="F")
    if factor > 1:
        image = image.reduce((factor, 1))
    values = np.asarray(image)
    low, high = np.percentile(values[::4, ::4], (0.5, 99.5))
    stretched = (values - low) * np.float32(255 / max(high - low, 1e-6))
    grey = Image.fromarray(np.clip(stretched, 0, 255, out=stretched).astype(np.uint8), mode="L")
    longer = max(grey.size)  # resized in 8 bits: a quarter of the cost in floats
    if longer < MIN_SIDE:
        scale = MIN_SIDE / longer
        grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))),
                           Image.Resampling.BILINEAR)
    return np.asarray(grey)


def _jet_palette() -> bytes:
    """256 colours for map values 0-255: blue (low) through green and yellow to red."""
    values = np.linspace(0, 1, 256)
    channels = [np.clip(1.5 - np.abs(4 * values - offset), 0, 1) for offset in (3, 2, 1)]
    return (np.stack(channels, axis=-1) * 255).round().astype(np.uint8).tobytes()


_PALETTE = _jet_palette()


_WEIGHTS = [round(value * MAP_OPACITY) for value in range(256)]


def overlay(grey: np.ndarray, cam: np.ndarray) -> Image.Image:
    """RGB: the grey image with the map, upsampled smoothly to its size, blended in by its value
    (MAP_OPACITY at the peak, nothing where it is 0). Drawn by Pillow in 8 bits: a picture
    costs a few milliseconds, not the tens that float arithmetic over its pixels took."""
    height, width = grey.shape
    levels = Image.fromarray((np.clip(cam, 0, 1) * 255).round().astype(np.uint8), mode="L")
    # Bicubic to an eighth of the size, then bilinear: the same smooth map (within 6 of 255)
    # for a sixth less than one bicubic pass over every pixel.
    levels = levels.resize((max(1, width // 8), max(1, height // 8)), Image.Resampling.BICUBIC)
    levels = levels.resize((width, height), Image.Resampling.BILINEAR)
    colour = Image.frombytes("P", levels.size, levels.tobytes())
    colour.putpalette(_PALETTE)
    image = Image.fromarray(grey, mode="L").convert("RGB")
    image.paste(colour.convert("RGB"), (0, 0), levels.point(_WEIGHTS))
    return image


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=64)
def _line_mask(text: str, size: int) -> Image.Image:
    """One line's rendered glyphs (the version and the label repeat on every picture: drawn once)."""
    font = _font(size)
    mask = Image.new("L", (max(1, int(font.getlength(text)) + 2), size + 6))
    ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=font)
    return mask


def burn_in(image: Image.Image, lines: list[str]) -> np.ndarray:
    """The text on a dark band across the top, sized to the picture, wrapped to its width."""
    size = max(14, image.width // 48)
    per_line = max(20, int(image.width / (0.55 * size)))
    wrapped = [part for line in lines for part in textwrap.wrap(line, per_line) or [""]]
    band = (size + 6) * len(wrapped) + 8
    image.paste((0, 0, 0), (0, 0, image.width, min(band + 1, image.height)))
    for index, line in enumerate(wrapped):
        image.paste((255, 255, 0) if index == 0 else (255, 255, 255), (6, 4 + index * (size + 6)),
                    _line_mask(line, size))
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


def render(dataset: Dataset | None, cam: np.ndarray | None, lines: list[str],
           grey: np.ndarray | None = None) -> np.ndarray:
    """The picture's RGB pixels: the image (`grey` when kept, else `dataset` decoded; a blank one
    when it cannot be), its map when given, the lines burned in."""
    try:
        # JPEG and JPEG 2000 decode at a reduced scale that still fills the picture (serving.reduced).
        if grey is None and dataset is not None:
            grey = _greyscale(grayscale_pixels(dataset, MAX_SIDE * 3 // 4))
    except Exception:  # a refused image may not decode: the words still say why
        grey = None
    if grey is None:
        grey = np.zeros((MAX_SIDE * 3 // 4, MAX_SIDE), dtype=np.uint8)
    rgb = overlay(grey, cam) if cam is not None else Image.fromarray(grey, mode="L").convert("RGB")
    return burn_in(rgb, lines)


@functools.lru_cache(maxsize=16)
def _copied_tags(sop_class_uid: str) -> frozenset[int]:
    """The root attributes of the source IOD's Patient and Study modules: what highdicom's
    `from_ref_dataset` copies into a derived instance (its own tables, read once per class)."""
    modules = get_iod_module_map()[get_sop_class_iod_map()[sop_class_uid]]
    attributes = get_module_attribute_map()
    keywords = {str(item["keyword"]) for module in modules if module["ie"] in ("Patient", "Study")
                for item in attributes[module["key"]] if not item["path"]}
    return frozenset(tag for keyword in keywords if (tag := tag_for_keyword(keyword)) is not None)


@functools.lru_cache(maxsize=1)
def _constant_elements() -> dict:
    """The elements every picture has alike, made (and validated) once: a third of the cost of
    building the dataset element by element."""
    constant = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                    "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName"):
        setattr(constant, keyword, None)  # type 2: present, empty unless the image has them
    constant.SOPClassUID, constant.SeriesNumber, constant.Modality = (
        SecondaryCaptureImageStorage, PICTURE_SERIES_NUMBER, "OT")
    constant.SeriesDescription = "AI pneumonia heat map (not for diagnosis)"
    constant.Manufacturer, constant.ConversionType = MANUFACTURER, "DI"
    # What every reported image is (the served versions' intended use): unpaired, so no
    # Laterality (type 2C) unless the image has one.
    constant.BodyPartExamined = "CHEST"
    constant.ImageType, constant.BurnedInAnnotation = ["DERIVED", "SECONDARY"], "YES"
    constant.SamplesPerPixel, constant.PhotometricInterpretation, constant.PlanarConfiguration = 3, "RGB", 0
    constant.BitsAllocated, constant.BitsStored, constant.HighBit, constant.PixelRepresentation = 8, 8, 7, 0
    return dict(constant.items())


@functools.lru_cache(maxsize=16)
def _equipment(name: str, version: str, sha256: str | None) -> Dataset:
    return algorithm_equipment(name, version, sha256)


def _equipment_item(code: Code, description: str, **values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    item.ContributionDescription = description
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = (
        code.value, code.scheme_designator, code.meaning)
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


_ACQUISITION = ("Manufacturer", "InstitutionName", "InstitutionAddress", "StationName",
                "InstitutionalDepartmentName", "ManufacturerModelName", "DeviceSerialNumber",
                "SoftwareVersions")


def _acquisition_equipment(header: Dataset) -> list[Dataset]:
    """The source's acquisition equipment, as highdicom's `for_image_acquisition` names it
    (none without a manufacturer); built directly: its IOD lookup cost more than the picture."""
    if not header.get("Manufacturer"):
        return []
    values: dict[str, object] = {keyword: header[keyword].value for keyword in _ACQUISITION
                                 if header.get(keyword) not in (None, "")}
    if header.get("AcquisitionDateTime"):
        values["ContributionDateTime"] = header.AcquisitionDateTime
    return [_equipment_item(codes.DCM.AcquisitionEquipment,
                            "Acquisition equipment of the source image(s)", **values)]


@functools.lru_cache(maxsize=1)
def _library() -> Dataset:
    return _equipment_item(codes.DCM.ProcessingEquipment, "Software library used to create this instance",
                           Manufacturer="pydicom contributors", ManufacturerModelName="pydicom",
                           SoftwareVersions=pydicom.__version__)


def build_picture(header: Dataset, rgb: np.ndarray, version: Version, number: int) -> Dataset:
    """The Secondary Capture of `rgb` in the image's study (`header`: the image's header as the SR
    copies it), its own series per study and version, naming the version (AIR) and the image.
    The attributes highdicom's `SCImage.from_ref_dataset` set (tested against it), built directly."""
    series_uid, instance_uid = picture_uids(str(header.StudyInstanceUID), str(header.SOPInstanceUID),
                                            version.name, version.version)
    now = datetime.now()
    picture = Dataset(dict(_constant_elements()))  # elements shared, never changed in place
    picture.file_meta = FileMetaDataset()
    picture.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    picture.file_meta.MediaStorageSOPInstanceUID = instance_uid
    picture.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    picture.preamble = b"\0" * 128
    for tag in _copied_tags(str(header.SOPClassUID)) & header.keys():
        picture[tag] = header[tag]
    picture.StudyInstanceUID, picture.SOPInstanceUID = header.StudyInstanceUID, instance_uid
    picture.SeriesInstanceUID, picture.InstanceNumber = series_uid, number
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    picture.InstanceCreationDate = picture.ContentDate = picture.DateOfSecondaryCapture = date
    picture.InstanceCreationTime = picture.ContentTime = picture.TimeOfSecondaryCapture = time
    picture.ContributingEquipmentSequence = [
        *_acquisition_equipment(header), _equipment(version.name, version.version, version.sha256),
        _library()]
    orientation = [str(v) for v in header.get("PatientOrientation") or []]
    known = len(orientation) == 2 and all(v in _ORIENTATIONS for v in orientation)
    picture.PatientOrientation = orientation if known else None  # type 2: unknown stays empty
    laterality = str(header.get("Laterality") or "")
    if laterality in ("R", "L"):  # unpaired (the chest) unless the image says which side
        picture.Laterality = laterality
    picture.DerivationDescription = f"Grad-CAM heat map and result of {version.name} {version.version}"
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    picture.SourceImageSequence = [source]
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    picture.Rows, picture.Columns = rgb.shape[:2]
    picture.PixelData = rgb.tobytes()  # even length: 3 x rows x columns, padded by the writer if odd
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
            grey = load_grey(path)  # kept at classify time; else the original, decoded again
            dataset = None if grey is not None else dcmread(path, defer_size=1 << 20)
            cam = None if finding.not_assessed else load_map(path, version.name, version.version)
            lines = picture_lines(version, finding.probability, finding.present, finding.not_assessed)
            picture = build_picture(finding.source, render(dataset, cam, lines, grey), version, number)
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
