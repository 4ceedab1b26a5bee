"""Durable receive: spool file -> checks -> rename into storage -> one DB transaction -> status.

The C-STORE is answered success only after the file is in its final place and the instance row is
committed. Disk or database trouble answers 0xA700 so the sender retries, and leaves nothing
half-stored. Plain functions: the SCP handler and the tests call them directly.

Reasons start with a fixed class, then ': ' and the details (monitoring groups by the class).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.db import AuditEvent, Instance, InstanceState, RefusedStore, Series, Study, utcnow
from dicom_node import spool
from dicom_node.checks import (
    INVALID_UID,
    UID_KEYWORDS,
    dataset_problem,
    inflated_copy,
    nul_problem,
    valid_uid,
)
from dicom_node.content import Malformed, check_deferred, content_digest
from dicom_node.spool import too_large

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # sender should retry later
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210
CONFLICTING_DUPLICATE = 0xC211  # failure, "cannot understand" family: see _duplicate
CONFLICT_COMMENT = "SOP Instance UID already stored with other content"  # Error Comment, LO
TOO_LARGE_COMMENT = "Data set larger than this node's size limit"
DEFER_SIZE = 1 << 20  # larger values stay on disk while headers are read: memory bounded per store


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    reason: str
    instance_id: int | None = None
    duplicate: bool = False


def sha256_and_sync(path: Path) -> tuple[str, int]:
    """Hash the spool file and force it to disk (the file must survive a crash once we answer)."""
    with open(path, "rb+") as handle:
        digest = hashlib.file_digest(handle, "sha256")
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
    max_inflated_mb: int = 512,
    max_dataset_mb: int = 0,
) -> StoreOutcome:
    """Store one received dataset (a complete Part 10 file at `spool_path`)."""
    spool_error = spool.take_error(spool_path)
    if spool_error is not None:
        return StoreOutcome(OUT_OF_RESOURCES, spool_error)
    if max_dataset_mb and spool_path.stat().st_size > max_dataset_mb << 20:
        return StoreOutcome(OUT_OF_RESOURCES, too_large(max_dataset_mb))
    if free_disk_mb(storage_dir) < min_free_disk_mb:
        return StoreOutcome(OUT_OF_RESOURCES, f"free disk below {min_free_disk_mb} MB floor")
    with contextlib.ExitStack() as cleanup:
        return _store_read(spool_path, affected_sop_class_uid, affected_sop_instance_uid,
                           calling_ae_title, storage_dir, sessions, max_inflated_mb, cleanup)


def _store_read(
    spool_path: Path,
    affected_sop_class_uid: str,
    affected_sop_instance_uid: str,
    calling_ae_title: str,
    storage_dir: Path,
    sessions: sessionmaker[Session],
    max_inflated_mb: int,
    cleanup: contextlib.ExitStack,
) -> StoreOutcome:
    try:
        # A deflated data set is read from an inflated copy: pydicom inflates it whole in memory.
        readable = inflated_copy(spool_path, max_inflated_mb << 20, cleanup)
        if readable is None:
            return StoreOutcome(CANNOT_UNDERSTAND,
                                f"deflated data set too large: inflates past {max_inflated_mb} MiB")
        # Pixel data and large private elements are deferred (left on disk), never loaded here.
        dataset = dcmread(readable, defer_size=DEFER_SIZE)
        readable_size = readable.stat().st_size
        problem = dataset_problem(dataset, readable_size) or nul_problem(dataset)
        if problem is not None:
            return StoreOutcome(CANNOT_UNDERSTAND, problem)
        study_uid, series_uid, sop_uid = (dataset.get(keyword) for keyword in UID_KEYWORDS)
        sop_class = dataset.get("SOPClassUID")
        # The file meta was read with the data set; a deflated one's says the inflated copy's.
        transfer_syntax = str((dataset.file_meta if readable == spool_path
                               else read_file_meta_info(spool_path)).TransferSyntaxUID)
        modality = str(dataset.get("Modality", "") or "")[:16]
        accession = str(dataset.get("AccessionNumber", "") or "")[:64] or None
        # The content digest itself only when a re-send needs it (_duplicate); its checks now.
        check_deferred(readable, dataset, readable_size)
    except Exception as error:  # any parse failure: the peer sent something we cannot read
        return _unreadable(error)
    for name, value in zip(UID_KEYWORDS, (study_uid, series_uid, sop_uid), strict=True):
        if not value:
            return StoreOutcome(CANNOT_UNDERSTAND, f"missing {name}")
        if not valid_uid(value):
            # The value itself is not logged: a malformed field may hold anything.
            return StoreOutcome(CANNOT_UNDERSTAND, f"invalid {name}: {INVALID_UID}")
    if str(sop_uid) != str(affected_sop_instance_uid) or str(sop_class) != str(affected_sop_class_uid):
        shown = sop_class if valid_uid(sop_class) else "invalid"
        return StoreOutcome(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"dataset does not match the C-STORE request: SOP Class UID {shown}, SOP Instance UID "
            f"{sop_uid} in the dataset; {affected_sop_class_uid}, {affected_sop_instance_uid} requested",
        )
    study_uid, series_uid, sop_uid = str(study_uid), str(series_uid), str(sop_uid)

    try:
        digest, size = sha256_and_sync(spool_path)
    except OSError as error:
        return StoreOutcome(OUT_OF_RESOURCES, f"cannot write spool file: {error.strerror}")

    received = ReceivedInstance(
        study_uid, series_uid, sop_uid, str(sop_class), transfer_syntax, modality, accession,
        storage_dir / study_uid / series_uid / f"{sop_uid}.{digest[:12]}.dcm", size, digest,
        calling_ae_title,
    )
    contents = Contents(lambda: content_digest(readable, dataset, readable_size),
                        lambda path: stored_content(path, max_inflated_mb << 20, spool_path.parent))
    for _ in range(3):
        try:
            return _keep(spool_path, received, sessions, contents)
        except IntegrityError:
            # A parallel association created the same study, series or instance row first (one
            # study over several associations, or the same image twice at once): the retry
            # finds that row.
            continue
        except OSError as error:
            return StoreOutcome(OUT_OF_RESOURCES, f"cannot store file: {error.strerror}")
        except SQLAlchemyError as error:
            return StoreOutcome(OUT_OF_RESOURCES, f"database unavailable: {type(error).__name__}")
    return StoreOutcome(OUT_OF_RESOURCES, "database conflict while recording")


def _unreadable(error: Exception) -> StoreOutcome:
    """The answer to a data set that cannot be read (or its content digest not computed)."""
    if isinstance(error, Malformed):
        return StoreOutcome(CANNOT_UNDERSTAND, f"dataset malformed: {error}")
    if isinstance(error, EOFError):  # an undefined-length value (encapsulated pixel data) without its end
        return StoreOutcome(CANNOT_UNDERSTAND, "dataset truncated: data ends inside an element")
    # any parse failure: the peer sent something we cannot read
    return StoreOutcome(CANNOT_UNDERSTAND, f"not a readable DICOM dataset: {type(error).__name__}")


def stored_content(path: Path, max_inflated_bytes: int, scratch: Path) -> str | None:
    """The content digest of an instance's stored file (a deflated one inflated into `scratch`),
    or None when the file is gone (retention) or unreadable."""
    try:
        with contextlib.ExitStack() as cleanup:
            readable = inflated_copy(path, max_inflated_bytes, cleanup, scratch)
            if readable is None:
                return None
            dataset = dcmread(readable, defer_size=DEFER_SIZE)
            return content_digest(readable, dataset, readable.stat().st_size)
    except Exception:  # any failure: compared on the file's sha256 instead
        return None


@dataclass(frozen=True)
class Contents:
    """Content digests computed on demand: of the data set received, of a stored file."""

    received: Callable[[], str]
    stored: Callable[[Path], str | None]


def _keep(spool_path: Path, received: ReceivedInstance, sessions: sessionmaker[Session],
          contents: Contents) -> StoreOutcome:
    """One transaction per file: the duplicate check, the file moved into storage (and its folder
    synced), the rows, one commit (was three sessions; issue 21). The job is published after the
    commit and the instance then marked `queued` (`enqueue_after_commit`); until that mark the
    sweep re-publishes it, so a publish lost with a killed node costs seconds.

    On any failure after the move the file goes back to the spool (pynetdicom deletes it, or the
    retry moves it again): a committed row always names a stored file, and no stored file lacks
    its row."""
    final_path = received.path
    with sessions() as session, session.begin():
        existing = session.connection().execute(_EXISTING, {"uid": received.sop_uid}).first()
        if existing is not None:
            return _duplicate(session, existing, received.digest, contents)
        final_path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(spool_path, final_path)
        try:
            _fsync_dir(final_path.parent)
            instance_id = _record(session, received)
            session.commit()
        except BaseException:
            with contextlib.suppress(OSError):
                os.replace(final_path, spool_path)
            raise
    return StoreOutcome(SUCCESS, "stored", instance_id)


def _duplicate(session: Session, existing: Any, digest: str, contents: Contents) -> StoreOutcome:
    """A re-sent SOP Instance UID: never stored or classified twice.

    Identical content is a plain success (a PACS re-send), in whatever transfer syntax it comes:
    the same file (sha256), or the same content digest (dicom_node.content). Both digests are
    computed here, not on every receipt (issue 21): the stored instance's from its file, then
    kept in its row (retention records it before removing the file); a stored file lost or
    unreadable leaves the sha256 to compare on. Different content is a conflict: the first copy is
    kept (its result and SR refer to it), the new one refused with 0xC211 (failure,
    "cannot understand" family) and the reason recorded and audited. Not 0xB006: PS3.4 defines that
    warning as "elements discarded", which dcmtk shows the sender's operator, and a warning reads
    as stored. A failure shows the operator that this copy was not kept (a corrected image sent
    under the old UID, two devices issuing the same UID); a retry gets the same answer, and the fix
    is at the sender: a new SOP Instance UID for changed content (PS3.3 C.12.1.1.1).
    """
    same = existing.sha256 == digest
    if not same:
        stored = existing.content_sha256 or contents.stored(Path(existing.path))
        if stored is not None and stored != existing.content_sha256:
            session.execute(update(Instance).where(Instance.id == existing.id)
                            .values(content_sha256=stored))
        try:
            same = stored == contents.received()
        except Exception as error:  # as on receipt: a data set we cannot read
            return _unreadable(error)
    event_name = "duplicate_received" if same else "conflicting_duplicate"
    detail = ("identical content" if same else
              f"different content (sha256 {digest[:12]}): refused, the first copy kept")
    _audit(session, existing.id, event_name, detail)
    session.commit()
    if same:
        return StoreOutcome(SUCCESS, f"duplicate: {detail}", existing.id, duplicate=True)
    return StoreOutcome(CONFLICTING_DUPLICATE, "conflicting duplicate: SOP Instance UID already stored "
                        f"with other content (sha256 {existing.sha256[:12]}, this one {digest[:12]})",
                        existing.id, duplicate=True)


@dataclass(frozen=True)
class ReceivedInstance:
    """What the node records of one stored instance: its identifiers, the file and the sender."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    transfer_syntax: str
    modality: str
    accession: str | None
    path: Path
    size: int
    digest: str
    calling_ae_title: str


