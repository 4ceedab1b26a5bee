"""The label a free-text radiology report gives, when the RIS sends no coded finding.

The rule (one place, stated in docs/labels.md):
1. The report is split into sentences (spaCy's rule-based sentencizer on a blank English
   pipeline: nothing is downloaded). Sentences of the indication, history, comparison and
   technique sections are skipped: "evaluate for pneumonia" is the question, not the answer.
2. Mentions of the finding are matched as phrases (PNEUMONIA_TERMS: pneumonia, consolidation,
   airspace disease, infiltrate, ...), case-insensitive.
3. Each mention is tested with NegEx (negspacy, its clinical termset plus the radiology phrases in
   EXTRA_NEGATIONS) for negation, and with a second NegEx pass over hedging cues (HEDGES) for
   uncertainty, hedging first: "cannot exclude pneumonia" is uncertain, not negative.
4. The report is PNEUMONIA if any mention is neither hedged nor negated; otherwise no label if any
   mention is hedged; otherwise NORMAL (every mention negated, or none at all).
Error rate on the hand-written sentences of tests/ops/data/report_sentences.csv:
tests/ops/test_report_text.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import spacy
from negspacy.negation import Negex  # noqa: F401 - registers the "negex" factory
from negspacy.termsets import termset
from spacy.language import Language

from core.contract import NEGATIVE_CLASS, POSITIVE_CLASS

PNEUMONIA_TERMS = [
    "pneumonia", "pneumonias", "bronchopneumonia", "pneumonic", "consolidation", "consolidations",
    "consolidative opacity", "consolidative opacities", "airspace disease", "air space disease",
    "airspace opacity", "airspace opacities", "air space opacity", "air space opacities",
    "airspace consolidation", "infiltrate", "infiltrates", "lobar pneumonia", "infectious process",
]
# Radiology phrasing that NegEx's clinical termset lacks.
EXTRA_NEGATIONS = {
    "preceding_negations": ["no focal", "no acute", "no new", "no convincing", "clear of",
                            "resolution of", "resolved", "interval resolution of", "negative for"],
    "following_negations": ["is not seen", "are not seen", "not seen", "not identified",
                            "is absent", "are absent", "has resolved", "have resolved", "resolved",
                            "is not present", "are not present", "not present", "has cleared"],
    "pseudo_negations": [],
    "termination": [";"],
}
HEDGES = {
    "preceding_negations": ["possible", "possibly", "probable", "may represent", "may be",
                            "could represent", "could be", "cannot exclude", "can not exclude",
                            "cannot rule out", "can not rule out", "not excluded", "suspicious for",
                            "concerning for", "questionable", "question of", "equivocal",
                            "differential includes", "versus", "vs", "early", "developing",
                            "atelectasis or", "atelectasis versus", "may reflect", "might represent",
                            "raising the possibility of", "suggestive of", "suspected", "borderline"],
    "following_negations": ["cannot be excluded", "can not be excluded", "not excluded",
                            "is not excluded", "not entirely excluded", "is possible", "not ruled out",
                            "cannot be ruled out", "is suspected", "or atelectasis", "versus atelectasis",
                            "not excluded.", "is questioned"],
    "pseudo_negations": [],
    "termination": ["but", "however", "although", ";"],
}
SKIPPED_SECTIONS = re.compile(
    r"^\s*(indication|history|clinical history|clinical information|reason for (exam|study)|"
    r"comparison|technique|exam|examination)\s*:", re.IGNORECASE)
SECTION = re.compile(r"^\s*[a-z][a-z ]{2,30}:", re.IGNORECASE)
ENTITY = "FINDING"


@cache
def pipeline() -> Language:
    """The blank pipeline: sentencizer, phrase rules for the finding, hedging then negation."""
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    ruler = nlp.add_pipe("entity_ruler", config={"phrase_matcher_attr": "LOWER"})
    ruler.add_patterns([{"label": ENTITY, "pattern": term} for term in PNEUMONIA_TERMS])  # type: ignore[attr-defined]
    clinical = termset("en_clinical")
    clinical.add_patterns(EXTRA_NEGATIONS)
    nlp.add_pipe("negex", name="hedges", config={"neg_termset": HEDGES, "extension_name": "hedged"})
    nlp.add_pipe("negex", name="negations", config={"neg_termset": clinical.get_patterns()})
    return nlp


@dataclass
class TextLabel:
    """The label a text gives (None: uncertain) and the mentions that decided it."""

    label: str | None
    present: int
    hedged: int
    negated: int

    @property
    def rule(self) -> str:
        return (f"report text: {self.present} affirmed, {self.hedged} hedged, {self.negated} negated "
                f"mention(s) of pneumonia")


def findings_text(report: str) -> str:
    """The report without the lines of sections that state the question, not the finding."""
    kept, skipping = [], False
    for line in report.splitlines():
        if SKIPPED_SECTIONS.match(line):
            skipping = True
        elif SECTION.match(line):
            skipping = False
        if not skipping:
            kept.append(line)
    return "\n".join(kept)


def label_text(report: str) -> TextLabel:
    """Apply the rule of this module's docstring to one report (or one sentence)."""
    doc = pipeline()(findings_text(report))
    present = hedged = negated = 0
    for mention in doc.ents:
        if mention.label_ != ENTITY:
            continue
        if mention._.hedged:
            hedged += 1
        elif mention._.negex:
            negated += 1
        else:
            present += 1
    label = POSITIVE_CLASS if present else (None if hedged else NEGATIVE_CLASS)
    return TextLabel(label, present, hedged, negated)
