"""The running scorecard: how each model version does on the site's own labelled studies, per
site and ISO week and overall, against what its card measured.

Study level (the one definition, STUDY_RULE): a study is positive for a version when any of its
images that version assessed is positive at the version's threshold, and its score is the highest
probability among them; refused (out of scope) or failed images do not count. A study counts once
its current label (ops.labels.current_labels) names it. The site is the calling AE title that
sent the study's first image (one deployment may serve several senders).

Intervals (95%): Wilson for sensitivity, specificity and PPV; DeLong for the AUC (computed here
from placement values, not with scikit-learn, so tests can check it independently); a seeded
percentile bootstrap (BOOTSTRAP resamples of studies) for the ECE; Wilson for each reliability
bin's observed rate. ECE: ECE_BINS equal-width bins of the score, weighted by their counts.

Alert: sensitivity (specificity) is significantly below the card's when the one-sided exact
binomial test of the observed true positives among positives (true negatives among negatives)
against the card's value gives p < PNEUMO_SCORECARD_ALERT_P (default 0.01), on the overall
figures of each version and site. The card's value is its test look when it has one, else its
validation figure, taken as exact (its own sampling error is not added).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.stats import binomtest, norm, rankdata
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from core.contract import POSITIVE_CLASS
from core.db import Instance, ModelVersionRow, Result, Study
from core.settings import Settings
from ops.labels import current_labels

log = logging.getLogger(__name__)

STUDY_RULE = ("a study is positive for a version if any image it assessed is positive at the "
              "version's threshold; its score is the highest probability among those images")
ECE_BINS = 10
BOOTSTRAP = 500
Z95 = float(norm.ppf(0.975))


@dataclass
class Interval:
    value: float | None
    low: float | None
    high: float | None
    k: int | None = None  # proportions: successes of n
    n: int | None = None


def wilson(k: int, n: int) -> Interval:
    if n == 0:
        return Interval(None, None, None, k, n)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return Interval(k / n, float(ci.low), float(ci.high), k, n)


def delong_auc(labels: np.ndarray, scores: np.ndarray) -> Interval:
    """AUC (ties count half) with DeLong's variance, from midranks (Sun & Xu 2014: O(n log n),
    no positives x negatives matrix); None without both classes."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    m, n = len(positives), len(negatives)
    if m == 0 or n == 0:
        return Interval(None, None, None)
    overall = rankdata(np.concatenate([positives, negatives]))
    # Each positive's share of negatives below it, each negative's share of positives above it.
    per_positive = (overall[:m] - rankdata(positives)) / n
    per_negative = 1.0 - (overall[m:] - rankdata(negatives)) / m
    auc = float(per_positive.mean())
    variance = ((per_positive.var(ddof=1) / m if m > 1 else 0.0)
                + (per_negative.var(ddof=1) / n if n > 1 else 0.0))
    half = Z95 * float(np.sqrt(variance))
    return Interval(auc, max(0.0, auc - half), min(1.0, auc + half))


def _bin_index(scores: np.ndarray) -> np.ndarray:
    return np.minimum((np.clip(scores, 0, 1) * ECE_BINS).astype(int), ECE_BINS - 1)


def ece(labels: np.ndarray, scores: np.ndarray) -> float:
    bins = _bin_index(scores)
    total = 0.0
    for b in range(ECE_BINS):
        inside = bins == b
        if inside.any():
            total += inside.mean() * abs(scores[inside].mean() - labels[inside].mean())
    return float(total)


def ece_interval(labels: np.ndarray, scores: np.ndarray, seed: int = 0) -> Interval:
    if len(labels) == 0:
        return Interval(None, None, None)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(BOOTSTRAP):  # one resample at a time: memory stays O(n)
        draw = rng.integers(0, len(labels), size=len(labels))
        values.append(ece(labels[draw], scores[draw]))
    low, high = np.percentile(values, [2.5, 97.5])
    return Interval(ece(labels, scores), float(low), float(high))


