"""DICOM pixels -> a grayscale array where bright means dense, ready for `preprocess`."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut


class DecodeError(Exception):
    """The pixel data cannot be decoded; the message is the recorded reason."""


def _saturated(values: np.ndarray, limit: float = 0.9) -> bool:
    low, high = values.min(), values.max()
    if high <= low:
        return True
    return float(np.mean((values == low) | (values == high))) > limit


def grayscale_pixels(dataset: Dataset) -> np.ndarray:
    """Decode (pydicom + pylibjpeg), Modality LUT, first VOI window/LUT, MONOCHROME1 inverted."""
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown")
        name = getattr(syntax, "name", str(syntax))
        raise DecodeError(f"pixel data could not be decoded ({name}): {error}") from error
    if pixels.ndim != 2:
        raise DecodeError(f"expected one grayscale frame, decoded shape {pixels.shape}")
    try:
        values = np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float32)
        if "WindowCenter" in dataset or "VOILUTSequence" in dataset:
            windowed = np.asarray(apply_voi_lut(values, dataset, index=0), dtype=np.float32)
            # A window that does not fit the pixel data (seen in the wild) saturates the image;
            # then the full range is kept and the percentile stretch in `preprocess` does the work.
            if not _saturated(windowed):
                values = windowed
    except Exception as error:  # a malformed rescale, window or LUT in the header
        raise DecodeError(
            f"modality or VOI LUT could not be applied: {type(error).__name__}: {error}"
        ) from error
    if str(dataset.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        values = values.max() + values.min() - values
    if not np.isfinite(values).all():
        raise DecodeError("decoded pixel values are not finite")
    return values
