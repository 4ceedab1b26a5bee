"""serving.decode's plugin choice: JPEG-LS decoded by CharLS (pyjpegls), 3-4x faster than libjpeg,
to the very same pixels; where the preferred plugin cannot decode, pydicom's own choice does."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSNearLossless

from devtools.corpus import variant
from ops.send import wrap_image
from serving import decode
from tests.conftest import SHARED

ORIGINAL = sorted((SHARED / "data" / "chest_xray_fullres" / "train" / "PNEUMONIA").iterdir())[0]


def films() -> dict[str, Dataset]:
    lossless = variant(wrap_image(ORIGINAL), "jpegls", short_side=600)
    near = variant(wrap_image(ORIGINAL), "dx16_window", short_side=600)
    near.compress(JPEGLSNearLossless, jls_error=3, encoding_plugin="pyjpegls")
    return {"lossless": lossless, "near-lossless": near}


def decoded_by(dataset: Dataset, plugin: str) -> np.ndarray:
    dataset.pixel_array_options(decoding_plugin=plugin)
    return dataset.pixel_array


@pytest.mark.parametrize("name", ["lossless", "near-lossless"])
def test_jpeg_ls_is_decoded_by_charls_to_the_same_pixels_as_libjpeg(name: str, monkeypatch) -> None:
    dataset = films()[name]
    np.testing.assert_array_equal(decoded_by(dataset, "pyjpegls"), decoded_by(dataset, "pylibjpeg"))
    used: list[str] = []
    original = Dataset.pixel_array_options

    def spy(self, **options):
        used.append(options.get("decoding_plugin", ""))
        return original(self, **options)

    with monkeypatch.context() as patch:
        patch.setattr(Dataset, "pixel_array_options", spy)
        grey = decode.grayscale_pixels(dataset, None)
    assert used == ["pyjpegls"]
    monkeypatch.setattr(decode, "PREFERRED_PLUGIN", {})  # pydicom's own first choice: libjpeg
    dataset.pixel_array_options(decoding_plugin="")
    np.testing.assert_array_equal(grey, decode.grayscale_pixels(dataset, None))


def test_a_plugin_that_cannot_decode_falls_back_to_pydicoms_choice(monkeypatch) -> None:
    dataset = films()["lossless"]
    expected = decode.grayscale_pixels(dataset, None)
    monkeypatch.setattr(decode, "PREFERRED_PLUGIN",
                        {dataset.file_meta.TransferSyntaxUID: "no-such-plugin"})
    np.testing.assert_array_equal(decode.grayscale_pixels(dataset, None), expected)
