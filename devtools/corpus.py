"""DICOM files as modalities send them, made from an 8-bit DX (the product's own wrapper of a
JPEG/PNG, `ops.send.wrap_image`, which the caller passes in: devtools imports nothing of ours): the
encodings that tests, drills and the full-size benchmark corpus need, written once.

Every variant carries the same image: 8-bit MONOCHROME2, 12-bit MONOCHROME1 (inverted, as CR
plates store it), 16-bit with a VOI window, and the compressed syntaxes a PACS negotiates (JPEG
baseline, JPEG-LS, JPEG 2000 lossless and lossy, RLE). Decoded by the product, each must give the
same grey image up to a linear map (which the model's percentile stretch removes) and the codec's
own loss.
"""

from __future__ import annotations

import copy
import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

KINDS = ("dx8", "dx12_mono1", "dx16_window", "jpeg_baseline", "jpegls", "j2k_lossless", "j2k_lossy",
         "rle")


def resized(pixels: np.ndarray, short_side: int) -> np.ndarray:
    """8-bit grey pixels with the short side scaled to `short_side` (Lanczos)."""
    grey = Image.fromarray(pixels)
    factor = short_side / min(grey.size)
    size = (max(2, round(grey.width * factor)), max(2, round(grey.height * factor)))
    return np.asarray(grey.resize(size, Image.Resampling.LANCZOS))


def _with_pixels(dataset: Dataset, pixels: np.ndarray, bits: int, photometric: str) -> Dataset:
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.BitsAllocated = 8 if bits == 8 else 16
    dataset.BitsStored, dataset.HighBit = bits, bits - 1
    dataset.PixelRepresentation = 0
    dataset.PhotometricInterpretation = photometric
    if photometric == "MONOCHROME1":
        dataset.PresentationLUTShape = "INVERSE"
    dtype = np.uint8 if bits == 8 else np.uint16
    dataset.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset


def _jpeg_baseline(dataset: Dataset, pixels: np.ndarray, quality: int = 90) -> Dataset:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    dataset.PixelData = encapsulate([buffer.getvalue()])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.LossyImageCompression = "01"
    return dataset


def variant(dx: Dataset, kind: str, short_side: int | None = None, **header: object) -> Dataset:
    """A copy of `dx` (8-bit MONOCHROME2, uncompressed) in encoding `kind` (KINDS), optionally
    rescaled, with extra header values (e.g. PatientAge)."""
    dataset = copy.deepcopy(dx)
    for keyword, value in header.items():
        setattr(dataset, keyword, value)
    grey = np.frombuffer(dx.PixelData, np.uint8).reshape(dx.Rows, dx.Columns)
    if short_side:
        grey = resized(grey, short_side)
    wide = grey.astype(np.uint16)
    if kind == "dx8":
        return _with_pixels(dataset, grey, 8, "MONOCHROME2")
    if kind == "dx12_mono1":
        return _with_pixels(dataset, (255 - wide) * 16, 12, "MONOCHROME1")
    if kind == "dx16_window":
        _with_pixels(dataset, wide * 200 + 1000, 16, "MONOCHROME2")
        dataset.WindowCenter, dataset.WindowWidth = 1000 + 127 * 200, 256 * 200
        return dataset
    if kind == "jpeg_baseline":
        return _jpeg_baseline(_with_pixels(dataset, grey, 8, "MONOCHROME2"), grey)
    if kind == "jpegls":
        _with_pixels(dataset, wide * 16, 12, "MONOCHROME2")
        dataset.compress(JPEGLSLossless)
        return dataset
    if kind == "j2k_lossless":
        _with_pixels(dataset, wide * 16, 12, "MONOCHROME2")
        dataset.compress(JPEG2000Lossless)
        return dataset
    if kind == "j2k_lossy":
        _with_pixels(dataset, wide * 16, 12, "MONOCHROME2")
        dataset.compress(JPEG2000, j2k_cr=[15])
        dataset.LossyImageCompression = "01"
        return dataset
    if kind == "rle":
        _with_pixels(dataset, grey, 8, "MONOCHROME2")
        dataset.compress(RLELossless)
        return dataset
    raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
