"""What a DICOM header says about scope (age, view), and site files decoded as the worker does."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from core import scope
from training.preprocess import preprocess
from training.site import Decoded
from worker import filters
from worker.decode import DecodeError, grayscale_pixels

_DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


def header_age(dataset: Dataset) -> float | None:
    """Patient's Age, else Birth Date against the first date the study carries."""
    seen = next((str(dataset.get(k) or "") for k in _DATES if dataset.get(k)), None)
    return scope.age_in_years(str(dataset.get("PatientAge") or ""),
                              str(dataset.get("PatientBirthDate") or ""), seen)


def header_view(dataset: Dataset) -> str | None:
    return str(dataset.get("ViewPosition") or "").strip().upper() or None


def decode_site_file(path: Path) -> Decoded:
    """A site's DICOM file through the worker's filters and decoding (`pneumo accept`, `adapt`)."""
    try:
        dataset = dcmread(path)
    except Exception as error:
        return Decoded(None, f"not a readable DICOM file: {type(error).__name__}")
    age, view = header_age(dataset), header_view(dataset)
    reason = filters.ignore_reason(dataset) or filters.failure_reason(dataset)
    if reason:
        return Decoded(None, reason, age, view)
    try:
        return Decoded(preprocess(grayscale_pixels(dataset)), None, age, view)
    except (DecodeError, ValueError) as error:
        return Decoded(None, str(error)[:500], age, view)
    except Exception as error:  # a decoder's own failure: that file's reason, not the whole report
        return Decoded(None, f"pixel data could not be decoded: {type(error).__name__}", age, view)
