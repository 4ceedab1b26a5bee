"""The one preprocessing function: training, the site tools and the worker all call it.

A grayscale image of any size and dtype (JPEG/PNG pixels, or a decoded DICOM frame after the
Modality LUT, VOI window and MONOCHROME1 inversion) becomes the model's input tensor: resized to
the input size with the version's resize (core.contract.RESIZE_TEXT; "area" averages every source
pixel, so a 3,000 px film and its 224 px copy become nearly the same tensor), then the per-image
percentile stretch, which removes exposure and bit-depth differences between sites and vendors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from core import contract

RESIZE_FILTERS = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR}


def load_grayscale(path: str | Path) -> np.ndarray:
    """Decode a JPEG/PNG into a 2-D array: 8-bit files as uint8 (RGB with equal channels maps
    exactly to L), 16-bit and 32-bit grey PNG/TIFF at their own depth (L would clip them)."""
    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return np.asarray(image).astype(np.float32)
        return np.asarray(image.convert("L"))


def preprocess(image: np.ndarray, resize: str = contract.RESIZE) -> np.ndarray:
    """Grayscale image (H, W) or (H, W, 1) -> float32 tensor (224, 224, 1) in [0, 1].

    Raises ValueError for anything that is not a non-empty single-channel image.
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"expected a single-channel 2-D image, got shape {array.shape}")
    if min(array.shape) < 2:
        raise ValueError(f"image too small to classify: {array.shape[1]}x{array.shape[0]} pixels")
    pixels = array.astype(np.float32)
    if not np.all(np.isfinite(pixels)):
        raise ValueError("image has non-finite pixel values")
    size = (contract.INPUT_WIDTH, contract.INPUT_HEIGHT)
    if pixels.shape != (contract.INPUT_HEIGHT, contract.INPUT_WIDTH):
        pixels = np.asarray(Image.fromarray(pixels, mode="F").resize(size, RESIZE_FILTERS[resize]))
    low, high = np.percentile(pixels, [contract.LOW_PERCENTILE, contract.HIGH_PERCENTILE])
    scale = high - low
    stretched = np.zeros_like(pixels) if scale <= 0 else np.clip((pixels - low) / scale, 0.0, 1.0)
    return stretched.astype(np.float32)[..., np.newaxis]


def preprocess_file(path: str | Path, resize: str = contract.RESIZE) -> np.ndarray:
    return preprocess(load_grayscale(path), resize)


def preprocess_many(
    paths: list[Path], workers: int = 2, resize: str = contract.RESIZE
) -> np.ndarray:
    """Stack of preprocessed tensors, decoded on `workers` threads (PIL releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        tensors = list(pool.map(lambda path: preprocess_file(path, resize), paths))
    if not tensors:
        return np.zeros((0, contract.INPUT_HEIGHT, contract.INPUT_WIDTH, 1), np.float32)
    return np.stack(tensors)
