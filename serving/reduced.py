"""Reduced-resolution decoding of a DICOM frame, where the codec can skip what the model never sees.

JPEG (8-bit baseline/extended) decodes at 1/2, 1/4 or 1/8 scale through its DCT (Pillow's
`draft`, libjpeg's scaling): each output pixel is the mean of the block it covers. JPEG 2000 decodes
a lower resolution level of its wavelet (Pillow's `reduce`, OpenJPEG's reduce factor): the low-pass
band, again local means in the stored range. Both return the stored values `pixel_array` would
give, averaged, so the Modality LUT, window and inversion apply unchanged (serving.decode).

Anything unexpected (a syntax, sign, precision or size this does not handle, a codec error) gives
None and the caller decodes in full; codec failures are counted in FALLBACKS (by syntax and error
type, never patient data) so a benchmark or an operator can see how often it happens.
"""

from __future__ import annotations

import io
import logging
from collections import Counter

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit

log = logging.getLogger(__name__)

JPEG_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit)
J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000)
MAX_JPEG_LEVEL = 3  # libjpeg scales by 1/8 at most
MAX_J2K_LEVEL = 5  # OpenJPEG's default number of decomposition levels

FALLBACKS: Counter[str] = Counter()  # codec failures of the reduced path, decoded in full instead


def level_for(short_side: int, min_short_side: int, most: int) -> int:
    """The largest power-of-two reduction (0..most) that keeps ceil(short_side / 2**level) at
    least `min_short_side`."""
    level = 0
    while level < most and -(-short_side // (2 << level)) >= min_short_side:
        level += 1
    return level


def _pillow_size_agrees(side: int, level: int) -> bool:
    """Pillow (13.0) sizes a reduced JPEG 2000 image as round(side / 2**level) where OpenJPEG
    gives ceil(side / 2**level); where the two differ it raises "broken data stream"."""
    power = 1 << level
    return (side + (power >> 1)) // power == -(-side // power)


def _eligible(dataset: Dataset) -> bool:
    """One unsigned grayscale frame in a syntax handled here."""
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    return (syntax in JPEG_SYNTAXES + J2K_SYNTAXES
            and int(dataset.get("SamplesPerPixel", 1)) == 1
            and int(dataset.get("NumberOfFrames", 1) or 1) == 1
            and int(dataset.get("PixelRepresentation", 0)) == 0
            and str(dataset.get("PhotometricInterpretation", "")) in ("MONOCHROME1", "MONOCHROME2")
            and "PixelData" in dataset and bool(dataset["PixelData"].is_undefined_length))


def _jpeg(frame: bytes, rows: int, columns: int, level: int) -> np.ndarray:
    with Image.open(io.BytesIO(frame)) as image:
        if image.format != "JPEG" or image.mode != "L":
            raise ValueError(f"not an 8-bit grey JPEG ({image.format}, {image.mode})")
        image.draft("L", (columns >> level, rows >> level))  # the smallest scale >= that size
        return np.asarray(image)


def _unpadded(frame: bytes) -> bytes:
    """The codestream without the 0x00 that pads a DICOM fragment to even length after the EOC
    marker (FFD9): Pillow's JPEG 2000 decoder raises "broken data stream" on it (seen in a real
    16-bit DX), where pylibjpeg ignores it."""
    trimmed = frame.rstrip(b"\x00")
    return trimmed if trimmed.endswith(b"\xff\xd9") else frame


def _j2k(frame: bytes, rows: int, columns: int, level: int, bits_stored: int) -> np.ndarray:
    import openjpeg.utils  # pylibjpeg-openjpeg: the codestream's own precision and sign

    frame = _unpadded(frame)
    header = openjpeg.utils.get_parameters(frame)
    precision = int(header["precision"])
    if header["is_signed"] or precision > 16 or precision > bits_stored:
        raise ValueError(f"codestream precision {precision}, signed {header['is_signed']}")
    while level and not (_pillow_size_agrees(rows, level) and _pillow_size_agrees(columns, level)):
        level -= 1
    if not level:
        raise ValueError("no reduce level Pillow can size for these dimensions")
    with Image.open(io.BytesIO(frame)) as image:
        if image.format != "JPEG2000":
            raise ValueError(f"not a JPEG 2000 codestream ({image.format})")
        image.reduce = level  # type: ignore[method-assign,assignment]  # Pillow's J2K attribute
        image.load()
        pixels = np.asarray(image)
        # Pillow widens a precision between 9 and 15 bits to 16 (and under 8 to 8) by shifting.
        shift = (8 if image.mode == "L" else 16) - precision
    return pixels >> shift if shift > 0 else pixels


def decode(dataset: Dataset, min_short_side: int) -> np.ndarray | None:
    """The stored pixel values at the largest reduction keeping the short side >=
    `min_short_side`, or None when the syntax, header or size gives no reduction (or it failed)."""
    if not _eligible(dataset):
        return None
    syntax = dataset.file_meta.TransferSyntaxUID
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    is_jpeg = syntax in JPEG_SYNTAXES
    if is_jpeg and int(dataset.get("BitsAllocated", 8)) != 8:
        return None  # 12-bit JPEG: Pillow decodes 8-bit only
    level = level_for(min(rows, columns), min_short_side, MAX_JPEG_LEVEL if is_jpeg else MAX_J2K_LEVEL)
    if not level:
        return None
    try:
        frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
        if is_jpeg:
            pixels = _jpeg(frame, rows, columns, level)
        else:
            pixels = _j2k(frame, rows, columns, level, int(dataset.get("BitsStored", 16)))
        expected = {(-(-rows // (1 << n)), -(-columns // (1 << n))) for n in range(1, level + 1)}
        if pixels.shape not in expected:
            raise ValueError(f"reduced shape {pixels.shape}, expected one of {sorted(expected)}")
        return pixels
    except Exception as error:  # any codec surprise: the full decode is the answer
        FALLBACKS[f"{syntax.name}: {type(error).__name__}"] += 1
        log.debug("reduced decode fell back to full (%s): %s", syntax.name, type(error).__name__)
        return None