# The rows of a receipt by Core statements built once, parameters bound per file: the ORM's unit
# of work (identity map, flush ordering, events), and building a statement per call, were a
# measurable share of a file's CPU for rows the node writes once and never reads back (issue 21).
_STUDIES, _SERIES, _INSTANCES, _AUDIT = (cast(Table, model.__table__)
                                          for model in (Study, Series, Instance, AuditEvent))
_EXISTING = (select(_INSTANCES.c.id, _INSTANCES.c.sha256, _INSTANCES.c.content_sha256, _INSTANCES.c.path)
             .where(_INSTANCES.c.sop_instance_uid == bindparam("uid")))
_STUDY_ID = select(_STUDIES.c.id).where(_STUDIES.c.study_instance_uid == bindparam("uid"))
_SERIES_ID = select(_SERIES.c.id).where(_SERIES.c.series_instance_uid == bindparam("uid"))
_STUDY_RECEIVED = (update(_STUDIES).where(_STUDIES.c.id == bindparam("study"))
                   .values(last_received_at=bindparam("now")))
_INSERTS = {table: insert(table) for table in (_STUDIES, _SERIES, _INSTANCES, _AUDIT)}
_MARK_QUEUED = (update(_INSTANCES)
                .where(_INSTANCES.c.id == bindparam("instance"), _INSTANCES.c.state == InstanceState.RECEIVED)
                .values(state=InstanceState.QUEUED, queued_at=bindparam("now")))


