"""What the Celery tasks do, as plain functions over a session factory (tested directly).

classify_instance: filter -> scope (header) -> decode -> shared preprocessing -> predict and pixel
check -> one result row, or `out_of_scope` with the reason.
finalise_stable_studies: quiet studies with every instance terminal get an SR delivery.
attempt_delivery: build the SR from the database and the stored headers (or reuse the kept one),
  C-STORE it, record the outcome, whatever fails.
sweep: re-queue instances whose job was never queued or got lost.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core import phi, scope
from core.contract import POSITIVE_CLASS
from core.db import (
    TERMINAL_STATES,
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    ModelVersionRow,
    Result,
    Study,
    audit,
    insert_ignoring_duplicates,
    utcnow,
)
from core.queue import LOST_DELIVERY_S, MAX_WORKER_DEATHS, STALE_INSTANCE_S
from core.settings import Settings
from core.tls import TLSConfigError
from serving.decode import DecodeError, grayscale_pixels
from serving.header import header_age, header_view
from serving.image import preprocess
from worker import filters
from worker.delivery import DeliveryError
from worker.inference import Classifier
from worker.isolation import decode_in_child
from worker.report import ImageFinding, build_sr, drop_invalid_values, sr_uids

log = logging.getLogger(__name__)
LOCAL_DESTINATION = "local"  # no PACS configured: the SR is only written to disk


def _finish(session: Session, instance_id: int, state: InstanceState, reason: str | None) -> bool:
    """Make a non-terminal instance terminal and flag its study for a report; False if it
    already was terminal (another delivery of the same job got there first)."""
    study_id = session.scalar(
        update(Instance).where(Instance.id == instance_id, Instance.state.not_in(TERMINAL_STATES))
        .values(state=state, reason=reason, finished_at=utcnow()).returning(Instance.study_id)
    )
    if study_id is None:
        return False
    session.execute(update(Study).where(Study.id == study_id).values(
        report_pending=True, changes=Study.changes + 1))
    audit(session, "instance", instance_id, str(state), reason)
    return True


def classify_instance(
    sessions: sessionmaker[Session], instance_id: int, classifier: Callable[[], Classifier]
) -> str:
    """Classify one instance; idempotent. Returns the terminal state it ends in.

    Two short transactions around the model: claim, then record. Both change the instance only
    while it is not terminal (a conditional UPDATE), so two deliveries of the same job, in two
    processes or two threads of one batching worker, record one outcome.
    """
    with sessions() as session, session.begin():
        claimed = session.execute(
            update(Instance).where(Instance.id == instance_id, Instance.state.not_in(TERMINAL_STATES))
            .values(attempts=Instance.attempts + 1, state=InstanceState.PROCESSING)
            .returning(Instance.path, Instance.sop_instance_uid, Instance.attempts)
        ).one_or_none()
        if claimed is None:
            state = session.scalar(select(Instance.state).where(Instance.id == instance_id))
            if state is None:
                raise LookupError(f"instance {instance_id} does not exist")
            return state
        path, sop_uid, attempts = claimed
        if attempts > MAX_WORKER_DEATHS:
            # Redelivered this often: the job itself kills workers (memory, a decoder crash).
            _finish(session, instance_id, InstanceState.FAILED,
                    f"gave up after {attempts - 1} attempts that never finished")
            return InstanceState.FAILED

    if attempts > 1:
        # An attempt before this one never finished: this image may be what killed it, so it is
        # decoded apart (worker.isolation) and can take down nothing but its own child process.
        log.warning("instance %s: attempt %d after one that never finished; decoding it apart",
                    sop_uid, attempts)
    state, reason, result, model = _classify_file(Path(path), classifier, isolated=attempts > 1)
    with sessions() as session, session.begin():
        if not _finish(session, instance_id, state, reason):
            # Another delivery of the same job finished it first: keep what that one recorded.
            return session.scalar(select(Instance.state).where(Instance.id == instance_id))
        if model is not None:
            _record_model_version(session, model)
        if state == InstanceState.OUT_OF_SCOPE:
            session.execute(update(Instance).where(Instance.id == instance_id).values(**result))
        elif result is not None:
            session.execute(insert_ignoring_duplicates(session, Result).values(
                instance_id=instance_id, **result))
    log.info("instance %s %s%s", sop_uid, state, f": {reason}" if reason else "")
    return state


def _classify_file(path: Path, classifier: Callable[[], Classifier], isolated: bool = False):
    """(state, reason, result or refusal columns or None, the model used or None); never raises
    for bad input. A result carries a label only when the image is within the model's scope."""
    started = time.perf_counter()
    try:
        # Values over 1 MB (pixel data, large private elements) are read only when used: the
        # filters refuse on the header alone, before any pixel data is loaded or decoded.
        dataset = dcmread(path, defer_size=1 << 20)
    except Exception as error:
        return InstanceState.FAILED, f"stored file unreadable: {type(error).__name__}", None, None
    reason = filters.ignore_reason(dataset)
    if reason:
        return InstanceState.IGNORED, reason, None, None
    reason = filters.failure_reason(dataset)
    if reason:
        return InstanceState.FAILED, reason, None, None
    try:
        tensor = decode_in_child(path) if isolated else preprocess(grayscale_pixels(dataset))
    except (DecodeError, ValueError) as error:
        return InstanceState.FAILED, str(error)[:500], None, None
    decode_ms = (time.perf_counter() - started) * 1000
    model = classifier()
    reason = scope.header_reason(model.intended_use, header_age(dataset), header_view(dataset))
    if reason:
        return InstanceState.OUT_OF_SCOPE, f"{reason} ({model.version.label})", _refusal(model), model
    prediction = model.predict(tensor)
    if prediction.scope_score > model.scope_threshold:
        reason = scope.pixel_reason(prediction.scope_score, model.scope_threshold, model.version.label)
        return InstanceState.OUT_OF_SCOPE, reason, _refusal(model, prediction.scope_score), model
    return InstanceState.CLASSIFIED, None, {
        "model_name": model.name,
        "model_version": model.version.version,
        "probability": prediction.probability,
        "threshold": model.threshold,
        "label": prediction.label,
        "decode_ms": decode_ms,
        "inference_ms": prediction.inference_ms,
        "scope_score": prediction.scope_score,
        "scope_threshold": model.scope_threshold,
    }, model


