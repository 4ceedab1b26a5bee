"""`pneumo accept`: what one or more versions would do with a site's labelled studies.

For each version: how many images it refuses (header scope, pixel check, the worker's filters and
decoding) and why, and on the images it assesses the ROC AUC and, at the version's own card
threshold, accuracy, sensitivity and specificity; the same per view and per age band where the
site's labels.csv (or the DICOM headers) give them; ROC and reliability PNGs per version.

95% intervals: Wilson score intervals for the proportions (accuracy, sensitivity, specificity,
PPV, NPV: training.metrics), and for the ROC AUC a percentile bootstrap that resamples patients,
not images (1,000 resamples, fixed seed), because one patient's films are not independent: a
per-image interval (DeLong) would be too narrow where patients have several images.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from core import contract, registry
from training import metrics, site

BOOTSTRAP_RESAMPLES = 1000
AUC_INTERVAL_METHOD = "percentile bootstrap over patients ({} resamples, seed 0)"
PROPORTION_INTERVAL_METHOD = "Wilson score"
# Age bands (years, inclusive) reported where ages are known.
AGE_BANDS = ((0, 5, "0-5"), (6, 17, "6-17"), (18, 39, "18-39"), (40, 64, "40-64"), (65, None, "65+"))
UNKNOWN = "unknown"
METRIC_KEYS = ("roc_auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "brier", "ece")


def age_band(age_years: float | None) -> str:
    if age_years is None:
        return UNKNOWN
    years = int(age_years)
    for low, high, name in AGE_BANDS:
        if years >= low and (high is None or years <= high):
            return name
    return UNKNOWN  # a negative age: not a band


def reason_kind(reason: str) -> str:
    """A refusal reason without its per-image details (its first line, nothing in parentheses:
    scores, codec names), for counting."""
    kind = reason.strip().splitlines()[0] if reason.strip() else reason
    previous = None
    while previous != kind:  # nested parentheses, innermost first
        previous, kind = kind, re.sub(r"\s*\([^()]*\)", "", kind)
    return kind.strip().rstrip(":").strip()[:120]


def _fast_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half), as sklearn computes it."""
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_interval(
    labels: np.ndarray,
    scores: np.ndarray,
    patients: list[str],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> list[float | None]:
    """95% percentile-bootstrap interval of the ROC AUC, resampling patients with replacement."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if len(np.unique(labels)) < 2 or resamples <= 0:
        return [None, None]
    _, inverse = np.unique(np.asarray(patients, dtype=object).astype(str), return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]
    single = all(len(m) == 1 for m in members)
    order = np.array([m[0] for m in members]) if single else None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, len(members), len(members))
        index = order[pick] if single else np.concatenate([members[k] for k in pick])
        chosen = labels[index]
        if chosen.min() == chosen.max():
            continue  # one class only: no AUC
        values.append(_fast_auc(chosen, scores[index]))
    if not values:
        return [None, None]
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def summarize(
    labels: np.ndarray,
    probabilities: np.ndarray,
    reasons: list[str | None],
    patients: list[str],
    threshold: float,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, Any]:
    """n, refusals by kind, and the metrics on the assessed images (None where undefined)."""
    assessed = np.array([r is None for r in reasons], dtype=bool)
    n, refused = len(reasons), int((~assessed).sum())
    result: dict[str, Any] = {
        "n": n,
        "refused": refused,
        "refused_rate": refused / n if n else None,
        "refusals": dict(Counter(reason_kind(r) for r in reasons if r is not None).most_common()),
        "assessed": int(assessed.sum()),
        "assessed_normal": int((labels[assessed] == 0).sum()),
        "assessed_pneumonia": int((labels[assessed] == 1).sum()),
    }
    if not assessed.any():
        return {**result, **dict.fromkeys(METRIC_KEYS), "confusion_matrix": None,
                "ci95": {k: [None, None] for k in ("roc_auc", "accuracy", "sensitivity", "specificity")}}
    computed = metrics.compute_metrics(labels[assessed], probabilities[assessed], threshold)
    chosen_patients = [p for p, keep in zip(patients, assessed, strict=True) if keep]
    ci95 = {**computed["ci95"], "roc_auc": auc_interval(
        labels[assessed], probabilities[assessed], chosen_patients, resamples)}
    return {**result, **{k: computed[k] for k in METRIC_KEYS},
            "confusion_matrix": computed["confusion_matrix"], "ci95": ci95}


def subset(assessment: site.Assessment, mask: np.ndarray) -> site.Assessment:
    """The assessment restricted to the images where `mask` is true."""
    keep = np.flatnonzero(mask)
    return dataclasses.replace(
        assessment,
        labels=assessment.labels[keep],
        probabilities=assessment.probabilities[keep],
        scores=assessment.scores[keep],
        reasons=[assessment.reasons[i] for i in keep],
        ages=[assessment.ages[i] for i in keep],
        views=[assessment.views[i] for i in keep],
    )


def _file_name(path: Path, data_dir: Path) -> str:
    try:
        return str(path.relative_to(data_dir))
    except ValueError:
        return path.name


def _plot_prefix(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def version_report(
    assessment: site.Assessment,
    images: list[site.SiteImage],
    data_dir: Path,
    threshold: float | None = None,
    label: str | None = None,
    threshold_rule: str | None = None,
    plots_dir: Path | None = None,
    plot_prefix: str | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, Any]:
    """One version on the images of `assessment` (`images` in the same order).

    `threshold` defaults to the version's card threshold, `label` to its name@version.
    """
    version = assessment.version
    threshold = version.threshold if threshold is None else float(threshold)
    label = label or version.label
    patients = [i.patient_id for i in images]
    report: dict[str, Any] = {
        "model": label,
        "threshold": threshold,
        "threshold_rule": threshold_rule or version.card.threshold_rule,
        **summarize(assessment.labels, assessment.probabilities, assessment.reasons, patients,
                    threshold, resamples),
    }
    for key, values in (("by_view", [v or UNKNOWN for v in assessment.views]),
                        ("by_age_band", [age_band(a) for a in assessment.ages])):
        if all(v == UNKNOWN for v in values):
            continue  # the site does not say: no section
        order = [b[2] for b in AGE_BANDS] if key == "by_age_band" else sorted(set(values) - {UNKNOWN})
        groups = {}
        for group in [*order, UNKNOWN]:
            mask = np.array([v == group for v in values], dtype=bool)
            if mask.any():
                part = subset(assessment, mask)
                groups[group] = summarize(part.labels, part.probabilities, part.reasons,
                                          [p for p, m in zip(patients, mask, strict=True) if m],
                                          threshold, resamples)
        report[key] = groups
    assessed = assessment.assessed
    if plots_dir is not None:
        if len(np.unique(assessment.labels[assessed])) == 2:
            report["plots"] = [str(p) for p in metrics.save_plots(
                assessment.labels[assessed], assessment.probabilities[assessed], threshold,
                Path(plots_dir), plot_prefix or _plot_prefix(label))]
        else:
            report["plots"] = []
            report["plots_skipped"] = "the assessed images do not hold both classes"
    report["images"] = [
        {"file": _file_name(image.path, Path(data_dir)),
         "label": contract.LABELS[image.label],
         "patient_id": image.patient_id,
         "probability": None if math.isnan(p) else float(p),
         "pixel_score": None if math.isnan(s) else float(s),
         "reason": reason}
        for image, p, s, reason in zip(images, assessment.probabilities, assessment.scores,
                                       assessment.reasons, strict=True)
    ]
    return report


def default_out_dir(data_dir: Path) -> Path:
    return Path.cwd() / f"accept-{Path(data_dir).resolve().name}"


def accept(
    specs: list[str],
    data_dir: Path,
    models_dir: Path = registry.DEFAULT_MODELS_DIR,
    out_dir: Path | None = None,
    decode_dicom: site.DicomDecoder | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, Any]:
    """The site acceptance report of every version in `specs` (name[@version]) on `data_dir`."""
    data_dir = Path(data_dir)
    for spec in specs:
        registry.resolve(spec, models_dir)  # a wrong name fails before any image is read
    images = site.read_site(data_dir)
    loaded = site.load(images, decode_dicom)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(data_dir)
    versions = [
        version_report(site.assess(spec, loaded, models_dir), images, data_dir,
                       plots_dir=out_dir, resamples=resamples)
        for spec in specs
    ]
    return clean({
        **site_header(data_dir, images, resamples),
        "plots_dir": str(out_dir),
        "versions": versions,
    })


def site_header(data_dir: Path, images: list[site.SiteImage], resamples: int) -> dict[str, Any]:
    return {
        "data": str(data_dir),
        "site_fingerprint": site.fingerprint(images),
        "n": len(images),
        "patients": len({i.patient_id for i in images}),
        "interval_methods": {
            "proportions": PROPORTION_INTERVAL_METHOD,
            "roc_auc": AUC_INTERVAL_METHOD.format(resamples),
        },
    }


def clean(value: Any) -> Any:
    """JSON-safe: NaN becomes None (null), numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# --- the plain text table ---------------------------------------------------------------------

def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _with_interval(summary: dict[str, Any], key: str) -> str:
    low, high = summary.get("ci95", {}).get(key, [None, None])
    text = _number(summary.get(key))
    if low is not None and high is not None:
        text += f" ({low:.2f}-{high:.2f})"
    return text


def _rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    rate = summary["refused_rate"]
    return [
        ("n", f"{summary['n']}"),
        ("refused", f"{summary['refused']} ({rate:.1%})" if rate is not None else "-"),
        ("assessed (normal/pneu.)", f"{summary['assessed']} ({summary['assessed_normal']}/"
                                    f"{summary['assessed_pneumonia']})"),
        *[(key, _with_interval(summary, key))
          for key in ("roc_auc", "accuracy", "sensitivity", "specificity")],
    ]


def format_report(report: dict[str, Any]) -> str:
    """The versions side by side: overall, per view, per age band; then refusals and plots."""
    versions = report["versions"]
    width = max(26, *(len(v["model"]) + 2 for v in versions))
    lines = [
        f"site {report['data']}: {report['n']} images, {report['patients']} patients, "
        f"fingerprint {report['site_fingerprint'][:12]}",
        f"95% intervals: {report['interval_methods']['proportions']} (proportions), "
        f"{report['interval_methods']['roc_auc']} (ROC AUC)",
        "",
        f"{'':<37}" + "".join(f"{v['model']:<{width}}" for v in versions),
        f"{'threshold':<37}" + "".join(f"{_number(v['threshold']):<{width}}" for v in versions),
    ]
    sections: list[tuple[str, list[dict[str, Any] | None]]] = [("all images", versions)]
    for key, title in (("by_view", "view"), ("by_age_band", "age")):
        names: list[str] = []
        for v in versions:
            names += [g for g in v.get(key, {}) if g not in names]
        sections += [(f"{title} {g}", [v.get(key, {}).get(g) for v in versions]) for g in names]
    for title, summaries in sections:
        present = [s for s in summaries if s is not None]
        rows = _rows(present[0])
        if not any(s["assessed"] for s in present):
            rows = rows[:2]  # nothing assessed: no metrics to show
        for index, (row_name, _) in enumerate(rows):
            head = f"{title if index == 0 else '':<13}{row_name:<24}"
            cells = [(_rows(s)[index][1] if s is not None else "-") for s in summaries]
            lines.append(head + "".join(f"{c:<{width}}" for c in cells))
    lines.append("")
    for v in versions:
        if v["refusals"]:
            lines.append(f"{v['model']} refused:")
            lines += [f"  {count:>5}  {kind}" for kind, count in v["refusals"].items()]
        if v.get("plots"):
            lines.append(f"{v['model']} plots: {', '.join(v['plots'])}")
        elif v.get("plots_skipped"):
            lines.append(f"{v['model']} plots: none ({v['plots_skipped']})")
    return "\n".join(lines).rstrip()