def _insert(session: Session, table: Table, **values: Any) -> int:
    """One row, its id back."""
    result = cast(CursorResult[Any], session.connection().execute(_INSERTS[table], values))
    key = result.inserted_primary_key
    assert key is not None  # an INSERT of one row
    return int(key[0])


def _audit(session: Session, instance_id: int, event_name: str, detail: str) -> None:
    _insert(session, _AUDIT, entity="instance", entity_id=instance_id,
            event=event_name, detail=detail)


def _record(session: Session, received: ReceivedInstance) -> int:
    """The study (new, or its last receipt moved on), series and instance rows, and the audit."""
    now = utcnow()
    connection = session.connection()
    study_id = connection.execute(_STUDY_ID, {"uid": received.study_uid}).scalar()
    if study_id is None:
        study_id = _insert(session, _STUDIES, study_instance_uid=received.study_uid,
                           accession_number=received.accession, first_received_at=now,
                           last_received_at=now)
    else:
        connection.execute(_STUDY_RECEIVED, {"study": study_id, "now": now})
    series_id = connection.execute(_SERIES_ID, {"uid": received.series_uid}).scalar()
    if series_id is None:
        series_id = _insert(session, _SERIES, study_id=study_id,
                            series_instance_uid=received.series_uid, modality=received.modality)
    instance_id = _insert(
        session, _INSTANCES, study_id=study_id, series_id=series_id,
        sop_instance_uid=received.sop_uid, sop_class_uid=received.sop_class,
        transfer_syntax_uid=received.transfer_syntax, path=str(received.path),
        size_bytes=received.size, sha256=received.digest,
        calling_ae_title=received.calling_ae_title[:16], state=InstanceState.RECEIVED, attempts=0,
        received_at=now,
    )
    _audit(session, instance_id, "received", f"from {received.calling_ae_title}")
    return instance_id