def _refusal(model: Classifier, score: float | None = None) -> dict:
    """The instance columns that name the version that refused an image, and its pixel score."""
    return {"scope_model_name": model.name, "scope_model_version": model.version.version,
            "scope_score": score}


def _record_model_version(session: Session, model: Classifier) -> None:
    """The served version's card in `model_versions` (one statement; a no-op once it is there)."""
    session.execute(insert_ignoring_duplicates(session, ModelVersionRow).values(
        name=model.name, version=model.version.version,
        model_sha256=model.version.card.model_sha256, threshold=model.threshold,
        card=model.version.card.dump(exclude={"training"}),
    ))


def finalise_stable_studies(
    sessions: sessionmaker[Session], settings: Settings, enqueue_delivery: Callable[[int], None],
    lost_after_s: float = LOST_DELIVERY_S,
) -> list[int]:
    """Create or refresh one delivery per (study, model version, destination) for quiet studies;
    queue again any delivery whose message was lost (see `_lost_deliveries`)."""
    cutoff = utcnow() - timedelta(seconds=settings.quiet_seconds)
    destinations = [repr(p) for p in settings.pacs_destinations] or [LOCAL_DESTINATION]
    to_send = []
    with sessions() as session, session.begin():
        pending = select(Instance.study_id).where(Instance.state.not_in(TERMINAL_STATES))
        studies = session.scalars(select(Study).where(
            Study.report_pending, Study.last_received_at <= cutoff, Study.id.not_in(pending)
        )).all()
        for study in studies:
            session.execute(update(Study).where(Study.id == study.id, Study.changes == study.changes)
                            .values(report_pending=False))
            for (model_name, model_version), count in _reported_counts(session, study.id).items():
                for destination in destinations:
                    delivery = _delivery_for(session, study, model_name, model_version, destination)
                    if delivery.instances_reported < count:
                        delivery.instances_reported = count
                        delivery.state = DeliveryState.PENDING
                        delivery.attempts = 0
                        delivery.updated_at = utcnow()
                        audit(session, "delivery", delivery.id, "scheduled",
                              f"{count} classified image(s) to {destination}")
                        session.flush()
                        to_send.append(delivery.id)
        longest_countdown = settings.delivery_backoff_s * 2 ** max(0, settings.delivery_max_attempts - 2)
        to_send.extend(_lost_deliveries(session, max(lost_after_s, 2 * longest_countdown)))
    for delivery_id in to_send:
        enqueue_delivery(delivery_id)
    return to_send


def _reported_counts(session: Session, study_id: int) -> dict[tuple[str, str], int]:
    """Images an SR reports, per model version: those it classified and those it refused as out
    of scope (reported as not assessed, so a study of refused images still gets its SR)."""
    counts: dict[tuple[str, str], int] = {}
    classified = session.execute(
        select(Result.model_name, Result.model_version, func.count(Result.id))
        .join(Instance).where(Instance.study_id == study_id)
        .group_by(Result.model_name, Result.model_version)
    ).all()
    refused = session.execute(
        select(Instance.scope_model_name, Instance.scope_model_version, func.count(Instance.id))
        .where(Instance.study_id == study_id, Instance.state == InstanceState.OUT_OF_SCOPE)
        .group_by(Instance.scope_model_name, Instance.scope_model_version)
    ).all()
    for model_name, model_version, count in [*classified, *refused]:
        counts[(model_name, model_version)] = counts.get((model_name, model_version), 0) + count
    return counts


