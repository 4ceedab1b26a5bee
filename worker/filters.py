"""Which instances are classified; everything else is `ignored` with a reason a person can read.

Both checks read only headers, so an image is refused before its pixel data is decoded: the DICOM
header, and for JPEG, JPEG-LS and JPEG 2000 the compressed frame's own header (its declared size).
Reasons start with a fixed class, then ': ' and the details (monitoring groups by the class).
"""

from __future__ import annotations

import io
import re

import openjpeg
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames, parse_basic_offsets, parse_fragments
from pydicom.multival import MultiValue
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    SecondaryCaptureImageStorage,
)

RADIOGRAPH_CLASSES = {ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                      DigitalXRayImageStorageForProcessing}
# Absent body part or view passes here; the served version's pixel check decides (worker.scope).
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "CHEST_LAT", ""}
FRONTAL_VIEWS = {"PA", "AP", ""}
# Words in a description or protocol that name another body part (after DICOM CID 4031), and
# words that name the chest: a description naming only another part is evidence enough.
_OTHER_BODY_PARTS = """
    SKULL HEAD BRAIN FACE FACIAL SINUS SINUSES ORBIT ORBITS NASAL TEETH TOOTH DENTAL JAW MANDIBLE
    MAXILLA PANORAMIC PANO OPG OPT ORTHOPANTOMOGRAM CEPHALOMETRIC CEPH SPINE CSPINE TSPINE LSPINE
    NECK CERVICAL LUMBAR SACRUM COCCYX PELVIS HIP HIPS FEMUR KNEE KNEES PATELLA TIBIA FIBULA LEG
    ANKLE FOOT FEET TOE TOES HEEL CALCANEUS SHOULDER HUMERUS ELBOW FOREARM RADIUS ULNA WRIST HAND
    HANDS FINGER FINGERS THUMB ABDOMEN ABDOMINAL KUB BREAST MAMMO MAMMOGRAPHY MAMMOGRAM SCAPULA
"""
OTHER_BODY_PART_WORDS = frozenset(_OTHER_BODY_PARTS.split())
CHEST_WORDS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "CXR", "PULMONARY"})
DESCRIPTIONS = ("StudyDescription", "SeriesDescription", "ProtocolName",
                "RequestedProcedureDescription", "PerformedProcedureStepDescription")
MIN_SIDE = 32
MAX_SIDE = 8192
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # decoding more would take gigabytes of worker memory
BITS_ALLOCATED = (8, 16, 32)
DECIMALS = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")


def _integer(dataset: Dataset, keyword: str, default: int | None = None) -> int | None:
    """The element as one integer; `default` when absent or empty, None when not a single number."""
    try:
        value = dataset.get(keyword)
        if value is None or value == "":
            return default
        return int(value)
    except (TypeError, ValueError):
        return None


def _decimals(dataset: Dataset, keyword: str) -> bool:
    """True when the element is absent, empty, or every value is a number."""
    try:
        value = dataset.get(keyword)
        if value is None or value == "":
            return True
        for item in value if isinstance(value, MultiValue) else [value]:
            float(item)
        return True
    except (TypeError, ValueError):
        return False


def ignore_reason(dataset: Dataset) -> str | None:
    """None when the instance should be classified, else why it is ignored."""
    sop_class = str(dataset.get("SOPClassUID", ""))
    modality = str(dataset.get("Modality", "") or "").upper()
    if sop_class == SecondaryCaptureImageStorage:
        if modality not in {"CR", "DX"}:
            return f"not a radiograph: secondary capture with modality {modality or 'absent'}"
    elif sop_class not in RADIOGRAPH_CLASSES:
        name = UID(sop_class).name if sop_class else "absent"
        return f"not a radiograph: SOP class {name} (Modality {modality or 'absent'})"
    body_part = str(dataset.get("BodyPartExamined", "") or "").strip().upper()
    if body_part not in CHEST_BODY_PARTS:
        return f"not a chest image: body part {body_part}"
    described = _described_other_part(dataset)
    if described:
        return f"not a chest image: {described}"
    view = str(dataset.get("ViewPosition", "") or "").strip().upper()
    if view not in FRONTAL_VIEWS:
        if view in {"LL", "RL", "LAT", "LATERAL"}:
            return f"not a frontal view: lateral view (ViewPosition {view})"
        return f"not a frontal view: ViewPosition {view}"
    frames = _integer(dataset, "NumberOfFrames", 1)
    if frames is not None and frames > 1:
        return f"not a single image: multi-frame image ({frames} frames)"
    samples = _integer(dataset, "SamplesPerPixel", 1)
    photometric = str(dataset.get("PhotometricInterpretation", "") or "")
    if (samples is not None and samples != 1) or photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        return (f"not a grayscale image: {photometric or 'no PhotometricInterpretation'}, "
                f"SamplesPerPixel {samples}")
    return None


