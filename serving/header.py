"""What a DICOM header says about scope (age, view), and what decoding one file gives.

Here rather than in the worker or training so that the worker's classify path, its site-file
decoding (`pneumo accept`, `calibrate`, `adapt`) and the site tools share them without pulling in
each other (or Keras).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from core import scope

_DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


@dataclass(frozen=True)
class Decoded:
    """What the worker's decoding made of a DICOM file: a tensor, or why there is none."""

    tensor: np.ndarray | None
    reason: str | None = None  # ignored/failed reason (not a chest radiograph, undecodable, ...)
    age_years: float | None = None
    view: str | None = None


def header_age(dataset: Dataset) -> float | None:
    """Patient's Age, else Birth Date against the first date the study carries."""
    seen = next((str(dataset.get(k) or "") for k in _DATES if dataset.get(k)), None)
    return scope.age_in_years(str(dataset.get("PatientAge") or ""),
                              str(dataset.get("PatientBirthDate") or ""), seen)


def header_view(dataset: Dataset) -> str | None:
    return str(dataset.get("ViewPosition") or "").strip().upper() or None
