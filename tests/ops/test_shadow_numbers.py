"""ops.shadow's numbers against computations written out here: % agree and Cohen's kappa from the
2x2 table, and the exact McNemar tail from binomial coefficients."""

from __future__ import annotations

import math
import random

import pytest

from ops import shadow


def kappa_by_hand(a: list[str], b: list[str]) -> float:
    """(p_o - p_e) / (1 - p_e), p_e from each rater's own label frequencies."""
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    labels = set(a) | set(b)
    expected = sum((a.count(label) / n) * (b.count(label) / n) for label in labels)
    return (observed - expected) / (1 - expected)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_agreement_matches_the_2x2_table(seed: int) -> None:
    rng = random.Random(seed)
    served = [rng.choice(["PNEUMONIA", "NORMAL"]) for _ in range(200)]
    candidate = [s if rng.random() < 0.8 else rng.choice(["PNEUMONIA", "NORMAL"]) for s in served]
    percent, kappa = shadow.agreement_of(served, candidate)
    assert percent == pytest.approx(100 * sum(s == c for s, c in zip(served, candidate, strict=True)) / 200)
    assert kappa == pytest.approx(kappa_by_hand(served, candidate), abs=1e-12)
    assert 0.4 < kappa < 0.95  # ~90% agreement on near-balanced labels: well above chance


def test_a_known_table() -> None:
    """20 both positive, 5 served only, 10 candidate only, 15 both negative: p_o 0.7,
    p_e 0.5*0.6 + 0.5*0.4 = 0.5, kappa 0.4."""
    served = ["PNEUMONIA"] * 25 + ["NORMAL"] * 25
    candidate = ["PNEUMONIA"] * 20 + ["NORMAL"] * 5 + ["PNEUMONIA"] * 10 + ["NORMAL"] * 15
    percent, kappa = shadow.agreement_of(served, candidate)
    assert percent == pytest.approx(70.0)
    assert kappa == pytest.approx(0.4)


def test_agreement_edge_cases() -> None:
    assert shadow.agreement_of([], []) == (None, None)
    assert shadow.agreement_of(["NORMAL"] * 3, ["NORMAL"] * 3) == (100.0, None)  # kappa is 0/0
    with pytest.raises(ValueError):
        shadow.agreement_of(["NORMAL"], [])


def mcnemar_tail(served_only: int, candidate_only: int) -> float:
    """P(X >= served_only), X ~ Binomial(served_only + candidate_only, 1/2), by hand."""
    n = served_only + candidate_only
    return sum(math.comb(n, k) for k in range(served_only, n + 1)) / 2**n


def studies(positives: list[tuple[int, int]], negatives: list[tuple[int, int]]):
    """(served, candidate) aligned (label, score) pairs from per-study decisions (1 = positive)."""
    served, candidate = [], []
    for label, decisions in ((1, positives), (0, negatives)):
        for said_served, said_candidate in decisions:
            served.append((label, 0.9 if said_served else 0.1))
            candidate.append((label, 0.9 if said_candidate else 0.1))
    return served, candidate


def test_a_candidate_missing_positives_is_refused() -> None:
    # 40 positives: both right on 25, served only right on 12, candidate only right on 3.
    positives = [(1, 1)] * 25 + [(1, 0)] * 12 + [(0, 1)] * 3
    negatives = [(0, 0)] * 40
    check = shadow.paired_check(*studies(positives, negatives), 0.5, 0.5)
    assert check.p_sensitivity_worse == pytest.approx(mcnemar_tail(12, 3))
    assert check.p_sensitivity_worse < 0.025
    assert check.served_sensitivity == pytest.approx(37 / 40)
    assert check.candidate_sensitivity == pytest.approx(28 / 40)
    assert check.p_specificity_worse == 1.0  # no discordant negatives
    assert check.refuse and "sensitivity" in check.reason and "specificity" not in check.reason


def test_a_small_difference_is_noise() -> None:
    positives = [(1, 1)] * 30 + [(1, 0)] * 4 + [(0, 1)] * 2
    negatives = [(0, 0)] * 30 + [(1, 1)] * 3 + [(1, 0)] * 1  # (served, candidate) said positive
    check = shadow.paired_check(*studies(positives, negatives), 0.5, 0.5)
    assert check.p_sensitivity_worse == pytest.approx(mcnemar_tail(4, 2))
    # Negatives: served right & candidate wrong never; candidate right & served wrong once.
    assert check.p_specificity_worse == pytest.approx(mcnemar_tail(0, 1))
    assert not check.refuse and check.reason == "not worse beyond noise"


def test_each_version_decides_at_its_own_threshold() -> None:
    """The same scores, but the candidate's threshold above every positive's score: it misses all."""
    served = [(1, 0.7)] * 10 + [(0, 0.2)] * 10
    check = shadow.paired_check(served, served, 0.5, 0.8)
    assert check.served_sensitivity == 1.0 and check.candidate_sensitivity == 0.0
    assert check.p_sensitivity_worse == pytest.approx(2**-10)
    assert check.refuse


def test_no_labelled_studies_of_a_class_refuses() -> None:
    check = shadow.paired_check([(0, 0.1)] * 5, [(0, 0.1)] * 5, 0.5, 0.5)
    assert check.refuse and "0 positive and 5 negative" in check.reason
    assert shadow.paired_check([], [], 0.5, 0.5).refuse


def test_pairs_must_be_the_same_studies() -> None:
    with pytest.raises(ValueError):
        shadow.paired_check([(1, 0.9)], [(0, 0.9)], 0.5, 0.5)