def _described_other_part(dataset: Dataset) -> str | None:
    """'SeriesDescription names TEETH' when a description names another body part and no chest.

    Only our own vocabulary word is quoted: descriptions are free text and may hold anything.
    """
    for keyword in DESCRIPTIONS:
        words = set(re.split(r"[^A-Z0-9]+", str(dataset.get(keyword, "") or "").upper()))
        other = sorted(words & OTHER_BODY_PART_WORDS)
        if other and not words & CHEST_WORDS:
            return f"{keyword} names {other[0]}"
    return None


def failure_reason(dataset: Dataset) -> str | None:
    """Problems that make a would-be chest radiograph unclassifiable: terminal `failed`."""
    if "PixelData" not in dataset:
        return "no pixel data"
    empty = _pixel_data_empty(dataset)
    if empty:
        return f"no pixel data: {empty}"
    for keyword in ("NumberOfFrames", "SamplesPerPixel"):
        if _integer(dataset, keyword, 1) is None:
            return f"invalid image header: {keyword} is not a number"
    numbers = {}
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        numbers[keyword] = _integer(dataset, keyword)
        if numbers[keyword] is None:
            return f"invalid image header: {keyword} is missing or not a number"
    rows, columns, bits_allocated = numbers["Rows"], numbers["Columns"], numbers["BitsAllocated"]
    if rows < MIN_SIDE or columns < MIN_SIDE:
        return f"image too small: {columns}x{rows} pixels (minimum {MIN_SIDE}x{MIN_SIDE})"
    if rows * columns > MAX_PIXELS:
        return (f"image too large: declared {columns}x{rows} pixels exceeds the limit of {MAX_PIXELS} "
                f"pixels ({MAX_SIDE}x{MAX_SIDE})")
    if bits_allocated not in BITS_ALLOCATED:
        return f"invalid image header: BitsAllocated {bits_allocated} (expected 8, 16 or 32)"
    bits_stored = _integer(dataset, "BitsStored", bits_allocated)
    if bits_stored is None or not 1 <= bits_stored <= bits_allocated:
        return (f"invalid image header: BitsStored {bits_stored if bits_stored is not None else 'invalid'} "
                f"with BitsAllocated {bits_allocated}")
    for keyword in DECIMALS:
        if not _decimals(dataset, keyword):
            return f"invalid image header: {keyword} is not a number"
    declared = _codestream_size(dataset)
    if declared and declared != (rows, columns):
        return (f"compressed image does not match the header: its codestream declares "
                f"{declared[1]}x{declared[0]} pixels, the header {columns}x{rows}")
    return None


def _pixel_data_empty(dataset: Dataset) -> str | None:
    """How Pixel Data is empty, None when it is not: zero bytes, or encapsulated without a
    fragment. Read from the element as stored: a value over `defer_size` is not loaded (it is
    not empty either).

    Why: the decoder failed on these with "object of type 'NoneType' has no len()" or a list of
    every plugin's complaint, which told nobody that the image simply was not there.
    """
    element = dataset.get_item("PixelData", keep_deferred=True)
    raw = isinstance(element, RawDataElement)
    if (element.length == 0) if raw else element.is_empty:
        return "Pixel Data is empty (0 bytes)"
    if raw and element.length == 0xFFFFFFFF and isinstance(element.value, bytes):
        try:
            buffer = io.BytesIO(element.value)
            parse_basic_offsets(buffer)
            if parse_fragments(buffer)[0] == 0:
                return "encapsulated Pixel Data holds no fragment"
        except Exception:  # malformed: left to the decoder, which reports it in its own words
            return None
    return None


def _codestream_size(dataset: Dataset) -> tuple[int, int] | None:
    """(rows, columns) that a JPEG, JPEG-LS or JPEG 2000 first frame declares; None if not one.

    Why: decoders size their buffers from the codestream, not from the DICOM header checked above.
    A 661 KiB JPEG 2000 file whose codestream claims 40000x40000 took 9.2 GiB and 30 s to fail in
    the decoder; a JPEG claiming 60000x60000, 13.8 GiB and 71 s (`benchmarks/decoding.py`).
    """
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax not in (*JPEG2000TransferSyntaxes, *JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes):
        return None
    try:
        frames = _integer(dataset, "NumberOfFrames", 1)
        frame = next(generate_frames(dataset.PixelData, number_of_frames=frames))
        if syntax in JPEG2000TransferSyntaxes:
            declared = openjpeg.get_parameters(frame)  # reads the SIZ marker only
            return int(declared["rows"]), int(declared["columns"])
        # pydicom's own marker parser (the SOF segment); libjpeg.get_parameters decodes the image.
        declared = _get_jpg_parameters(frame)
        return int(declared["height"]), int(declared["width"])
    except Exception:  # unparsable: left to the decoder, which reports it in its own words
        return None
