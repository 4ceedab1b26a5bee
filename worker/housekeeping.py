"""Housekeeping (the beat-scheduled jobs): finalise quiet studies into SR deliveries, and
sweep instances whose classify job was never queued or got lost.

A candidate version (shadow) and a silent served version get no delivery: their results are
recorded and scored, never sent (core.registry.withheld_versions; the study's audit says so).

Plain functions over a session factory (worker.tasks registers them; tests call them directly).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core import registry
from core.db import (
    TERMINAL_STATES,
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    Result,
    Study,
    audit,
    utcnow,
)
from core.queue import LOST_DELIVERY_S, STALE_INSTANCE_S
from core.settings import Settings
from worker.delivery import LOCAL_DESTINATION
from worker.report import sr_uids

log = logging.getLogger(__name__)


def finalise_stable_studies(
    sessions: sessionmaker[Session], settings: Settings, enqueue_delivery: Callable[[int], None],
    lost_after_s: float = LOST_DELIVERY_S,
) -> list[int]:
    """Create or refresh one delivery per (study, model version, destination) for quiet studies;
    queue again any delivery whose message was lost (see `_lost_deliveries`)."""
    cutoff = utcnow() - timedelta(seconds=settings.quiet_seconds)
    destinations = [repr(p) for p in settings.pacs_destinations] or [LOCAL_DESTINATION]
    to_send = []
    withheld = registry.withheld_versions(settings.models_dir)
    with sessions() as session, session.begin():
        pending = select(Instance.study_id).where(Instance.state.not_in(TERMINAL_STATES))
        studies = session.scalars(select(Study).where(
            Study.report_pending, Study.last_received_at <= cutoff, Study.id.not_in(pending)
        )).all()
        for study in studies:
            session.execute(update(Study).where(Study.id == study.id, Study.changes == study.changes)
                            .values(report_pending=False))
            for (model_name, model_version), count in _reported_counts(session, study.id).items():
                if (model_name, model_version) in withheld:
                    audit(session, "study", study.id, "withheld",
                          f"{model_name}@{model_version}: {count} image(s), candidate or silent, "
                          f"not sent")
                    continue
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
