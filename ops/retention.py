"""`pneumo retention`: free storage by removing stored images of studies that are finished.

A study qualifies when every image is in a terminal state and either its SRs were all delivered
more than N days ago, or none of its images was a chest radiograph (all ignored) and it arrived
more than N days ago. Database rows, results and the SR files stay: every result remains
traceable. The RIS's raw HL7 reports kept as label evidence (they name the patient) go after
the same N days; the label rows stay. Dry-run by default; `--apply` deletes and records an
audit event per study.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.db import (
    TERMINAL_STATES,
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    Study,
    audit,
    utcnow,
)
from worker.picture import kept_maps  # the heat maps kept beside each image

log = logging.getLogger(__name__)
REMOVED_EVENT = "images_removed"


@dataclass
class Candidate:
    study_id: int
    study_instance_uid: str
    files: list[Path]

    @property
    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files if path.exists())


def candidates(session: Session, older_than_days: float) -> list[Candidate]:
    cutoff = utcnow() - timedelta(days=older_than_days)
    unfinished = select(Instance.study_id).where(Instance.state.not_in(TERMINAL_STATES))
    undelivered = select(Delivery.study_id).where(Delivery.state != DeliveryState.DELIVERED)
    removed = select(AuditEvent.entity_id).where(
        AuditEvent.entity == "study", AuditEvent.event == REMOVED_EVENT)
    delivered_before = (
        select(Delivery.study_id).group_by(Delivery.study_id)
        .having(func.max(Delivery.delivered_at) <= cutoff))
    not_ignored = select(Instance.study_id).where(Instance.state != InstanceState.IGNORED)
    studies = session.scalars(
        select(Study).where(
            Study.id.not_in(unfinished), Study.id.not_in(undelivered), Study.id.not_in(removed),
            Study.id.in_(delivered_before)
            | (Study.id.not_in(not_ignored) & (Study.last_received_at <= cutoff)),
        ).order_by(Study.id)
    ).all()
    files = select(Instance.path)
    return [
        Candidate(study.id, study.study_instance_uid,
                  [Path(p) for p in session.scalars(files.where(Instance.study_id == study.id))])
        for study in studies
    ]


def old_reports(home: Path, older_than_days: float) -> list[Path]:
    """Raw HL7 reports (ops.hl7_listener keeps them under home/labels/hl7) older than N days."""
    cutoff = time.time() - older_than_days * 86400
    folder = home / "labels" / "hl7"
    return sorted(path for path in folder.glob("*.hl7") if path.stat().st_mtime <= cutoff) \
        if folder.is_dir() else []


def keep_content_digests(sessions: sessionmaker[Session], study_id: int, scratch: Path | None,
                         max_inflated_bytes: int) -> None:
    """Each image's content digest into its row before its file goes (the node computes it only
    when a re-send arrives, issue 21): a re-send in another transfer syntax after retention is
    still recognised as the same image, not refused as a conflict."""
    from dicom_node.receive import stored_content

    with sessions() as session, session.begin():
        missing = session.execute(select(Instance.id, Instance.path).where(
            Instance.study_id == study_id, Instance.content_sha256.is_(None))).all()
        for instance_id, path in missing:
            digest = stored_content(Path(path), max_inflated_bytes, scratch)
            if digest is not None:
                session.execute(update(Instance).where(Instance.id == instance_id)
                                .values(content_sha256=digest))


def remove(sessions: sessionmaker[Session], candidate: Candidate, scratch: Path | None = None,
           max_inflated_bytes: int = 512 << 20) -> int:
    """Delete one study's image files; returns bytes freed. Missing files are not an error.
    `scratch`, `max_inflated_bytes`: where and how far a deflated image is inflated for its digest
    (the node's spool and limit)."""
    keep_content_digests(sessions, candidate.study_id, scratch, max_inflated_bytes)
    freed = 0
    for path in [*candidate.files, *(kept for image in candidate.files for kept in kept_maps(image))]:
        try:
            size = path.stat().st_size
            path.unlink()
            freed += size
        except FileNotFoundError:
            continue
    for folder in {path.parent for path in candidate.files}:
        for empty in (folder, folder.parent):
            try:
                empty.rmdir()
            except OSError:
                break  # not empty, or gone
    with sessions() as session, session.begin():
        audit(session, "study", candidate.study_id, REMOVED_EVENT,
              f"{len(candidate.files)} file(s), {freed} bytes")
    log.info("retention: removed %d file(s) of study %s", len(candidate.files), candidate.study_instance_uid)
    return freed
