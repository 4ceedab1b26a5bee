"""Shadow and silent versions: how a candidate agrees with the served version on the same images,
and whether it is worse on the site's labelled studies (the evidence `pneumo models promote` asks).

Agreement is per image with a result from both versions: % agree and Cohen's kappa (scikit-learn).
The promotion check is paired, per labelled study (its decision: any image at or above the
version's threshold): an exact one-sided McNemar test on the discordant studies, separately among
positives (sensitivity) and negatives (specificity), each at alpha/2 (Bonferroni for the two).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from core import registry
from core.contract import POSITIVE_CLASS
from core.db import (
    Instance,
    ModelVersionRow,
    Result,
    audit,
    insert_ignoring_duplicates,
    utcnow,
)
from ops.labels import current_labels

ALPHA = 0.05  # one-sided, shared by the two tests (each at ALPHA / 2)


@dataclass(frozen=True)
class Agreement:
    """A candidate against the served version on the images both classified."""

    model_name: str
    served_version: str
    candidate_version: str
    images: int  # with a result from both
    agree: int
    percent_agree: float | None  # None without images
    kappa: float | None  # None where undefined (no images, or one label throughout both)
    served_positive: int
    candidate_positive: int
    served_only: int  # served results the candidate has none for (it refused or failed them)

    def dump(self) -> dict[str, Any]:
        return asdict(self)


def agreement_of(served: Sequence[str], candidate: Sequence[str]) -> tuple[float | None, float | None]:
    """(% agree, Cohen's kappa) of two label sequences over the same images."""
    if len(served) != len(candidate):
        raise ValueError("the two versions' labels must be for the same images")
    if not served:
        return None, None
    percent = 100.0 * sum(s == c for s, c in zip(served, candidate, strict=True)) / len(served)
    if len(set(served) | set(candidate)) < 2:
        return percent, None  # kappa is 0/0: both said the same one label every time
    kappa = float(cohen_kappa_score(list(served), list(candidate)))
    return percent, (None if math.isnan(kappa) else kappa)


def agreement(session: Session, name: str, served_version: str, candidate_version: str) -> Agreement:
    """Agreement of two versions of `name` on every image both have a result for."""
    served, candidate = aliased(Result), aliased(Result)
    rows = session.execute(
        select(served.label, candidate.label)
        .join(candidate, and_(candidate.instance_id == served.instance_id,
                              candidate.model_name == name,
                              candidate.model_version == candidate_version), isouter=True)
        .where(served.model_name == name, served.model_version == served_version)
    ).all()
    paired = [(s, c) for s, c in rows if c is not None]
    percent, kappa = agreement_of([s for s, _ in paired], [c for _, c in paired])
    return Agreement(
        name, served_version, candidate_version, len(paired),
        sum(s == c for s, c in paired), percent, kappa,
        sum(s == POSITIVE_CLASS for s, _ in paired), sum(c == POSITIVE_CLASS for _, c in paired),
        len(rows) - len(paired),
    )


def shadow_report(session: Session, models_dir: Path) -> list[Agreement]:
    """Each candidate in the registry against its model's served version."""
    served = registry.served_versions(models_dir)
    return [agreement(session, name, served[name], version)
            for name, version in sorted(registry.candidate_versions(models_dir).items())
            if name in served]


# --- the promotion check ------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedCheck:
    """Both versions on the same labelled studies; `refuse` with the reason when the candidate is
    worse beyond noise or there is nothing to judge it on."""

    studies: int
    positives: int
    negatives: int
    served_sensitivity: float | None
    candidate_sensitivity: float | None
    served_specificity: float | None
    candidate_specificity: float | None
    p_sensitivity_worse: float | None  # exact one-sided McNemar among positives
    p_specificity_worse: float | None  # the same among negatives
    refuse: bool
    reason: str
    method: str = field(default=f"exact one-sided McNemar per class, each at alpha {ALPHA / 2}")

    def dump(self) -> dict[str, Any]:
        return asdict(self)


def _worse_p(truth: Sequence[int], served: Sequence[int], candidate: Sequence[int]) -> float | None:
    """P(at least this many studies the served version got right and the candidate wrong, of the
    discordant ones) if neither were better; None without studies."""
    if not truth:
        return None
    served_only = sum(s == t != c for t, s, c in zip(truth, served, candidate, strict=True))
    candidate_only = sum(c == t != s for t, s, c in zip(truth, served, candidate, strict=True))
    if served_only + candidate_only == 0:
        return 1.0
    return float(binomtest(served_only, served_only + candidate_only, 0.5, "greater").pvalue)


def _rate(truth: Sequence[int], decided: Sequence[int], of: int) -> float | None:
    picked = [d for t, d in zip(truth, decided, strict=True) if t == of]
    return sum(d == of for d in picked) / len(picked) if picked else None


def paired_check(
    served: Sequence[tuple[int, float]], candidate: Sequence[tuple[int, float]],
    served_threshold: float, candidate_threshold: float, alpha: float = ALPHA,
) -> PairedCheck:
    """Judge a candidate on per-study (label 1/0, score) pairs, aligned with the served version's
    (same studies, same order); a study is positive at or above the version's threshold."""
    if [label for label, _ in served] != [label for label, _ in candidate]:
        raise ValueError("served and candidate pairs must be the same studies, in the same order")
    truth = [int(label) for label, _ in served]
    said_served = [int(score >= served_threshold) for _, score in served]
    said_candidate = [int(score >= candidate_threshold) for _, score in candidate]
    per_class = {}
    for of in (1, 0):
        rows = [i for i, t in enumerate(truth) if t == of]
        per_class[of] = _worse_p([truth[i] for i in rows], [said_served[i] for i in rows],
                                 [said_candidate[i] for i in rows])
    positives, negatives = sum(truth), len(truth) - sum(truth)
    if not positives or not negatives:
        refuse, reason = True, (f"{positives} positive and {negatives} negative labelled studies "
                                f"with results from both versions: too few to judge the candidate")
    elif min(p for p in per_class.values() if p is not None) < alpha / 2:
        worse = [what for what, p in (("sensitivity", per_class[1]), ("specificity", per_class[0]))
                 if p is not None and p < alpha / 2]
        refuse, reason = True, f"candidate's {' and '.join(worse)} worse beyond noise"
    else:
        refuse, reason = False, "not worse beyond noise"
    return PairedCheck(
        len(truth), positives, negatives,
        _rate(truth, said_served, 1), _rate(truth, said_candidate, 1),
        _rate(truth, said_served, 0), _rate(truth, said_candidate, 0),
        per_class[1], per_class[0], refuse, reason,
    )


def study_labels(session: Session) -> dict[int, int]:
    """Study id -> the site's current label (ops.labels: the latest naming the study), 1 pneumonia."""
    return {sid: int(current.label == POSITIVE_CLASS) for sid, current in current_labels(session).items()}


def study_scores(session: Session, name: str, version: str) -> dict[int, float]:
    """Study id -> the highest probability of the version's results in it (ops.scorecard's rule:
    a study is positive when any image is)."""
    rows = session.execute(
        select(Instance.study_id, func.max(Result.probability)).join(Instance)
        .where(Result.model_name == name, Result.model_version == version)
        .group_by(Instance.study_id))
    return {study: float(score) for study, score in rows}


def promotion_check(session: Session, served: registry.ModelVersion,
                    candidate: registry.ModelVersion) -> PairedCheck:
    """The paired check on every labelled study both versions have results for."""
    labels = study_labels(session)
    served_scores = study_scores(session, served.name, served.version)
    tried = study_scores(session, candidate.name, candidate.version)
    common = sorted(set(labels) & set(served_scores) & set(tried))
    return paired_check([(labels[s], served_scores[s]) for s in common],
                        [(labels[s], tried[s]) for s in common],
                        served.threshold, candidate.threshold)


# --- what is shown and recorded -----------------------------------------------------------------

PROMOTIONS_FILE = "promotions.jsonl"  # beside served.json: one JSON line per promotion, appended


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def describe(agreement: Agreement, check: PairedCheck) -> str:
    """A candidate's shadow figures as a few lines for a terminal."""
    a, c = agreement, check
    kappa = "undefined" if a.kappa is None else f"{a.kappa:.3f}"
    agree = "-" if a.percent_agree is None else f"{a.percent_agree:.1f}%"
    return "\n".join([
        f"{a.model_name}@{a.candidate_version} (candidate) vs @{a.served_version} (served)",
        f"  agreement on {a.images} image(s) both classified: {agree} agree, Cohen's kappa {kappa}; "
        f"positive: served {a.served_positive}, candidate {a.candidate_positive}; "
        f"{a.served_only} classified by the served version only",
        f"  labelled studies {c.studies} ({c.positives} positive, {c.negatives} negative): "
        f"sensitivity served {_percent(c.served_sensitivity)}, candidate "
        f"{_percent(c.candidate_sensitivity)}; specificity served {_percent(c.served_specificity)}, "
        f"candidate {_percent(c.candidate_specificity)}",
        f"  check ({c.method}): {c.reason}",
    ])


def promotion_record(served: registry.ModelVersion, candidate: registry.ModelVersion, by: str,
                     forced: bool, silent: bool, check: PairedCheck, agreement: Agreement) -> dict:
    """Who promoted (or tried to) what in place of what, and the evidence it was judged on."""
    return {
        "at": utcnow().isoformat(timespec="seconds") + "Z", "by": by, "model": candidate.name,
        "from_version": served.version, "to_version": candidate.version,
        "outcome": "refused" if check.refuse and not forced else "promoted",
        "forced": forced and check.refuse, "silent": silent,
        "check": check.dump(), "agreement": agreement.dump(),
    }


def audit_promotion(session: Session, candidate: registry.ModelVersion, record: dict) -> None:
    """An audit row on the candidate's `model_versions` row (added if it never ran)."""
    session.execute(insert_ignoring_duplicates(session, ModelVersionRow).values(
        name=candidate.name, version=candidate.version, model_sha256=candidate.card.model_sha256,
        threshold=candidate.threshold, card=candidate.card.dump(exclude={"training"})))
    row_id = session.scalar(select(ModelVersionRow.id).where(
        ModelVersionRow.name == candidate.name, ModelVersionRow.version == candidate.version))
    check = record["check"]
    audit(session, "model", int(row_id or 0), "promotion " + record["outcome"],
          f"{record['model']}@{record['from_version']} -> @{record['to_version']} by {record['by']}"
          f"{' (forced)' if record['forced'] else ''}{' silent' if record['silent'] else ''}: "
          f"{check['reason']} ({check['studies']} labelled studies); agreement "
          f"{record['agreement']['percent_agree']}% on {record['agreement']['images']} images")


def record_promotion(models_dir: Path, record: dict) -> Path:
    """Append the record to the registry's promotions log, beside served.json."""
    path = Path(models_dir) / PROMOTIONS_FILE
    with path.open("a") as log:
        log.write(json.dumps(record, sort_keys=True) + "\n")
    return path


def promotions(models_dir: Path) -> list[dict]:
    path = Path(models_dir) / PROMOTIONS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
