"""Intended use: the population a model version was validated on, and the header rules from it.

A card's `scope.intended_use` names modalities, views, body part, an age range (where the training
data gives one) and the sites. An image whose header says it is outside (an adult for a model
validated on children, a PA film for one validated on AP films) is refused as out of scope before
its pixels are read; what the header does not say is left to the pixel check (training.ood).
Plain values in, a reason out: the worker feeds it DICOM headers, `pneumo accept` a labels.csv.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any

from core.card import IntendedUse

OUT_OF_SCOPE = "out of scope"  # the reason class (monitoring groups reasons by it)
# DICOM's AS is `nnnD/W/M/Y`; senders also write `81` or `81Y`: a bare number is read as years.
_AGE = re.compile(r"^(\d{1,3})\s*([DWMY]?)$")
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}

# What the Kermany set is (Kermany, Zhang, Goldbaum et al., Cell 2018): anterior-posterior chest
# radiographs of paediatric patients aged one to five, Guangzhou Women and Children's Medical Center.
KERMANY_SITE = {
    "name": "guangzhou-kermany",
    "population": "paediatric patients aged 1-5 years (Kermany et al. 2018), "
                  "Guangzhou Women and Children's Medical Center",
    "views": ["AP"],
    "age_years": [1, 5],
}


def age_in_years(patient_age: str | None, birth_date: str | None, study_date: str | None) -> float | None:
    """Patient's Age (`nnnD/W/M/Y`), else Birth Date against Study Date; None when unknown."""
    text = str(patient_age or "").strip().upper()
    match = _AGE.match(text)
    if match:
        return int(match.group(1)) * _UNIT_YEARS[match.group(2) or "Y"]
    born, seen = _dicom_date(birth_date), _dicom_date(study_date)
    if born and seen and seen >= born:
        return (seen - born).days / 365.25
    return None


def _dicom_date(value: str | None) -> date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def intended_use(sites: list[dict[str, Any]]) -> dict[str, Any]:
    """The card's intended use from its training sites: the union of their views and ages."""
    views = sorted({v for site in sites for v in site.get("views") or []})
    ranges = [site["age_years"] for site in sites if site.get("age_years")]
    known = len(ranges) == len(sites) and ranges
    return {
        "modalities": ["CR", "DX"],
        "body_part": "CHEST",
        "views": views,
        "age_years": [min(r[0] for r in ranges), max(r[1] for r in ranges)] if known else None,
        "sites": sites,
        "population": "; ".join(site["population"] for site in sites),
    }


def header_reason(use: IntendedUse | dict[str, Any], age_years: float | None,
                  view: str | None) -> str | None:
    """Why a known age or view is outside the intended use (a card's, or `intended_use()`'s);
    None when nothing says so."""
    use = IntendedUse.model_validate(use)
    age_range = use.age_years
    if age_years is not None and age_range:
        low, high = age_range
        if not low <= int(age_years) <= high:
            side = "above" if age_years > high else "below"  # never the age itself: it is PHI
            return f"{OUT_OF_SCOPE}: patient age {side} the validated range {low}-{high} years"
    views = use.views or []
    view = (view or "").strip().upper()
    if view and views and view not in views:
        return f"{OUT_OF_SCOPE}: view {view} not among the validated views {', '.join(views)}"
    return None


def pixel_reason(score: float, threshold: float, label: str) -> str:
    return (f"{OUT_OF_SCOPE}: image unlike those {label} was validated on "
            f"(pixel check score {score:.1f} > threshold {threshold:.1f})")
