"""Delivery of one SR, the whole state machine: build it from the database and the stored
headers (or reuse the kept one) with each image's picture (worker.picture, unless the setting
`pictures` is off), C-STORE the pictures and then the SR to the PACS (pynetdicom SCU, over TLS when
configured), record the outcome whatever fails: `retrying` with a backoff, then `dead`.

Finalise (worker.housekeeping) creates the deliveries; the deliver task (worker.tasks) runs
`attempt_delivery` with `pacs_sender(settings)`. Loads no model code.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, Association
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core import phi, tls
from core.contract import POSITIVE_CLASS
from core.db import (
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    ModelVersionRow,
    Result,
    audit,
    utcnow,
)
from core.scu import AssociationFailed, associate, stored
from core.settings import PeerAddress, Settings
from core.tls import TLSConfigError
from worker import picture
from worker.report import ImageFinding, build_sr, drop_invalid_values

log = logging.getLogger(__name__)
LOCAL_DESTINATION = "local"  # no PACS configured: the SR is only written to disk


class DeliveryError(Exception):
    """The PACS could not be reached or refused the SR; the message is recorded."""


def _check_status(status, destination: PeerAddress) -> None:
    """DeliveryError unless the PACS answered that it kept the object (core.scu.stored)."""
    code = getattr(status, "Status", None)
    if code is None:
        raise DeliveryError(f"no C-STORE response from {destination!r}")
    if not stored(code):
        raise DeliveryError(f"{destination!r} answered C-STORE status 0x{code:04X}")


def _sr_ae(ae_title: str, timeout_s: float) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(ComprehensiveSRStorage)
    ae.add_requested_context(SecondaryCaptureImageStorage)  # the pictures (worker.picture)
    return ae


def send_sr(
    path: Path, destination: PeerAddress, ae_title: str, timeout_s: float = 30,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """One SR on its own association. With `ssl_context`, TLS only; the PACS's certificate must
    match its host as given."""
    try:
        assoc = associate(_sr_ae(ae_title, timeout_s), destination, timeout_s, ssl_context)
    except AssociationFailed as error:
        raise DeliveryError(str(error)) from None
    try:
        status = assoc.send_c_store(dcmread(path))
    finally:
        assoc.release()
    _check_status(status, destination)


class AssociationPool:
    """Associations to each PACS kept open across SRs: an association per SR made a burst of 500
    studies take ~1,100 s (issue 21). At most `per_destination` at once to one destination
    (callers beyond it wait); one idle `idle_s` is released by a reaper thread.

    Each SR still gets its own C-STORE and its own answer: `send` raises unless the PACS answered
    success for that SR, so a failure never marks another SR of the association delivered. An
    association that broke (peer abort, network) is dropped, never reused; a kept association
    found broken at its next SR (the peer closed it while idle) is replaced and that SR sent once
    more on a fresh one before the failure counts (C-STORE of the same SOP instance is idempotent).
    """

    def __init__(
        self, ae_title: str, timeout_s: float, idle_s: float, per_destination: int,
        ssl_context: Callable[[], ssl.SSLContext | None] = lambda: None,
    ) -> None:
        self.ae_title, self.timeout_s, self.idle_s = ae_title, timeout_s, idle_s
        self.per_destination, self.ssl_context = per_destination, ssl_context
        self._lock = threading.Lock()
        self._idle: dict[str, list[tuple[Association, float]]] = {}
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._reaper: threading.Thread | None = None
        self._owner_pid = os.getpid()

    def send(self, path: Path, destination: str) -> None:
        """C-STORE the SR at `path`; DeliveryError unless the PACS answered that it kept it."""
        address = PeerAddress(destination)
        dataset = dcmread(path)
        with self._slot(destination):
            assoc, reused = self._take(destination, address)
            status = self._store(assoc, dataset)
            if status is None and reused:  # a kept association the peer had closed: once more, fresh
                assoc, _ = self._take(destination, address, fresh=True)
                status = self._store(assoc, dataset)
            if assoc.is_established:
                self._give_back(destination, assoc)
            _check_status(status, address)

    def close(self) -> None:
        """Release every idle association (worker shutdown)."""
        with self._lock:
            held = [assoc for entries in self._idle.values() for assoc, _ in entries]
            self._idle.clear()
        for assoc in held:
            _release(assoc)

    def _slot(self, destination: str) -> threading.BoundedSemaphore:
        with self._lock:
            if self._owner_pid != os.getpid():  # forked (a Celery pool child): the parent's are not ours
                self._idle, self._slots, self._reaper, self._owner_pid = {}, {}, None, os.getpid()
            if destination not in self._slots:
                self._slots[destination] = threading.BoundedSemaphore(self.per_destination)
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="sr-association-reaper",
                                                daemon=True)
                self._reaper.start()
            return self._slots[destination]

    def _take(self, destination: str, address: PeerAddress, fresh: bool = False) -> tuple[Association, bool]:
        if not fresh:
            with self._lock:
                entries = self._idle.get(destination, [])
                while entries:
                    assoc, _ = entries.pop()
                    if assoc.is_established:
                        return assoc, True
        try:
            # TLS built per association: a TLS file fixed after a failure is used without a restart.
            ssl_context = self.ssl_context()
            ae = _sr_ae(self.ae_title, self.timeout_s)
            return associate(ae, address, self.timeout_s, ssl_context), False
        except AssociationFailed as error:
            raise DeliveryError(str(error)) from None

    @staticmethod
    def _store(assoc: Association, dataset) -> object | None:
        """The C-STORE's answer; None (and the association dropped) when none came."""
        try:
            status = assoc.send_c_store(dataset)
        except Exception:  # a broken association raises from pynetdicom: no answer for this SR
            status = None
        if getattr(status, "Status", None) is None:
            if assoc.is_established:
                assoc.abort()
            return None
        return status

    def _give_back(self, destination: str, assoc: Association) -> None:
        with self._lock:
            self._idle.setdefault(destination, []).append((assoc, time.monotonic()))

    def _reap(self) -> None:
        while True:
            time.sleep(max(0.05, self.idle_s / 2))
            cutoff = time.monotonic() - self.idle_s
            with self._lock:
                expired = [assoc for entries in self._idle.values() for assoc, at in entries if at <= cutoff]
                for destination, entries in self._idle.items():
                    self._idle[destination] = [(a, at) for a, at in entries if at > cutoff]
            for assoc in expired:
                _release(assoc)