def reliability(labels: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
    """Per non-empty bin: its edges, count, mean score and observed positive rate (Wilson)."""
    bins = _bin_index(scores)
    found = []
    for b in range(ECE_BINS):
        inside = bins == b
        if inside.any():
            observed = wilson(int(labels[inside].sum()), int(inside.sum()))
            found.append({"low": b / ECE_BINS, "high": (b + 1) / ECE_BINS, "n": int(inside.sum()),
                          "mean_score": float(scores[inside].mean()), "observed": asdict(observed)})
    return found


@dataclass
class Figures:
    """One group of labelled studies (a week, or all)."""

    n: int
    positives: int
    negatives: int
    sensitivity: Interval
    specificity: Interval
    ppv: Interval
    auc: Interval
    ece: Interval
    reliability: list[dict[str, Any]]


def figures(labels: np.ndarray, predicted: np.ndarray, scores: np.ndarray, intervals: bool = True) -> Figures:
    tp = int(((labels == 1) & (predicted == 1)).sum())
    tn = int(((labels == 0) & (predicted == 0)).sum())
    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    return Figures(
        n=len(labels), positives=positives, negatives=negatives,
        sensitivity=wilson(tp, positives), specificity=wilson(tn, negatives),
        ppv=wilson(tp, int((predicted == 1).sum())), auc=delong_auc(labels, scores),
        ece=(ece_interval(labels, scores) if intervals
             else Interval(ece(labels, scores) if len(labels) else None, None, None)),
        reliability=reliability(labels, scores))


@dataclass
class Row:
    """A labelled study as a version saw it (what every figure is computed from)."""

    study_id: int
    label: int  # 1: the site's label is pneumonia
    predicted: int  # STUDY_RULE
    score: float
    week: str  # ISO week of the study's first image, e.g. 2026-W49


@dataclass
class Scorecard:
    model_name: str
    model_version: str
    site: str
    overall: Figures
    weeks: dict[str, Figures]
    reference: dict[str, Any]  # the card's sensitivity/specificity and where they come from
    alerts: list[str]
    rows: list[Row] = field(repr=False)
    validation_histogram: list[int] | None = None

    def as_dict(self, with_rows: bool = True) -> dict[str, Any]:
        data = asdict(self)
        data["study_rule"] = STUDY_RULE
        if not with_rows:
            data.pop("rows")
        return data


def card_reference(card: dict[str, Any] | None) -> dict[str, Any]:
    """The sensitivity and specificity the card measured: its test look, else validation."""
    metrics = (card or {}).get("metrics") or {}
    for split in ("test", "validation"):
        figures_ = metrics.get(split) or {}
        if figures_.get("sensitivity") is not None and figures_.get("specificity") is not None:
            return {"source": f"card {split}", "sensitivity": figures_["sensitivity"],
                    "specificity": figures_["specificity"], "n": figures_.get("n")}
    return {"source": "none: the card records no sensitivity and specificity"}


def alerts_for(overall: Figures, reference: dict[str, Any], alpha: float) -> list[str]:
    found = []
    for name in ("sensitivity", "specificity"):
        expected = reference.get(name)
        observed: Interval = getattr(overall, name)
        if expected is None or not observed.n:
            continue
        p = binomtest(int(observed.k or 0), observed.n, float(expected), alternative="less").pvalue
        if p < alpha:
            found.append(f"{name} {observed.value:.3f} ({observed.k}/{observed.n}) is below the "
                         f"{reference['source']}'s {float(expected):.3f} (one-sided exact binomial "
                         f"p = {p:.2g} < {alpha:g})")
    return found


def labelled_rows(session: Session) -> dict[tuple[str, str, str], list[Row]]:
    """(model, version, site) -> its labelled studies under STUDY_RULE."""
    positive = func.max(case((Result.label == POSITIVE_CLASS, 1), else_=0))
    grouped = session.execute(
        select(Result.model_name, Result.model_version, Instance.study_id,
               func.max(Result.probability), positive)
        .join(Instance, Result.instance_id == Instance.id)
        .group_by(Result.model_name, Result.model_version, Instance.study_id)).all()
    labels = current_labels(session)  # all: no list of every study in the query
    first = {sid: (received, ae) for sid, received, ae in session.execute(
        select(Study.id, Study.first_received_at,
               select(Instance.calling_ae_title).where(Instance.study_id == Study.id)
               .order_by(Instance.received_at, Instance.id).limit(1).scalar_subquery())
        .where(Study.id.in_(select(Instance.study_id).join(Result, Result.instance_id == Instance.id))))
        if sid in labels}
    found: dict[tuple[str, str, str], list[Row]] = {}
    for name, version, sid, score, predicted in grouped:
        if sid not in labels:
            continue
        received, site = first[sid]
        year, week, _ = received.isocalendar()
        found.setdefault((name, version, site or "?"), []).append(Row(
            sid, int(labels[sid].label == POSITIVE_CLASS), int(predicted), float(score),
            f"{year}-W{week:02d}"))
    return found


def scorecard_of(key: tuple[str, str, str], rows: Sequence[Row], card: dict[str, Any] | None,
                 alpha: float, intervals: bool = True) -> Scorecard:
    def arrays(subset: Sequence[Row]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.array([r.label for r in subset], dtype=int),
                np.array([r.predicted for r in subset], dtype=int),
                np.array([r.score for r in subset], dtype=float))

    overall = figures(*arrays(rows), intervals=intervals)
    weeks = {week: figures(*arrays([r for r in rows if r.week == week]), intervals=intervals)
             for week in sorted({r.week for r in rows})}
    reference = card_reference(card)
    return Scorecard(*key, overall=overall, weeks=weeks, reference=reference,
                     alerts=alerts_for(overall, reference, alpha), rows=list(rows),
                     validation_histogram=(card or {}).get("validation_score_histogram"))


def build(sessions: sessionmaker[Session], settings: Settings, intervals: bool = True) -> list[Scorecard]:
    """Every version's scorecard per site, from the database; alerts are logged (rate-limited)."""
    with sessions() as session:
        grouped = labelled_rows(session)
        cards = {(name, version): card for name, version, card in session.execute(
            select(ModelVersionRow.name, ModelVersionRow.version, ModelVersionRow.card))}
    found = [scorecard_of(key, rows, cards.get(key[:2]), settings.scorecard_alert_p, intervals)
             for key, rows in sorted(grouped.items())]
    for card in found:
        for alert in card.alerts:
            _log_alert(f"{card.model_name}@{card.model_version} site {card.site}", alert)
    return found


_last_logged: dict[str, float] = {}
ALERT_LOG_EVERY_S = 3600.0


def _log_alert(what: str, alert: str) -> None:
    """A WARNING per alert, at most hourly per process (the page and /metrics recompute often)."""
    key = f"{what} {alert.split(' ', 1)[0]}"
    now = time.monotonic()
    if now - _last_logged.get(key, -ALERT_LOG_EVERY_S) >= ALERT_LOG_EVERY_S:
        _last_logged[key] = now
        log.warning("scorecard alert: %s: %s", what, alert)


def _pct(value: Interval) -> str:
    if value.value is None:
        return "n/a"
    counts = f" {value.k}/{value.n}" if value.n is not None else ""
    return f"{value.value:.3f} [{value.low:.3f}, {value.high:.3f}]{counts}"


def render_text(cards: Sequence[Scorecard]) -> str:
    if not cards:
        return "no labelled study has a result yet (pneumo labels import, the HL7 listener, the dashboard)"
    lines = [f"study level: {STUDY_RULE}"]
    for card in cards:
        lines.append(f"\n{card.model_name}@{card.model_version} site {card.site}: "
                     f"reference {card.reference['source']}")
        for period, fig in [("overall", card.overall), *card.weeks.items()]:
            lines.append(f"  {period:>8}: n {fig.n} ({fig.positives} pos) sens {_pct(fig.sensitivity)} "
                         f"spec {_pct(fig.specificity)} ppv {_pct(fig.ppv)} auc {_pct(fig.auc)} "
                         f"ece {_pct(fig.ece) if fig.ece.low is not None else 'n/a'}")
        lines.extend(f"  ALERT: {alert}" for alert in card.alerts)
    return "\n".join(lines)
