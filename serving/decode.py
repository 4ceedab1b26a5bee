"""DICOM pixels -> a grayscale array where bright means dense, ready for `preprocess`.

A modality's film is 2,000-3,000 px a side and the model reads 224 px, so where the transfer syntax
allows it the pixels are decoded at a reduced scale that still leaves the short side at least
REDUCED_SHORT_SIDE (serving.reduced): JPEG through its DCT scaling, JPEG 2000 at a lower
resolution level. The LUTs, the window and the MONOCHROME1 inversion are applied after either
decode by the same code, so the reduced image is the full one, averaged.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import JPEGLSLossless, JPEGLSNearLossless

from core import contract
from serving import reduced

# What the area resize to the input size still averages over 2x2 source pixels on: chosen by
# measurement on full-size films (docs/benchmarks.md, "Full-size films").
REDUCED_SHORT_SIDE = 2 * contract.INPUT_HEIGHT


class DecodeError(Exception):
    """The pixel data cannot be decoded; the message is the recorded reason."""


def _saturated(values: np.ndarray, limit: float = 0.9) -> bool:
    low, high = values.min(), values.max()
    if high <= low:
        return True
    return float(np.mean((values == low) | (values == high))) > limit


# JPEG-LS has no reduced decode; CharLS (pyjpegls) decodes it 3-4x faster than pydicom's first
# choice, libjpeg (2,500 x 3,555 px, 16-bit: 1,170 -> 310 ms), to the same pixels (lossless, and
# near-lossless by the same standard; tests/serving/test_decode_plugins.py compares them).
PREFERRED_PLUGIN = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls"}


def _stored_pixels(dataset: Dataset, min_short_side: int | None) -> np.ndarray:
    if min_short_side:
        pixels = reduced.decode(dataset, min_short_side)
        if pixels is not None:
            return pixels
    plugin = PREFERRED_PLUGIN.get(dataset.file_meta.get("TransferSyntaxUID", ""), "")
    if plugin:
        try:
            dataset.pixel_array_options(decoding_plugin=plugin)
            return dataset.pixel_array
        except Exception:  # not installed, or it refuses this data: pydicom's own choice decides
            dataset.pixel_array_options(decoding_plugin="")
    try:
        return dataset.pixel_array
    except Exception as error:
        syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown")
        name = getattr(syntax, "name", str(syntax))
        raise DecodeError(f"pixel data could not be decoded ({name}): {error}") from error


def grayscale_pixels(
    dataset: Dataset, min_short_side: int | None = REDUCED_SHORT_SIDE
) -> np.ndarray:
    """Decode (reduced where the syntax allows and the short side stays >= `min_short_side`;
    None: full), Modality LUT, first VOI window/LUT, MONOCHROME1 inverted."""
    pixels = _stored_pixels(dataset, min_short_side)
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