def _release(assoc: Association) -> None:
    try:
        assoc.release()
    except Exception as error:  # a peer gone already: nothing more to release
        log.debug("releasing an idle SR association failed: %s", type(error).__name__)


def pacs_sender(settings: Settings) -> AssociationPool:
    """`send(path, destination)` for `attempt_delivery`: C-STORE with these settings' AE title,
    timeout and TLS, on associations kept open across SRs (`AssociationPool`)."""
    return AssociationPool(
        settings.ae_title, settings.network_timeout_s, settings.delivery_association_idle_s,
        settings.delivery_associations_per_destination, lambda: tls.pacs_context(settings),
    )


def write_sr(sessions: sessionmaker[Session], delivery_id: int, sr_dir: Path, pictures: bool = False) -> Path:
    """Build the SR from every image of the study the version classified or refused; write it.
    With `pictures`, each image's picture (worker.picture) first, in the same folder; the SR
    references them.

    Header values invalid for their VR are left out of the SR and audited (keywords only). When
    stored images are gone (`pneumo retention --apply`), the SR written before is used if it
    reports every image; otherwise the SR cannot be built and this raises.
    """
    with sessions() as session:
        delivery = session.get(Delivery, delivery_id)
        rows = session.execute(
            select(Instance.path, Instance.sop_instance_uid, Result.probability, Result.label,
                   Result.threshold)
            .join(Result).where(
                Instance.study_id == delivery.study_id,
                Result.model_name == delivery.model_name,
                Result.model_version == delivery.model_version,
            ).order_by(Instance.id)
        ).all()
        refused = session.execute(
            select(Instance.path, Instance.sop_instance_uid, Instance.reason).where(
                Instance.study_id == delivery.study_id,
                Instance.state == InstanceState.OUT_OF_SCOPE,
                Instance.scope_model_name == delivery.model_name,
                Instance.scope_model_version == delivery.model_version,
            ).order_by(Instance.id)
        ).all()
        model_name, model_version, stored = delivery.model_name, delivery.model_version, delivery.sr_path
        version_row = session.scalars(select(ModelVersionRow).where(
            ModelVersionRow.name == model_name, ModelVersionRow.version == model_version)).first()
        threshold = rows[0].threshold if rows else version_row.threshold if version_row else None
        sha256, card = (version_row.model_sha256, version_row.card) if version_row else (None, None)
    missing = sum(not Path(row.path).exists() for row in [*rows, *refused])
    if missing:
        reported = {row.sop_instance_uid for row in [*rows, *refused]}
        return _stored_sr(sessions, delivery_id, stored, reported, missing)
    findings, dropped = [], Counter()
    for row, not_assessed in [*((r, None) for r in rows), *((r, r.reason) for r in refused)]:
        header = dcmread(row.path, stop_before_pixels=True, defer_size=1 << 20)  # no pixel data
        dropped.update(set(drop_invalid_values(header)))
        if not_assessed:
            findings.append(ImageFinding(header, None, None, not_assessed))
        else:
            findings.append(ImageFinding(header, row.probability, row.label == POSITIVE_CLASS))
    made, failed = picture.write_pictures(
        list(zip((Path(r.path) for r in [*rows, *refused]), findings, strict=True)),
        picture.Version(model_name, model_version, threshold, sha256), sr_dir,
    ) if pictures else ({}, 0)
    report = build_sr(findings, model_name, model_version, threshold, model_sha256=sha256, card=card,
                      pictures=made)
    sr_dir.mkdir(parents=True, exist_ok=True)
    path = sr_dir / f"{report.SOPInstanceUID}.dcm"
    report.save_as(path, enforce_file_format=True)
    with sessions() as session, session.begin():
        session.get(Delivery, delivery_id).sr_path = str(path)
        if dropped:
            keywords = ", ".join(f"{k} ({n} image(s))" for k, n in sorted(dropped.items()))
            audit(session, "delivery", delivery_id, "sr_values_dropped",
                  f"not valid for their VR, left out of the SR: {keywords}")
        if failed:
            audit(session, "delivery", delivery_id, "pictures_failed",
                  f"{failed} of {len(findings)} picture(s) could not be made; the SR goes without them")
    return path


