"""Labels from the site: what a study showed, by the RIS report (ops/hl7_listener.py), a CSV
(`pneumo labels import`) or a dashboard click (ops/labels_web.py), so the scorecard measures each
version on the site's own reads.

Every label is a new row (history kept) and an audit event; the current label of a study is the
one received last (ties: the later row). A label names its study by Study Instance UID or
Accession Number as given: it may arrive before the images, and is joined to them when read.
Logs carry label ids, sources and counts, never the identifiers or a report's text.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import and_, exists, or_, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from core.contract import LABELS, NEGATIVE_CLASS, POSITIVE_CLASS
from core.db import Label, LabelSource, Study, audit

log = logging.getLogger(__name__)

# Words a site writes for the two contract labels (case-insensitive).
LABEL_WORDS = {
    POSITIVE_CLASS: {"pneumonia", "positive", "pos", "1", "yes", "true"},
    NEGATIVE_CLASS: {"normal", "negative", "neg", "0", "no", "false"},
}
MAX_UID = 64  # DICOM UI and our columns
MAX_WHO = 128


class LabelError(ValueError):
    """A label that cannot be recorded, with the reason in words an operator can act on."""


def parse_label(text: str) -> str:
    """The contract label (core.contract.LABELS) a site's word means; LabelError otherwise."""
    word = text.strip().lower()
    for label, words in LABEL_WORDS.items():
        if word in words or word == label.lower():
            return label
    raise LabelError(f"label {text.strip()[:20]!r} is neither pneumonia nor normal")


def record_label(session: Session, *, label: str, source: LabelSource, who: str, evidence: str,
                 study_instance_uid: str | None = None, accession_number: str | None = None) -> Label:
    """Add a label (never replaces one) and its audit event; the caller commits."""
    if label not in LABELS:
        raise LabelError(f"label must be one of {', '.join(LABELS)}")
    uid = (study_instance_uid or "").strip() or None
    accession = (accession_number or "").strip() or None
    if uid is None and accession is None:
        raise LabelError("neither a Study Instance UID nor an Accession Number")
    if uid is not None and (len(uid) > MAX_UID or not all(c.isdigit() or c == "." for c in uid)):
        raise LabelError("the Study Instance UID is not a DICOM UID (digits and dots, at most 64)")
    if accession is not None and len(accession) > 16:
        raise LabelError("the Accession Number is longer than 16 characters (DICOM SH)")
    row = Label(study_instance_uid=uid, accession_number=accession, label=label,
                source=str(source), who=who.strip()[:MAX_WHO] or "unknown", evidence=evidence)
    session.add(row)
    session.flush()
    audit(session, "label", row.id, "labelled", f"{source}: {label} by {row.who}; {evidence}")
    log.info("label %d recorded: %s from %s", row.id, label, source)
    return row


@dataclass
class CurrentLabel:
    """A study's label now: the latest one naming it, and how many came before."""

    study_id: int
    label: str
    label_id: int
    source: str
    earlier: int


def current_labels(session: Session, study_ids: Iterable[int] | None = None) -> dict[int, CurrentLabel]:
    """Study id -> its current label, for the studies we hold that some label names: by Study
    Instance UID, or by Accession Number when the label has no UID or one we do not hold.
    `study_ids` limits it to those studies (a few; the scorecard reads all, with no list)."""
    other = aliased(Study)
    names = or_(Label.study_instance_uid == Study.study_instance_uid,
                and_(Label.accession_number == Study.accession_number,
                     or_(Label.study_instance_uid.is_(None),
                         ~exists().where(other.study_instance_uid == Label.study_instance_uid))))
    query = select(Study.id, Label.id, Label.label, Label.source).join(Label, names)
    if study_ids is not None:
        query = query.where(Study.id.in_(list(study_ids)))
    found: dict[int, CurrentLabel] = {}
    for sid, label_id, label, source in session.execute(query.order_by(Label.received_at, Label.id)):
        earlier = found[sid].earlier + 1 if sid in found else 0
        found[sid] = CurrentLabel(sid, label, label_id, source, earlier)
    return found


@dataclass
class ImportReport:
    imported: int = 0
    errors: list[str] = field(default_factory=list)


CSV_COLUMNS = ("study_instance_uid", "accession_number", "label")


def import_csv(sessions: sessionmaker[Session], path: Path, who: str) -> ImportReport:
    """Record each good row of a CSV (header: study_instance_uid, accession_number, label, and
    optionally who); a bad row is refused with its line and reason, the others are kept. All good
    rows are written in one transaction."""
    report = ImportReport()
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:12]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise LabelError(f"{path.name} is not UTF-8 text ({error.reason})") from None
    reader = csv.DictReader(text.splitlines())
    header = [name.strip().lower() for name in reader.fieldnames or []]
    if "label" not in header or not {"study_instance_uid", "accession_number"} & set(header):
        raise LabelError(f"{path.name}: the header must name label and study_instance_uid and/or "
                         f"accession_number (it has: {', '.join(header) or 'nothing'})")
    reader.fieldnames = header
    with sessions() as session, session.begin():
        for line, row in enumerate(reader, start=2):
            try:
                with session.begin_nested():
                    if None in row:
                        raise LabelError("more values than columns")
                    record_label(
                        session, label=parse_label(row.get("label") or ""), source=LabelSource.CSV,
                        who=(row.get("who") or "").strip() or who,
                        evidence=f"{path.name} line {line} (sha256 {digest})",
                        study_instance_uid=row.get("study_instance_uid"),
                        accession_number=row.get("accession_number"))
                report.imported += 1
            except LabelError as error:
                report.errors.append(f"line {line}: {error}")
    log.info("labels import: %d recorded, %d rows refused", report.imported, len(report.errors))
    return report
