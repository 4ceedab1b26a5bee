"""The dashboard's lists: recent studies (images, result, why images were not classified, what
became of the SR), failed instances and deliveries needing attention; `pneumo status` words its
studies the same way (study_reasons, sr_status)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, and_, not_, select, true
from sqlalchemy.orm import Session

from core.db import TERMINAL_STATES, Delivery, DeliveryState, Instance, InstanceState, Result, Study
from worker.delivery import LOCAL_DESTINATION


def one_line(text: str | None) -> str:
    """A reason on one line: a decoder's multi-line message broke `pneumo status`'s one line per
    study (and a metric label); runs of whitespace, newlines included, become one space."""
    return " ".join((text or "").split())


@dataclass
class StudyRow:
    study_id: int
    study_instance_uid: str
    accession_number: str | None
    images: int
    states: str
    label: str | None
    probability: float | None
    model: str | None
    delivery_id: int | None
    delivery_state: str | None
    first_received_at: datetime
    classified_s: float | None  # first received -> last image classified
    delivered_s: float | None  # first received -> SR delivered
    patient_name: str | None = None
    reasons: str = ""  # why images were not classified (ignored, failed), with counts
    sr: str = ""  # what became of the SR, in words (see sr_status)


def study_reasons(states_and_reasons: list[tuple[str, str | None]]) -> str:
    """`ignored: <reason>; failed: <reason> (2 images)`: why a study's images were not classified.

    An ignored study showed a blank reason; the reason is what tells IT whether to act
    (a modality sending the wrong series) or not (a lateral view, by design).
    """
    counts = Counter((state, one_line(reason) or "no reason recorded") for state, reason in states_and_reasons
                     if state in TERMINAL_STATES and state != InstanceState.CLASSIFIED)
    return "; ".join(f"{state}: {reason}" + (f" ({n} images)" if n > 1 else "")
                     for (state, reason), n in sorted(counts.items()))


def sr_status(delivery_state: str | None, destination: str | None, states: list[str]) -> str:
    """The SR column in words. A study whose images were all ignored or failed never gets an SR,
    and said "no SR yet" for ever; an SR only written to the folder is not "delivered". Images
    refused as out of scope are reported in a "not assessed" SR (worker.housekeeping), so a study
    of refused images is waiting for that SR, not going without one."""
    if delivery_state is not None:
        if delivery_state == DeliveryState.DELIVERED and destination == LOCAL_DESTINATION:
            return "SR written to folder"
        return f"SR {delivery_state}"
    reported = (InstanceState.CLASSIFIED, InstanceState.OUT_OF_SCOPE)
    if states and not any(s in reported for s in states) and all(s in TERMINAL_STATES for s in states):
        return "no SR will be sent: no image was classified"
    if states and InstanceState.CLASSIFIED not in states and InstanceState.OUT_OF_SCOPE in states:
        return "no SR yet (it will say: not assessed)"
    return "no SR yet"


def not_candidate(candidates: dict[str, str]) -> ColumnElement[bool]:
    """Results that are a site's answer: a candidate version's results are recorded beside the
    served one's but never sent, so they must not stand as a study's finding."""
    return and_(true(), *(not_(and_(Result.model_name == name, Result.model_version == version))
                          for name, version in candidates.items()))


def recent_studies(session: Session, limit: int = 20,
                   candidates: dict[str, str] | None = None) -> list[StudyRow]:
    """The newest studies; `candidates` (name -> version) are left out of the finding."""
    rows = []
    for study in session.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(limit)):
        instances = session.execute(
            select(Instance.state, Instance.finished_at, Instance.reason)
            .where(Instance.study_id == study.id)).all()
        top = session.execute(
            select(Result.label, Result.probability, Result.model_name, Result.model_version)
            .join(Instance).where(Instance.study_id == study.id, not_candidate(candidates or {}))
            .order_by(Result.probability.desc()).limit(1)).first()
        delivery = session.scalar(
            select(Delivery).where(Delivery.study_id == study.id).order_by(Delivery.id.desc()).limit(1))
        finished = [f for s, f, _ in instances if s in (InstanceState.CLASSIFIED,) and f is not None]
        rows.append(StudyRow(
            study.id, study.study_instance_uid, study.accession_number, len(instances),
            ", ".join(sorted({s for s, _, _ in instances})),
            top.label if top else None, top.probability if top else None,
            f"{top.model_name}@{top.model_version}" if top else None,
            delivery.id if delivery else None, delivery.state if delivery else None,
            study.first_received_at,
            (max(finished) - study.first_received_at).total_seconds() if finished else None,
            (delivery.delivered_at - study.first_received_at).total_seconds()
            if delivery is not None and delivery.delivered_at else None,
            reasons=study_reasons([(s, r) for s, _, r in instances]),
            sr=sr_status(delivery.state if delivery else None,
                         delivery.destination if delivery else None, [s for s, _, _ in instances]),
        ))
    return rows


def failed_instances(session: Session, limit: int = 50) -> list[tuple[Instance, str]]:
    """Failed instances, newest first, with their study UID (ignored ones are by design)."""
    return list(session.execute(
        select(Instance, Study.study_instance_uid).join(Study)
        .where(Instance.state == InstanceState.FAILED)
        .order_by(Instance.finished_at.desc()).limit(limit)).all())


def deliveries_needing_attention(session: Session, limit: int = 50) -> list[tuple[Delivery, str]]:
    """Dead-lettered and retrying SR deliveries, newest first."""
    return list(session.execute(
        select(Delivery, Study.study_instance_uid).join(Study)
        .where(Delivery.state.in_([DeliveryState.DEAD, DeliveryState.RETRYING]))
        .order_by(Delivery.updated_at.desc()).limit(limit)).all())
