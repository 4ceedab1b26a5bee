"""Production scores are binned on the edges training used for the card's validation histogram,
so a score on a bin edge is counted in the same bin on both sides of the PSI."""

from __future__ import annotations

import numpy as np

from core.contract import SCORE_BINS, score_edges, score_histogram


def training_histogram(scores) -> list[int]:
    """As training/train.py and training/adapt.py write `validation_score_histogram`."""
    return np.histogram(scores, bins=20, range=(0.0, 1.0))[0].tolist()


def test_scores_on_every_edge_and_between_fall_in_the_bins_training_uses() -> None:
    on_edges = [k / 20 for k in range(21)] + [k * 0.05 for k in range(21)]
    between = np.random.default_rng(3).uniform(size=500).tolist()
    for scores in (on_edges, between, [0.0, 0.999, 1.0], [0.15]):
        assert score_histogram(scores) == training_histogram(scores), scores
    # The old hand-written binning put 0.15 in bin int(0.15 * 20) == 3; training's edges put it in 2.
    assert score_histogram([0.15]).index(1) == 2


def test_edges_are_the_training_ones_and_nothing_is_dropped() -> None:
    assert np.array_equal(score_edges(), np.histogram_bin_edges([], bins=20, range=(0.0, 1.0)))
    assert len(score_edges(SCORE_BINS)) == SCORE_BINS + 1
    assert score_histogram([]) == [0] * SCORE_BINS
    assert sum(score_histogram([-1e-9, 1.0 + 1e-9])) == 2  # clipped into the end bins, not lost
    assert len(score_histogram([0.5], bins=10)) == 10
