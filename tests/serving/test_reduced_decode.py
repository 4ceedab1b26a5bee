"""Issue 21 item 3: a full-size film in JPEG or JPEG 2000 is decoded at a reduced scale, and the
reduced image is the full one averaged: same stored range, same LUTs, window and inversion.

Real codecs on a full-resolution original from ../shared, re-encoded by devtools/corpus.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset

from devtools.corpus import variant
from ops.send import wrap_image
from serving import reduced
from serving.decode import REDUCED_SHORT_SIDE, grayscale_pixels
from serving.image import preprocess
from tests.conftest import REAL_DICOM, SHARED

ORIGINAL = sorted((SHARED / "data" / "chest_xray_fullres" / "train" / "NORMAL").iterdir())[0]


@pytest.fixture(scope="module")
def dx() -> Dataset:
    return wrap_image(ORIGINAL)


def box_mean(grey: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The full image averaged down to `shape` (what a reduced decode approximates)."""
    image = Image.fromarray(grey.astype(np.float32), mode="F")
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BOX))


@pytest.mark.parametrize("kind", ["jpeg_baseline", "j2k_lossless", "j2k_lossy"])
def test_a_film_is_decoded_reduced_and_matches_the_full_decode_averaged(dx: Dataset, kind: str) -> None:
    dataset = variant(dx, kind, short_side=1000)
    full = grayscale_pixels(dataset, None)
    small = grayscale_pixels(dataset, 224)
    assert full.shape[0] == 1000
    assert small.shape == (250, -(-full.shape[1] // 4))  # 1/4: 250 px is still >= 224
    scale = float(full.max() - full.min())
    assert abs(float(small.max() - small.min()) - scale) < 0.1 * scale  # the stored range, not 16-bit
    # Measured: 0.5% (JPEG) to 1.2% (JPEG 2000's 5/3 low-pass is not a box); upside down: 16%.
    expected = box_mean(full, small.shape)
    assert float(np.mean(np.abs(small - expected))) < 0.03 * scale
    assert np.corrcoef(small.ravel(), expected.ravel())[0, 1] > 0.99
    assert float(np.mean(np.abs(preprocess(small) - preprocess(full)))) < 0.03


def test_luts_window_and_monochrome1_apply_to_the_reduced_pixels_as_to_the_full(dx: Dataset) -> None:
    dataset = variant(dx, "j2k_lossless", short_side=1000)
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.RescaleSlope, dataset.RescaleIntercept = 2, -100
    dataset.WindowCenter, dataset.WindowWidth = 3000, 5000
    full = grayscale_pixels(dataset, None)
    small = grayscale_pixels(dataset, 224)
    assert small.shape[0] == 250
    expected = box_mean(full, small.shape)
    scale = float(full.max() - full.min())
    assert float(np.mean(np.abs(small - expected))) < 0.03 * scale
    assert np.corrcoef(small.ravel(), expected.ravel())[0, 1] > 0.99  # inverted both times, or neither


def test_no_reduction_where_the_short_side_would_drop_below_the_bound(dx: Dataset) -> None:
    dataset = variant(dx, "jpeg_baseline", short_side=2 * REDUCED_SHORT_SIDE - 2)  # half: 1 px short
    assert reduced.decode(dataset, REDUCED_SHORT_SIDE) is None
    assert grayscale_pixels(dataset).shape == grayscale_pixels(dataset, None).shape
    assert reduced.level_for(2 * REDUCED_SHORT_SIDE, REDUCED_SHORT_SIDE, 3) == 1
    assert reduced.level_for(2500, 224, 3) == 3
    assert reduced.level_for(2500, 448, 3) == 2
    assert reduced.level_for(2500, 224, 2) == 2


@pytest.mark.parametrize("kind", ["dx8", "dx16_window", "jpegls", "rle"])
def test_syntaxes_without_a_reduced_decode_are_decoded_in_full(dx: Dataset, kind: str) -> None:
    dataset = variant(dx, kind, short_side=1000)
    before = sum(reduced.FALLBACKS.values())
    assert reduced.decode(dataset, 224) is None
    assert sum(reduced.FALLBACKS.values()) == before  # not eligible is not a failure
    assert grayscale_pixels(dataset, 224).shape[0] == 1000


def test_a_height_pillow_cannot_size_at_1_4_is_reduced_by_1_2(dx: Dataset) -> None:
    """Pillow rounds a reduced JPEG 2000 size where OpenJPEG takes the ceiling: 1,001 rows at 1/4
    would raise "broken data stream"; 1/2 is decoded instead, not the full image."""
    dataset = variant(dx, "j2k_lossless", short_side=1001)
    before = sum(reduced.FALLBACKS.values())
    pixels = reduced.decode(dataset, 224)
    assert pixels is not None and pixels.shape[0] == 501
    assert sum(reduced.FALLBACKS.values()) == before


def test_a_codestream_that_disagrees_with_its_header_falls_back_to_full_and_is_counted(
        dx: Dataset) -> None:
    """A 12-bit codestream in a file whose header says 8 bits stored: the reduced path will not
    guess which is right; pydicom's full decode (which follows the codestream) answers."""
    dataset = variant(dx, "j2k_lossless", short_side=1000)
    dataset.BitsStored, dataset.HighBit = 8, 7
    key = "JPEG 2000 Image Compression (Lossless Only): ValueError"
    before = reduced.FALLBACKS[key]
    pixels = grayscale_pixels(dataset, 224)
    assert pixels.shape[0] == 1000
    assert reduced.FALLBACKS[key] == before + 1


def test_the_served_path_reduces_by_default(dx: Dataset) -> None:
    """The worker calls grayscale_pixels(dataset) with no bound: a full-size film is reduced."""
    dataset = variant(dx, "jpeg_baseline", short_side=2500)
    assert min(grayscale_pixels(dataset).shape) < 2500 // 2
    assert min(grayscale_pixels(dataset).shape) >= REDUCED_SHORT_SIDE


@pytest.mark.parametrize("name", ["dx_16bit_j2k_flipped.dcm", "konica_cr_mono1_jpeg.dcm",
                                  "nema_rg1_cr_chest_j2k_lossy.dcm"])
def test_real_modality_files_are_reduced_and_give_the_full_decode_tensor(name: str) -> None:
    """A 16-bit JPEG 2000 DX whose fragment is padded after its EOC marker (Pillow refused it
    until the pad was trimmed), a MONOCHROME1 JPEG CR and a lossy JPEG 2000 CR."""
    dataset = dcmread(REAL_DICOM / name)
    before = sum(reduced.FALLBACKS.values())
    full = grayscale_pixels(dataset, None)
    small = grayscale_pixels(dataset)
    assert sum(reduced.FALLBACKS.values()) == before
    assert REDUCED_SHORT_SIDE <= min(small.shape) <= -(-min(full.shape) // 2)  # ceil of a half
    expected = box_mean(full, small.shape)
    assert np.corrcoef(small.ravel(), expected.ravel())[0, 1] > 0.99  # inverted both times, or neither
    assert float(np.mean(np.abs(preprocess(small) - preprocess(full)))) < 0.01
