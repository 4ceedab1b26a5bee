"""Issue 19 item 5: a JPEG/PNG as a site hands it over (`pneumo send`, `pneumo accept`) and a DX of
the same pixels from a modality become the same tensor, so they get the same answer.

Full-resolution originals from ../shared: the sizes and encodings the node receives, not 224 px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import contract
from devtools.corpus import variant
from ops.send import wrap_image
from serving.decode import grayscale_pixels
from serving.image import load_grayscale, preprocess, preprocess_file
from tests.conftest import SHARED

FULLRES = SHARED / "data" / "chest_xray_fullres" / "train"
ORIGINALS = [sorted((FULLRES / c).iterdir())[i] for c in ("NORMAL", "PNEUMONIA") for i in (0, 7)]


@pytest.mark.parametrize("original", ORIGINALS, ids=lambda p: p.name)
@pytest.mark.parametrize("kind", ["dx8", "dx12_mono1", "dx16_window", "j2k_lossless", "rle"])
def test_a_dx_of_the_same_pixels_is_the_same_tensor(original: Path, kind: str) -> None:
    as_file = preprocess_file(original)
    as_dx = preprocess(grayscale_pixels(variant(wrap_image(original), kind), None))
    # Lossless encodings differ from the file's pixels by a linear map only, which the
    # percentile stretch removes: the same tensor up to float rounding. Decoded in full (None):
    # the served JPEG 2000 decode is reduced, close but not equal (tests/serving/test_reduced_decode).
    np.testing.assert_allclose(as_dx, as_file, atol=1e-4)


@pytest.mark.parametrize("original", ORIGINALS[:2], ids=lambda p: p.name)
def test_pneumo_send_wraps_the_pixels_the_site_tools_read(original: Path, tmp_path: Path) -> None:
    dataset = wrap_image(original)
    path = tmp_path / "sent.dcm"
    dataset.save_as(path, enforce_file_format=True)
    from pydicom import dcmread

    np.testing.assert_array_equal(grayscale_pixels(dcmread(path)), load_grayscale(original))
    np.testing.assert_allclose(preprocess(grayscale_pixels(dcmread(path))),
                               preprocess_file(original), atol=1e-6)


def test_a_16_bit_png_keeps_its_depth_through_both_doors(tmp_path: Path) -> None:
    """A 16-bit PNG read as 8-bit would clip every value above 255 to white (PIL's "L")."""
    grey = load_grayscale(ORIGINALS[0]).astype(np.uint16) * 257 // 4  # 14 bits of range
    path = tmp_path / "film.png"
    Image.fromarray(grey).save(path)
    pixels = load_grayscale(path)
    assert pixels.max() > 255
    np.testing.assert_array_equal(pixels, grey)
    dataset = wrap_image(path)
    assert dataset.BitsStored == 16
    np.testing.assert_allclose(preprocess(grayscale_pixels(dataset)), preprocess(grey), atol=1e-6)
    np.testing.assert_allclose(preprocess(pixels), preprocess_file(ORIGINALS[0]), atol=2e-2)


def test_area_resize_averages_where_bilinear_samples() -> None:
    """A one-pixel grid at 8x the input size: the area resize sees its mean (uniform grey), a
    sampling filter can alias it into stripes. Why full-resolution films use "area"."""
    size = contract.INPUT_HEIGHT * 8
    grid = np.zeros((size, size), np.float32)
    grid[:, ::2] = 1.0
    grid[0, 0] = 2.0  # keeps the stretch from being degenerate
    area = preprocess(grid, "area")[..., 0]
    assert float(area[4:-4, 4:-4].std()) < 0.02
