"""What the score-drift alert catches, and how often it cries wolf, at n = 50, 200 and 1000 results.

    .venv/bin/python benchmarks/drift_power.py [--windows 1000] [--power 0.8]

For each served model, production windows of n scores are drawn from its card's validation score
histogram (uniform within each 0.05-wide bin), then shifted, and scored by the alert the dashboard
uses (`ops.drift.drift_alert`, default settings). Printed per model and n:
- false alarms: share of unshifted windows that alert (wanted: under 1%);
- logit shift: the smallest shift of every score's log-odds, up (more confident pneumonia) and down,
  found in at least `--power` of the windows, with the positive rate at the card's threshold it
  leads to (validation's rate in brackets);
- foreign scores: the smallest share of scores replaced by uniform ones on [0, 1] (images unlike
  the training set, on which the model guesses) found in at least `--power` of the windows.
Shifts are searched on grids (logit steps of 0.25 up to 4, shares in steps of 0.05); "> max" means
not found on the grid. Seeded: the same models give the same table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, load_average, print_table  # also puts the repo on sys.path

from core import registry
from core.contract import score_histogram
from core.settings import Settings
from ops.drift import drift_threshold, psi_many

WINDOW_SIZES = (50, 200, 1000)
LOGIT_GRID = np.arange(0.25, 4.01, 0.25)
SHARE_GRID = np.arange(0.05, 1.001, 0.05)


def scores_from(histogram: list[int], size: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    bins = rng.choice(len(histogram), size=size, p=np.asarray(histogram) / sum(histogram))
    return np.clip((bins + rng.uniform(size=size)) / len(histogram), 1e-6, 1 - 1e-6)


def histograms(scores: np.ndarray) -> np.ndarray:
    """Per row (one window of production scores), the counts the drift check gives."""
    return np.array([score_histogram(row) for row in scores])


def detection_rate(expected: list[int], scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(psi_many(expected, histograms(scores)) > threshold))


def logit_shift(scores: np.ndarray, delta: float) -> np.ndarray:
    return 1 / (1 + np.exp(-(np.log(scores / (1 - scores)) + delta)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=1000, help="Windows drawn per shift")
    parser.add_argument("--power", type=float, default=0.8, help="Share of windows that must alert")
    args = parser.parse_args()
    settings = Settings()
    models_dir = REPO / "models"
    print(f"PNEUMO_DRIFT_FALSE_ALARM_RATE={settings.drift_false_alarm_rate}, "
          f"PNEUMO_DRIFT_PSI_ALERT={settings.drift_psi_alert}; {args.windows} windows per cell, "
          f"detected = alerts in >= {args.power:.0%} of them; load {load_average()}\n")
    rows = []
    for name, version in sorted(registry.served_versions(models_dir).items()):
        card = registry.resolve(f"{name}@{version}", models_dir).card
        expected, cut = card.validation_score_histogram, card.threshold
        rng = np.random.default_rng(2026)
        base_rate = float(np.mean(scores_from(expected, (200_000,), rng) >= cut))
        for n in WINDOW_SIZES:
            threshold = max(settings.drift_psi_alert,
                            drift_threshold(tuple(expected), n, settings.drift_false_alarm_rate))
            clean = scores_from(expected, (args.windows, n), rng)
            false_alarms = detection_rate(expected, clean, threshold)
            cells = []
            for sign in (+1, -1):
                found = next((d for d in LOGIT_GRID
                              if detection_rate(expected, logit_shift(clean, sign * d), threshold)
                              >= args.power), None)
                if found is None:
                    cells.append(f"> {sign * LOGIT_GRID[-1]:+.2f}")
                    continue
                shifted = logit_shift(scores_from(expected, (200_000,), rng), sign * found)
                rate = float(np.mean(shifted >= cut))
                cells.append(f"{sign * found:+.2f} ({rate:.2f})")
            foreign = next((share for share in SHARE_GRID if detection_rate(
                expected, np.where(rng.uniform(size=clean.shape) < share, rng.uniform(size=clean.shape),
                                   clean), threshold) >= args.power), None)
            rows.append([f"{name}@{version}", n, f"{threshold:.3f}", f"{false_alarms:.2%}", *cells,
                         f"{foreign:.2f}" if foreign is not None else "> 1"])
        rows.append([f"(validation positive rate at threshold {cut:.3f}: {base_rate:.2f})",
                     "", "", "", "", "", ""])
    print_table(["model", "n", "alert above PSI", "false alarms", "logit shift up (positive rate)",
                 "logit shift down (positive rate)", "foreign share"], rows)


if __name__ == "__main__":
    main()
