"""Which instances are classified; everything else is `ignored` with a reason a person can read."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
RADIOGRAPH_CLASSES = {CR, DX_PRESENTATION, DX_PROCESSING}
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "CHEST_LAT", ""}  # absent counts as chest
FRONTAL_VIEWS = {"PA", "AP", ""}  # absent counts as frontal
MAX_PIXELS = 8192 * 8192


def ignore_reason(dataset: Dataset) -> str | None:
    """None when the instance should be classified, else why it is ignored."""
    sop_class = str(dataset.get("SOPClassUID", ""))
    modality = str(dataset.get("Modality", "") or "").upper()
    if sop_class == SECONDARY_CAPTURE:
        if modality not in {"CR", "DX"}:
            return f"secondary capture with modality {modality or 'absent'}"
    elif sop_class not in RADIOGRAPH_CLASSES:
        name = UID(sop_class).name if sop_class else "absent"
        return f"SOP class {name} is not a radiograph"
    body_part = str(dataset.get("BodyPartExamined", "") or "").strip().upper()
    if body_part not in CHEST_BODY_PARTS:
        return f"body part {body_part}"
    view = str(dataset.get("ViewPosition", "") or "").strip().upper()
    if view not in FRONTAL_VIEWS:
        return "lateral view" if view in {"LL", "RL", "LAT", "LATERAL"} else f"view {view}"
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame image ({frames} frames)"
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    photometric = str(dataset.get("PhotometricInterpretation", "") or "")
    if samples != 1 or photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        return f"not a grayscale image ({photometric or 'no photometric interpretation'})"
    return None


def failure_reason(dataset: Dataset) -> str | None:
    """Problems that make a would-be chest radiograph unclassifiable: terminal `failed`."""
    if "PixelData" not in dataset:
        return "no pixel data"
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    if rows < 32 or columns < 32:
        return f"image too small to classify ({columns}x{rows} pixels)"
    if rows * columns > MAX_PIXELS:
        return f"image too large ({columns}x{rows} pixels; limit {MAX_PIXELS} pixels)"
    return None
