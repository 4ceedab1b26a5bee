"""The scorecard's plots as inline SVG (matplotlib on the server; the dashboard runs no script):
ROC with the operating point, reliability with Wilson intervals, weekly sensitivity and
specificity with intervals, and the site's study scores against the card's validation histogram.
Each SVG is wrapped by ops.charts (role, title, a description in words); no data: its empty state.
"""

from __future__ import annotations

import io

import numpy as np
from markupsafe import Markup
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from core.contract import SCORE_BINS, score_edges
from ops.charts import COLOURS, DRAWING, _wrap, empty_chart
from ops.scorecard import Interval, Scorecard

_count = iter(range(1, 10**9))
SIZE_IN = (4.2, 3.0)


def _render(title: str, desc: str, draw) -> Markup:
    # DRAWING: matplotlib's rc settings are global; two threads drawing at once spoil each other's.
    with DRAWING, rc_context({"svg.fonttype": "none", "font.size": 8, "axes.spines.top": False,
                              "axes.spines.right": False}):
        figure = Figure(figsize=SIZE_IN, layout="constrained")
        axes: Axes = figure.add_subplot()
        draw(axes)
        axes.set_title(title, loc="left", fontsize=9, fontweight="bold")
        axes.grid(color="#e5e5e5", linewidth=0.6)
        axes.set_axisbelow(True)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    return _wrap(buffer.getvalue(), f"scorecard-chart-{next(_count)}", title, desc)


def _arrays(card: Scorecard) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([r.label for r in card.rows], dtype=int), np.array([r.score for r in card.rows]))


def roc(card: Scorecard) -> Markup:
    title = "ROC (study level)"
    labels, scores = _arrays(card)
    if card.overall.auc.value is None:
        return empty_chart(title, "needs labelled studies of both classes")
    fpr, tpr, _ = roc_curve(labels, scores)
    sens, spec = card.overall.sensitivity.value, card.overall.specificity.value
    auc = card.overall.auc

    def draw(axes: Axes) -> None:
        axes.plot(fpr, tpr, color=COLOURS[0], linewidth=1.4, label=f"site AUC {auc.value:.3f}")
        axes.plot([0, 1], [0, 1], color="#999", linewidth=0.8, linestyle=":")
        if sens is not None and spec is not None:
            axes.plot([1 - spec], [sens], "o", color=COLOURS[1], label="at the threshold")
        axes.set_xlabel("1 - specificity")
        axes.set_ylabel("sensitivity")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.legend(loc="lower right", fontsize=7, frameon=False)

    return _render(title, f"AUC {auc.value:.3f} (95% {auc.low:.3f} to {auc.high:.3f}) on "
                          f"{card.overall.n} studies", draw)


def reliability(card: Scorecard) -> Markup:
    title = "Reliability (observed vs predicted)"
    bins = card.overall.reliability
    if not bins:
        return empty_chart(title, "no labelled studies")
    x = [b["mean_score"] for b in bins]
    y = [b["observed"]["value"] for b in bins]
    low = [b["observed"]["value"] - b["observed"]["low"] for b in bins]
    high = [b["observed"]["high"] - b["observed"]["value"] for b in bins]

    def draw(axes: Axes) -> None:
        axes.plot([0, 1], [0, 1], color="#999", linewidth=0.8, linestyle=":")
        axes.errorbar(x, y, yerr=[low, high], fmt="o", color=COLOURS[0], markersize=3, capsize=2,
                      linewidth=1)
        axes.set_xlabel("mean score in bin")
        axes.set_ylabel("observed pneumonia rate")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)

    ece = card.overall.ece
    return _render(title, f"ECE {ece.value:.3f} over {len(bins)} non-empty bins" if ece.value is not None
                   else f"{len(bins)} bins", draw)


def weekly(card: Scorecard) -> Markup:
    title = "Per ISO week: sensitivity, specificity (95% CI)"
    weeks = list(card.weeks)
    if not weeks:
        return empty_chart(title, "no labelled studies")
    positions = np.arange(len(weeks))

    def series(name: str) -> tuple[list[float], list[list[float]]]:
        values: list[Interval] = [getattr(card.weeks[w], name) for w in weeks]
        centre = [v.value if v.value is not None else np.nan for v in values]
        errors = [[v.value - v.low if v.value is not None and v.low is not None else 0 for v in values],
                  [v.high - v.value if v.value is not None and v.high is not None else 0 for v in values]]
        return centre, errors

    def draw(axes: Axes) -> None:
        for offset, (name, colour) in zip((-0.08, 0.08), (("sensitivity", COLOURS[0]),
                                                         ("specificity", COLOURS[1])), strict=True):
            centre, errors = series(name)
            axes.errorbar(positions + offset, centre, yerr=errors, fmt="o-", color=colour, markersize=3,
                          capsize=2, linewidth=1, label=name)
            expected = card.reference.get(name)
            if expected is not None:
                axes.axhline(float(expected), color=colour, linewidth=0.8, linestyle="--")
        axes.set_xticks(positions, weeks)
        axes.set_xlim(-0.5, len(weeks) - 0.5)
        axes.set_ylim(0, 1.02)
        axes.set_ylabel("proportion (dashed: card)")
        axes.legend(loc="lower left", fontsize=7, frameon=False)

    last = card.weeks[weeks[-1]]
    desc = "; ".join(f"{name} {getattr(last, name).value:.3f} in {weeks[-1]}"
                     for name in ("sensitivity", "specificity") if getattr(last, name).value is not None)
    return _render(title, desc or f"{len(weeks)} weeks", draw)


def histogram(card: Scorecard) -> Markup:
    title = "Study scores vs the card's validation scores"
    _, scores = _arrays(card)
    if not len(scores):
        return empty_chart(title, "no labelled studies")
    edges = score_edges(SCORE_BINS)
    site = np.histogram(np.clip(scores, 0, 1), bins=edges)[0].astype(float)
    reference = np.array(card.validation_histogram or [], dtype=float)

    def draw(axes: Axes) -> None:
        axes.stairs(site / site.sum(), edges, color=COLOURS[0], linewidth=1.4,
                    label=f"site ({len(scores)} studies)")
        if reference.size == SCORE_BINS and reference.sum():
            axes.stairs(reference / reference.sum(), edges, color=COLOURS[1], linewidth=1.2,
                        linestyle="--", label="card validation")
        axes.set_xlabel("probability of pneumonia")
        axes.set_ylabel("fraction")
        axes.set_xlim(0, 1)
        axes.legend(loc="upper center", fontsize=7, frameon=False)

    note = "" if reference.size == SCORE_BINS else "; the card has no validation histogram"
    return _render(title, f"{len(scores)} study scores in {SCORE_BINS} bins{note}", draw)


def plots(card: Scorecard) -> list[Markup]:
    return [roc(card), reliability(card), weekly(card), histogram(card)]