def enqueue_after_commit(
    instance_id: int, sessions: sessionmaker[Session], enqueue: Callable[[int], None]
) -> bool:
    """Publish the job of an instance committed as `received`, then mark it `queued`.

    Until the mark, the periodic sweep re-publishes it after 5 s: a broker failure, or this
    process killed between commit and publish (the fault drill's node SIGKILL), costs seconds. A
    row committed as `queued` waited for STALE_INSTANCE_S (10 min) in that case."""
    try:
        enqueue(instance_id)
    except Exception as error:
        log.warning("instance %s recorded but not queued (%s); the sweep will queue it",
                    instance_id, type(error).__name__)
        return False
    # Conditional: a worker may have claimed it already; a failure here only means the sweep
    # publishes it once more (classification is idempotent).
    with contextlib.suppress(SQLAlchemyError), sessions() as session, session.begin():
        session.connection().execute(_MARK_QUEUED, {"instance": instance_id, "now": utcnow()})
    return True


def record_refusal(
    sessions: sessionmaker[Session], calling_ae_title: str, status: int, reason: str
) -> None:
    """Best effort: a refusal because the database is down cannot be recorded (it is logged)."""
    try:
        with sessions() as session, session.begin():
            session.add(RefusedStore(calling_ae_title=calling_ae_title[:16], status=status,
                                     reason=reason[:500]))
    except SQLAlchemyError as error:
        log.warning("could not record a refused C-STORE: %s", type(error).__name__)