def _stored_sr(
    sessions: sessionmaker[Session], delivery_id: int, stored: str | None, reported: set[str],
    missing: int,
) -> Path:
    """The SR written before, when it covers every classified image (their files are gone)."""
    gone = f"{missing} stored image(s) of the study removed (retention)"
    if not stored or not Path(stored).exists():
        raise SRBuildError(f"cannot rebuild the SR: {gone} and no SR file was kept")
    sr = dcmread(stored, stop_before_pixels=True)
    referenced = {
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedSOPSequence", [])
    }
    if not reported <= referenced:
        raise SRBuildError(f"cannot rebuild the SR: {gone}, and the kept SR does not report "
                           f"{len(reported - referenced)} of the images it reported")
    with sessions() as session, session.begin():
        audit(session, "delivery", delivery_id, "stored_sr_used", f"{gone}: sending the kept SR")
    return Path(stored)


class SRBuildError(Exception):
    """The SR cannot be built; the message is recorded as the delivery's error."""


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one attempt did; `retry_in_s` is set when it must be tried again after that delay."""

    state: str
    retry_in_s: float | None = None
    error: str | None = None


def attempt_delivery(
    sessions: sessionmaker[Session], delivery_id: int, settings: Settings,
    send: Callable[[Path, str], None],
) -> DeliveryOutcome:
    """One try of one delivery: build (or reuse) the SR, C-STORE it with `send(path, destination)`.

    Any failure, building included, ends in a recorded state with its reason: `retrying` while
    attempts remain, then `dead`; never an exception that leaves the delivery `pending`.
    """
    delivery = start_delivery_attempt(sessions, delivery_id, settings.delivery_max_attempts)
    if delivery is None:
        return DeliveryOutcome("nothing to do")
    try:
        path = write_sr(sessions, delivery_id, settings.home_dir / "sr", settings.pictures)
    except Exception as error:  # any failure: recorded with its (scrubbed) reason, retried, dead
        reason = str(error) if isinstance(error, SRBuildError) else phi.describe(error)
        return _failed_attempt(sessions, delivery, settings, f"SR could not be built: {reason}")
    if delivery.destination == LOCAL_DESTINATION:
        mark_delivery(sessions, delivery_id, DeliveryState.DELIVERED, None)
        return DeliveryOutcome("stored locally")
    try:
        for kept in picture.referenced_pictures(path):  # before the SR that references them
            send(kept, delivery.destination)
        send(path, delivery.destination)
    except Exception as error:  # DeliveryError, TLS, OS, or anything unforeseen: recorded
        reason = str(error) if isinstance(error, DeliveryError | TLSConfigError) else phi.describe(error)
        return _failed_attempt(sessions, delivery, settings, reason)
    mark_delivery(sessions, delivery_id, DeliveryState.DELIVERED, None)
    return DeliveryOutcome("delivered")


def _failed_attempt(
    sessions: sessionmaker[Session], delivery: Delivery, settings: Settings, reason: str
) -> DeliveryOutcome:
    if delivery.attempts >= settings.delivery_max_attempts:
        mark_delivery(sessions, delivery.id, DeliveryState.DEAD, reason)
        log.error("delivery %s dead after %d attempts: %s", delivery.id, delivery.attempts, reason)
        return DeliveryOutcome("dead", error=reason)
    mark_delivery(sessions, delivery.id, DeliveryState.RETRYING, reason)
    countdown = settings.delivery_backoff_s * 2 ** (delivery.attempts - 1)
    log.warning("delivery %s attempt %d failed, retrying in %.0f s: %s", delivery.id,
                delivery.attempts, countdown, reason)
    return DeliveryOutcome("retrying", countdown, reason)


def mark_delivery(
    sessions: sessionmaker[Session], delivery_id: int, state: DeliveryState, error: str | None
) -> None:
    with sessions() as session, session.begin():
        delivery = session.get(Delivery, delivery_id)
        delivery.state = state
        delivery.last_error = error
        delivery.updated_at = utcnow()
        if state == DeliveryState.DELIVERED:
            delivery.delivered_at = utcnow()
        audit(session, "delivery", delivery_id, str(state), error)


def start_delivery_attempt(
    sessions: sessionmaker[Session], delivery_id: int, max_attempts: int | None = None
) -> Delivery | None:
    """Count one attempt; None when there is nothing to do.

    Nothing to do: delivered, or dead (an operator's re-send or new images make it pending again;
    a stale message does not). Past `max_attempts`, the attempts before never recorded an
    outcome (the worker died or was stopped each time): dead, with that reason.
    """
    with sessions() as session, session.begin():
        delivery = session.get(Delivery, delivery_id)
        if delivery is None or delivery.state in (DeliveryState.DELIVERED, DeliveryState.DEAD):
            return None
        delivery.attempts += 1
        if max_attempts is not None and delivery.attempts > max_attempts:
            reason = f"gave up after {delivery.attempts - 1} attempts that never recorded an outcome"
            delivery.state, delivery.last_error, delivery.updated_at = DeliveryState.DEAD, reason, utcnow()
            audit(session, "delivery", delivery_id, str(DeliveryState.DEAD), reason)
            log.error("delivery %s dead: %s", delivery_id, reason)
            return None
        return delivery
