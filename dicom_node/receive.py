"""Durable receive: spool file -> checks -> rename into storage -> one DB transaction -> status.

The C-STORE is answered success only after the file is in its final place and the instance row is
committed. Disk or database trouble answers 0xA700 so the sender retries, and leaves nothing
half-stored. Plain functions: the SCP handler and the tests call them directly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.db import Instance, InstanceState, Series, Study, audit, utcnow

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # sender should retry later
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    reason: str
    instance_id: int | None = None
    duplicate: bool = False


def valid_uid(value: object) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and bool(_UID.match(text))


def sha256_and_sync(path: Path) -> tuple[str, int]:
    """Hash the spool file and force it to disk (the file must survive a crash once we answer)."""
    digest = hashlib.sha256()
    with open(path, "rb+") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
        handle.flush()
        os.fsync(handle.fileno())
        size = handle.tell()
    return digest.hexdigest(), size


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def free_disk_mb(folder: Path) -> float:
    return shutil.disk_usage(folder).free / (1024 * 1024)


def store_instance(
    spool_path: Path,
    affected_sop_class_uid: str,
    affected_sop_instance_uid: str,
    calling_ae_title: str,
    storage_dir: Path,
    sessions: sessionmaker[Session],
    min_free_disk_mb: float = 0,
) -> StoreOutcome:
    """Store one received dataset (a complete Part 10 file at `spool_path`)."""
    if free_disk_mb(storage_dir) < min_free_disk_mb:
        return StoreOutcome(OUT_OF_RESOURCES, f"free disk below {min_free_disk_mb} MB floor")
    try:
        dataset = dcmread(spool_path, stop_before_pixels=True)
        study_uid = dataset.get("StudyInstanceUID")
        series_uid = dataset.get("SeriesInstanceUID")
        sop_uid = dataset.get("SOPInstanceUID")
        sop_class = dataset.get("SOPClassUID")
        transfer_syntax = str(dataset.file_meta.TransferSyntaxUID)
        modality = str(dataset.get("Modality", "") or "")[:16]
        accession = str(dataset.get("AccessionNumber", "") or "")[:64] or None
    except Exception as error:  # any parse failure: the peer sent something we cannot read
        return StoreOutcome(CANNOT_UNDERSTAND, f"not a readable DICOM dataset: {type(error).__name__}")
    for name, value in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                        ("SOPInstanceUID", sop_uid)):
        if not valid_uid(value):
            return StoreOutcome(CANNOT_UNDERSTAND, f"missing or invalid {name}")
    if str(sop_uid) != str(affected_sop_instance_uid) or str(sop_class) != str(affected_sop_class_uid):
        return StoreOutcome(
            DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class/Instance UID differ from the C-STORE request"
        )
    study_uid, series_uid, sop_uid = str(study_uid), str(series_uid), str(sop_uid)

    try:
        digest, size = sha256_and_sync(spool_path)
    except OSError as error:
        return StoreOutcome(OUT_OF_RESOURCES, f"cannot write spool file: {error.strerror}")

    try:
        with sessions() as session:
            existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))
            if existing is not None:
                return _duplicate(session, existing, digest)
    except SQLAlchemyError as error:
        return StoreOutcome(OUT_OF_RESOURCES, f"database unavailable: {type(error).__name__}")

    folder = storage_dir / study_uid / series_uid
    final_path = folder / f"{sop_uid}.{digest[:12]}.dcm"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(spool_path, final_path)
        _fsync_dir(folder)
    except OSError as error:
        return StoreOutcome(OUT_OF_RESOURCES, f"cannot store file: {error.strerror}")

    try:
        with sessions() as session, session.begin():
            instance_id = _record(
                session, study_uid, series_uid, sop_uid, str(sop_class), transfer_syntax, modality,
                accession, final_path, size, digest, calling_ae_title,
            )
    except IntegrityError:
        # Another association stored the same SOP Instance UID at the same moment.
        with sessions() as session:
            existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))
        if existing is not None and existing.path != str(final_path):
            final_path.unlink(missing_ok=True)
        if existing is None:
            final_path.unlink(missing_ok=True)
            return StoreOutcome(OUT_OF_RESOURCES, "database conflict while recording")
        return StoreOutcome(SUCCESS, "duplicate (concurrent)", existing.id, duplicate=True)
    except SQLAlchemyError as error:
        final_path.unlink(missing_ok=True)  # nothing half-stored: the sender will retry
        return StoreOutcome(OUT_OF_RESOURCES, f"database unavailable: {type(error).__name__}")
    return StoreOutcome(SUCCESS, "stored", instance_id)


def _duplicate(session: Session, existing: Instance, digest: str) -> StoreOutcome:
    """A re-sent SOP Instance UID: acknowledged, never classified twice."""
    same = existing.sha256 == digest
    event_name = "duplicate_received" if same else "conflicting_duplicate"
    detail = "identical content" if same else f"different content (sha256 {digest[:12]}), kept first"
    audit(session, "instance", existing.id, event_name, detail)
    session.commit()
    return StoreOutcome(SUCCESS, f"duplicate: {detail}", existing.id, duplicate=True)


def _record(
    session: Session, study_uid: str, series_uid: str, sop_uid: str, sop_class: str,
    transfer_syntax: str, modality: str, accession: str | None, path: Path, size: int,
    digest: str, calling_ae_title: str,
) -> int:
    now = utcnow()
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        study = Study(study_instance_uid=study_uid, accession_number=accession,
                      first_received_at=now, last_received_at=now)
        session.add(study)
        session.flush()
    else:
        study.last_received_at = now
    series = session.scalar(select(Series).where(Series.series_instance_uid == series_uid))
    if series is None:
        series = Series(study_id=study.id, series_instance_uid=series_uid, modality=modality)
        session.add(series)
        session.flush()
    instance = Instance(
        study_id=study.id, series_id=series.id, sop_instance_uid=sop_uid, sop_class_uid=sop_class,
        transfer_syntax_uid=transfer_syntax, path=str(path), size_bytes=size, sha256=digest,
        calling_ae_title=calling_ae_title[:16], state=InstanceState.RECEIVED, attempts=0,
        received_at=now,
    )
    session.add(instance)
    session.flush()
    audit(session, "instance", instance.id, "received", f"from {calling_ae_title}")
    return instance.id


def enqueue_after_commit(
    instance_id: int, sessions: sessionmaker[Session], enqueue: Callable[[int], None]
) -> bool:
    """Send the job; mark `queued` only if no worker has moved the instance on meanwhile.

    A broker failure is logged and left to the periodic sweep: the instance stays `received`.
    """
    try:
        enqueue(instance_id)
    except Exception as error:
        log.warning("instance %s recorded but not queued (%s); the sweep will queue it",
                    instance_id, type(error).__name__)
        return False
    with sessions() as session, session.begin():
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id, Instance.state == InstanceState.RECEIVED)
            .values(state=InstanceState.QUEUED, queued_at=utcnow())
        )
    return True