def _lost_deliveries(session: Session, lost_after_s: float) -> list[int]:
    """Pending/retrying deliveries untouched for `lost_after_s`: nothing will ever run them.

    Their Celery message is gone: a retry that could not be published while the broker was down
    (Celery then rejects the running task without requeue), or an enqueue that failed after this
    function committed. The fault drill lost SRs that way. A live message runs long before this
    (twice the longest retry countdown), and a duplicate one finds the delivery delivered.
    """
    lost = session.scalars(select(Delivery).where(
        Delivery.state.in_([DeliveryState.PENDING, DeliveryState.RETRYING]),
        Delivery.updated_at <= utcnow() - timedelta(seconds=lost_after_s),
    )).all()
    for delivery in lost:
        delivery.updated_at = utcnow()
        audit(session, "delivery", delivery.id, "requeued", f"no progress for {lost_after_s:.0f} s")
    return [delivery.id for delivery in lost]


def _delivery_for(
    session: Session, study: Study, model_name: str, model_version: str, destination: str
) -> Delivery:
    delivery = session.scalar(select(Delivery).where(
        Delivery.study_id == study.id, Delivery.model_name == model_name,
        Delivery.model_version == model_version, Delivery.destination == destination,
    ))
    if delivery is None:
        _, sr_uid = sr_uids(study.study_instance_uid, model_name, model_version)
        delivery = Delivery(
            study_id=study.id, model_name=model_name, model_version=model_version,
            destination=destination, sr_sop_instance_uid=sr_uid, instances_reported=0,
            state=DeliveryState.PENDING, attempts=0,
        )
        session.add(delivery)
        session.flush()
    return delivery


def write_sr(sessions: sessionmaker[Session], delivery_id: int, sr_dir: Path) -> Path:
    """Build the SR from every image of the study the version classified or refused; write it.

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
        threshold = rows[0].threshold if rows else session.scalar(
            select(ModelVersionRow.threshold).where(ModelVersionRow.name == model_name,
                                                    ModelVersionRow.version == model_version))
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
    report = build_sr(findings, model_name, model_version, threshold)
    sr_dir.mkdir(parents=True, exist_ok=True)
    path = sr_dir / f"{report.SOPInstanceUID}.dcm"
    report.save_as(path, enforce_file_format=True)
    with sessions() as session, session.begin():
        session.get(Delivery, delivery_id).sr_path = str(path)
        if dropped:
            keywords = ", ".join(f"{k} ({n} image(s))" for k, n in sorted(dropped.items()))
            audit(session, "delivery", delivery_id, "sr_values_dropped",
                  f"not valid for their VR, left out of the SR: {keywords}")
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
        path = write_sr(sessions, delivery_id, settings.home_dir / "sr")
    except Exception as error:  # any failure: recorded with its (scrubbed) reason, retried, dead
        reason = str(error) if isinstance(error, SRBuildError) else phi.describe(error)
        return _failed_attempt(sessions, delivery, settings, f"SR could not be built: {reason}")
    if delivery.destination == LOCAL_DESTINATION:
        mark_delivery(sessions, delivery_id, DeliveryState.DELIVERED, None)
        return DeliveryOutcome("stored locally")
    try:
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


def sweep(
    sessions: sessionmaker[Session], enqueue: Callable[[int], None],
    stale_after_s: float = STALE_INSTANCE_S,
) -> list[int]:
    """Re-queue instances recorded but never queued (>5 s), or queued/processing for too long."""
    now = utcnow()
    with sessions() as session:
        ids = session.scalars(select(Instance.id).where(
            ((Instance.state == InstanceState.RECEIVED)
             & (Instance.received_at <= now - timedelta(seconds=5)))
            | ((Instance.state.in_([InstanceState.QUEUED, InstanceState.PROCESSING]))
               & (func.coalesce(Instance.queued_at, Instance.received_at)
                  <= now - timedelta(seconds=stale_after_s)))
        )).all()
    requeued = []
    for instance_id in ids:
        try:
            enqueue(instance_id)
        except Exception as error:
            log.warning("sweep could not queue instance %s: %s", instance_id, type(error).__name__)
            continue
        with sessions() as session, session.begin():
            session.execute(update(Instance).where(
                Instance.id == instance_id, Instance.state.not_in(TERMINAL_STATES)
            ).values(state=InstanceState.QUEUED, queued_at=utcnow()))
            audit(session, "instance", instance_id, "requeued", "by sweep")
        requeued.append(instance_id)
    return requeued
