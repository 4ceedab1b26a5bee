import numpy as np
import pytest
from PIL import Image

from core import contract
from serving.image import load_grayscale, preprocess, preprocess_file
from tests.conftest import DATA

SAMPLE = sorted((DATA / "test" / "PNEUMONIA").iterdir())[0]


def test_same_image_as_jpeg_and_as_array_gives_identical_tensors() -> None:
    with Image.open(SAMPLE) as image:
        rgb = np.asarray(image)
    assert rgb.ndim == 3  # the shared copy stores three equal channels
    from_file = preprocess_file(SAMPLE)
    from_array = preprocess(rgb[..., 0])
    np.testing.assert_array_equal(from_file, from_array)
    np.testing.assert_array_equal(from_file, preprocess(load_grayscale(SAMPLE)[..., np.newaxis]))


def test_output_matches_the_contract() -> None:
    tensor = preprocess_file(SAMPLE)
    assert tensor.shape == (contract.INPUT_HEIGHT, contract.INPUT_WIDTH, contract.INPUT_CHANNELS)
    assert tensor.dtype == np.float32
    assert tensor.min() == 0.0 and tensor.max() == 1.0


def test_bit_depth_and_size_do_not_change_the_result_much() -> None:
    """A 12-bit, 4x larger version of an image (as a DICOM would carry it) maps to the same tensor."""
    eight_bit = load_grayscale(SAMPLE).astype(np.float32)
    large = np.asarray(Image.fromarray(eight_bit, mode="F").resize((896, 896), Image.BILINEAR))
    twelve_bit = large * 16.0 + 100.0
    difference = np.abs(preprocess(twelve_bit) - preprocess(eight_bit))
    assert difference.mean() < 0.02


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((10, 10, 3)), "single-channel"),
        (np.zeros((1, 1)), "too small"),
        (np.full((8, 8), np.nan), "non-finite"),
        (np.zeros((2, 3, 4, 5)), "single-channel"),
    ],
)
def test_bad_images_raise_value_error(image: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preprocess(image)


def test_flat_image_is_all_zero_not_nan() -> None:
    assert not preprocess(np.full((50, 50), 7, dtype=np.uint16)).any()
