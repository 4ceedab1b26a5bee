"""The model contract: the one place that knows input size, channels, normalisation, labels and
the score bins.

Training writes this contract into every model card; serving refuses a model whose card carries
another contract, so a model never sees tensors shaped or scaled differently from training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

# The registry folder when PNEUMO_MODELS_DIR is not set: `models` in the working directory (as
# PNEUMO_HOME defaults to `var`), i.e. a checkout's own registry when run from its root. Never a
# path beside this file: an installed package has no registry next to it.
DEFAULT_MODELS_DIR = Path("models")

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


SCORE_BINS = 20  # a card's `validation_score_histogram`: equal-width bins of probabilities on [0, 1]
SCORE_RANGE = (0.0, 1.0)


def score_edges(bins: int = SCORE_BINS) -> np.ndarray:
    """The edges of a score histogram of `bins` counts (training's card, the drift check)."""
    return np.histogram_bin_edges([], bins=bins, range=SCORE_RANGE)


def score_histogram(probabilities: ArrayLike, bins: int = SCORE_BINS) -> list[int]:
    """Scores counted on the score edges: what training writes on the card and what the drift
    check compares with it (one outside [0, 1] is kept, in the end bin)."""
    return np.histogram(np.clip(probabilities, *SCORE_RANGE), bins=score_edges(bins))[0].tolist()


# How the image is brought to the input size: the key each version's card names through its
# `resize` text. "area" (each output pixel the mean of the source pixels it covers) is what a
# full-resolution film needs: on 69 held-out full-resolution Kermany originals it matched their
# 224 px copies' labels on 98.6% (bilinear 97.1%; docs/models.md). Versions registered with
# "bilinear" keep it, so their recorded validation still describes what they are served.
RESIZE = "area"
RESIZE_TEXT = {
    "area": "area (box filter over the covered source pixels), aspect ratio not kept",
    "bilinear": "bilinear (antialiased), aspect ratio not kept",
}


def preprocessing_contract(resize: str = RESIZE) -> dict[str, object]:
    """What a card records, and what loading compares against."""
    return {
        "input_shape": [INPUT_HEIGHT, INPUT_WIDTH, INPUT_CHANNELS],
        "dtype": "float32",
        "resize": RESIZE_TEXT[resize],
        "normalisation": (
            f"per-image percentile stretch p{LOW_PERCENTILE}-p{HIGH_PERCENTILE} to [0, 1], clipped"
        ),
        "photometric": "MONOCHROME2 (bright = dense)",
        "output": f"sigmoid probability of {POSITIVE_CLASS}",
    }


def resize_of(recorded: dict[str, object]) -> str:
    """The resize key of a card's recorded contract; ValueError if this code serves no such
    contract (another input size, normalisation or resize)."""
    for key in RESIZE_TEXT:
        if recorded == preprocessing_contract(key):
            return key
    raise ValueError(f"a preprocessing contract this code does not serve: {recorded}; it serves "
                     f"{preprocessing_contract()} (or with resize "
                     f"{', '.join(repr(t) for t in RESIZE_TEXT.values())})")
