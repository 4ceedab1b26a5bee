"""`pneumo status` and `pneumo resend`: what radiology IT looks at in a terminal."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.db import (
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    Result,
    Study,
    audit,
    session_factory,
    utcnow,
)
from core.monitoring import sr_status, study_reasons
from core.settings import Settings


def queue_depths(settings: Settings) -> dict[str, int | str]:
    """Messages waiting per queue (Redis list lengths); 'unreachable' when the broker is down."""
    from worker.celery_app import QUEUES, make_app

    try:
        with make_app(settings).connection_for_read() as connection:
            client = connection.default_channel.client
            return {queue: int(client.llen(queue)) for queue in QUEUES}
    except Exception as error:  # the status view must work while the broker is down
        return dict.fromkeys(QUEUES, f"unreachable ({type(error).__name__})")


def render(settings: Settings, last: int = 10) -> str:
    sessions = session_factory(settings.sqlalchemy_url)
    lines = ["queues:"]
    lines += [f"  {queue:<16} {depth}" for queue, depth in queue_depths(settings).items()]
    with sessions() as session:
        lines.append("instances by state:")
        for state, count in session.execute(
            select(Instance.state, func.count()).group_by(Instance.state).order_by(Instance.state)
        ):
            lines.append(f"  {state:<16} {count}")
        lines.append("deliveries by state:")
        for state, count in session.execute(
            select(Delivery.state, func.count()).group_by(Delivery.state).order_by(Delivery.state)
        ):
            lines.append(f"  {state:<16} {count}")
        lines.append(f"last {last} studies:")
        studies = session.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(last))
        for study in studies:
            results = session.execute(
                select(Result.label, Result.probability, Result.model_name, Result.model_version)
                .join(Instance).where(Instance.study_id == study.id).order_by(Result.probability.desc())
            ).all()
            instances = session.execute(
                select(Instance.state, Instance.reason).where(Instance.study_id == study.id)).all()
            states = [state for state, _ in instances]
            delivery = session.scalar(select(Delivery).where(Delivery.study_id == study.id)
                                      .order_by(Delivery.id.desc()).limit(1))
            finding = (
                f"{results[0].label} p={results[0].probability:.3f} "
                f"{results[0].model_name}@{results[0].model_version}"
                if results else ", ".join(sorted(set(states)))
            )
            sent = sr_status(delivery.state if delivery else None,
                             delivery.destination if delivery else None, states)
            reasons = study_reasons(list(instances))
            lines.append(f"  {study.study_instance_uid}  {len(states)} image(s)  {finding}  {sent}"
                         + (f"  ({reasons})" if reasons else ""))
    return "\n".join(lines)


def resend(settings: Settings, study_instance_uid: str) -> int:
    """Reset the study's deliveries to pending and queue them; returns how many."""
    sessions = session_factory(settings.sqlalchemy_url)
    with sessions() as session:
        ids = session.scalars(
            select(Delivery.id).join(Study).where(Study.study_instance_uid == study_instance_uid)
        ).all()
    enqueue = task_sender(settings, "pneumo.deliver")
    return sum(resend_delivery(sessions, delivery_id, enqueue) for delivery_id in ids)


def task_sender(settings: Settings, task_name: str) -> Callable[[int], None]:
    """Queue a task by name on the broker these settings name (routes as the workers have them)."""
    from worker.celery_app import make_app

    app = make_app(settings)
    return lambda object_id: app.send_task(task_name, args=[object_id])


def resend_delivery(
    sessions: sessionmaker[Session], delivery_id: int, enqueue: Callable[[int], None],
    by: str = "operator",
) -> bool:
    """Send one SR again with fresh attempts; False if the delivery does not exist."""
    with sessions() as session, session.begin():
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            return False
        delivery.state = DeliveryState.PENDING
        delivery.attempts = 0
        delivery.updated_at = utcnow()
        audit(session, "delivery", delivery.id, "resend", f"requested by {by}")
    enqueue(delivery_id)
    return True


def rerun_instance(
    sessions: sessionmaker[Session], instance_id: int, enqueue: Callable[[int], None],
    by: str = "operator",
) -> bool:
    """Classify a failed instance again (e.g. after a fix); False unless it exists and failed."""
    with sessions() as session, session.begin():
        instance = session.get(Instance, instance_id)
        if instance is None or instance.state != InstanceState.FAILED:
            return False
        audit(session, "instance", instance.id, "rerun", f"requested by {by}; was: {instance.reason}")
        instance.state = InstanceState.QUEUED
        instance.reason = None
        instance.attempts = 0
        instance.finished_at = None
        instance.queued_at = utcnow()
    enqueue(instance_id)
    return True
