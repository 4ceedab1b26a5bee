"""The model contract: the one place that knows input size, channels, normalisation and labels.

Training writes this contract into every model card; serving refuses a model whose card carries
another contract, so a model never sees tensors shaped or scaled differently from training.
"""

from __future__ import annotations

from pathlib import Path

# The registry folder of this checkout: the settings' default and the registry's (both read it here).
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

INPUT_HEIGHT = 224
INPUT_WIDTH = 224
INPUT_CHANNELS = 1
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
POSITIVE_CLASS = "PNEUMONIA"
NEGATIVE_CLASS = "NORMAL"
LABELS = (NEGATIVE_CLASS, POSITIVE_CLASS)  # label index 0, 1: training's class folders and targets


def label_for(probability: float, threshold: float) -> str:
    """The finding a probability gives at a version's threshold (at or above it: positive)."""
    return POSITIVE_CLASS if probability >= threshold else NEGATIVE_CLASS


def preprocessing_contract() -> dict[str, object]:
    """What a card records, and what loading compares against."""
    return {
        "input_shape": [INPUT_HEIGHT, INPUT_WIDTH, INPUT_CHANNELS],
        "dtype": "float32",
        "resize": "bilinear (antialiased), aspect ratio not kept",
        "normalisation": (
            f"per-image percentile stretch p{LOW_PERCENTILE}-p{HIGH_PERCENTILE} to [0, 1], clipped"
        ),
        "photometric": "MONOCHROME2 (bright = dense)",
        "output": f"sigmoid probability of {POSITIVE_CLASS}",
    }
