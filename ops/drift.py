"""Model score drift: each served version's scores in production against the histogram its card
recorded on validation (PSI), alerted only beyond what chance gives at that many scores.
Read by ops.monitoring for the dashboard and /metrics."""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import registry
from core.contract import POSITIVE_CLASS, score_histogram
from core.db import Result, utcnow


def psi(expected: list[int], actual: list[int], floor: float = 1e-4) -> float:
    """Population stability index of `actual` against `expected` (same bins).

    Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 investigate. Those figures are
    for large samples: over a few dozen results PSI is mostly noise (see drift_threshold).
    """
    if not sum(expected) or not sum(actual):
        return float("nan")
    return float(psi_many(expected, np.asarray([actual]), floor)[0])


def psi_many(expected: list[int] | np.ndarray, actual: np.ndarray, floor: float = 1e-4) -> np.ndarray:
    """psi() of each row of `actual` (counts) against `expected` (one histogram, or one per row)."""
    expected = np.asarray(expected, dtype=float)
    actual = np.asarray(actual, dtype=float)
    pe = np.maximum(expected / expected.sum(axis=-1, keepdims=True), floor)
    pa = np.maximum(actual / actual.sum(axis=-1, keepdims=True), floor)
    return ((pa - pe) * np.log(pa / pe)).sum(axis=-1)


# Window sizes at which the noise level is simulated; a window between two uses the smaller one's
# threshold, which is the higher (PSI's noise falls with n), so the false-alarm rate stays bounded.
THRESHOLD_GRID = (20, 25, 30, 35, 40, 50, 60, 70, 85, 100, 120, 150, 200, 250, 300, 400, 500, 700,
                  1000, 1500, 2000, 3000, 5000, 10000)


def drift_threshold(expected: tuple[int, ...], n: int, false_alarm_rate: float) -> float:
    """The PSI that `n` scores from the validation population exceed with probability
    `false_alarm_rate`: its (1 - rate) quantile, simulated at the grid size at or below `n`."""
    grid_n = max((g for g in THRESHOLD_GRID if g <= n), default=max(n, 1))
    return _simulated_threshold(tuple(int(c) for c in expected), grid_n, false_alarm_rate)


@functools.lru_cache(maxsize=512)
def _simulated_threshold(expected: tuple[int, ...], n: int, false_alarm_rate: float) -> float:
    """Parametric bootstrap of PSI under "no drift". Both sides are drawn: the card's histogram is
    itself a sample (a few hundred validation images), so a fresh validation-sized sample and `n`
    production scores are drawn from it, smoothed by half a count per bin (a bin empty in
    validation is rare, not impossible), and PSI is computed between them exactly as drift() does.
    Seeded by the inputs: the same card and window give the same threshold in every process."""
    counts = np.asarray(expected, dtype=float)
    population = (counts + 0.5) / (counts + 0.5).sum()
    draws = int(min(200_000, max(20_000, 20 / false_alarm_rate)))
    rng = np.random.default_rng([n, *expected])
    reference = rng.multinomial(int(counts.sum()), population, size=draws)
    production = rng.multinomial(n, population, size=draws)
    return float(np.quantile(psi_many(reference, production), 1 - false_alarm_rate))


def drift_alert(
    expected: list[int], actual: list[int], psi_floor: float, false_alarm_rate: float, min_n: int = 20
) -> tuple[bool, float, float]:
    """(alert, PSI, threshold): alert when at least `min_n` scores drift further than both their
    noise level at this count and `psi_floor` (a shift too small to act on is not alerted)."""
    n = sum(actual)
    value = psi(expected, actual) if n else float("nan")
    if not n:
        return False, value, float("nan")
    threshold = max(psi_floor, drift_threshold(tuple(expected), n, false_alarm_rate))
    return n >= min_n and value > threshold, value, threshold


@dataclass
class DriftDay:
    model_name: str
    model_version: str
    day: str  # YYYY-MM-DD (UTC); "last 24 h" for the rolling window
    n: int
    positive_rate: float
    psi: float
    alert: bool
    threshold: float = float("nan")  # the PSI this window must exceed to alert, at its n


def drift(
    session: Session, models_dir: Path, psi_floor: float, days: int = 7, min_n: int = 20,
    false_alarm_rate: float = 0.001,
) -> list[DriftDay]:
    """Per served model version: the rolling last 24 h, then each of the last `days` UTC days.

    A window alerts when its PSI exceeds what `n` scores from the card's validation population
    reach by chance with probability `false_alarm_rate` (and `psi_floor`); below `min_n` results
    it is reported, never alerted.
    """
    now = utcnow()
    since = (now - timedelta(days=days)).replace(hour=0, minute=0, second=0, microsecond=0)
    rows: list[DriftDay] = []
    for name, version in registry.served_versions(models_dir).items():
        try:
            expected = registry.resolve(f"{name}@{version}", models_dir).card.validation_score_histogram
        except (registry.RegistryError, OSError):
            continue
        if expected is None:
            continue
        results = session.execute(
            select(Result.created_at, Result.probability, Result.label).where(
                Result.model_name == name, Result.model_version == version, Result.created_at >= since
            )
        ).all()
        windows: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for created_at, probability, label in results:
            windows[created_at.strftime("%Y-%m-%d")].append((probability, label))
            if created_at >= now - timedelta(hours=24):
                windows["last 24 h"].append((probability, label))
        for day in ["last 24 h", *sorted((k for k in windows if k != "last 24 h"), reverse=True)]:
            scores = windows.get(day, [])
            n = len(scores)
            alert, value, threshold = drift_alert(
                expected, score_histogram([p for p, _ in scores], len(expected)), psi_floor,
                false_alarm_rate, min_n)
            rows.append(DriftDay(
                name, version, day, n,
                sum(label == POSITIVE_CLASS for _, label in scores) / n if n else float("nan"),
                value, alert, threshold,
            ))
    return rows
