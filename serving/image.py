"""The one preprocessing function: training, the site tools and the worker all call it.

A grayscale image of any size and dtype (JPEG pixels, or a decoded DICOM frame after the
Modality LUT, VOI window and MONOCHROME1 inversion) becomes the model's input tensor.
The per-image percentile stretch removes exposure and bit-depth differences between sites and
vendors, which the training data (one hospital, 8-bit JPEG) never shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from core import contract


def load_grayscale(path: str | Path) -> np.ndarray:
    """Decode a JPEG/PNG into a 2-D uint8 array (RGB with equal channels maps exactly to L)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def preprocess(image: np.ndarray) -> np.ndarray:
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
        pixels = np.asarray(Image.fromarray(pixels, mode="F").resize(size, Image.BILINEAR))
    low, high = np.percentile(pixels, [contract.LOW_PERCENTILE, contract.HIGH_PERCENTILE])
    scale = high - low
    stretched = np.zeros_like(pixels) if scale <= 0 else np.clip((pixels - low) / scale, 0.0, 1.0)
    return stretched.astype(np.float32)[..., np.newaxis]


def preprocess_file(path: str | Path) -> np.ndarray:
    return preprocess(load_grayscale(path))


def preprocess_many(paths: list[Path], workers: int = 2) -> np.ndarray:
    """Stack of preprocessed tensors, decoded on `workers` threads (PIL releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        tensors = list(pool.map(preprocess_file, paths))
    if not tensors:
        return np.zeros((0, contract.INPUT_HEIGHT, contract.INPUT_WIDTH, 1), np.float32)
    return np.stack(tensors)
