"""`pneumo status` and `pneumo resend`: what radiology IT looks at in a terminal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine, func, inspect, make_url, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core import registry
from core.db import (
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    Result,
    Study,
    audit,
    make_engine,
    session_factory,
    utcnow,
)
from core.queue import DELIVER, queue_depths, task_sender
from core.settings import Settings
from ops.monitoring import broker_down, not_classified_by_reason
from ops.studies import not_candidate, sr_status, study_reasons


class DatabaseNotFound(RuntimeError):
    """The database these settings name is not there or cannot be read (said, not traced)."""


def open_database(settings: Settings) -> sessionmaker[Session]:
    """Sessions on the settings' database, after checking it is there and has our tables.

    A terminal in another folder or without `PNEUMO_HOME` would otherwise open (or create) an
    empty SQLite file and print a traceback; tell the operator which setting to use instead.
    """
    url = make_url(settings.sqlalchemy_url)
    where = url.render_as_string(hide_password=True)
    hint = ("set PNEUMO_HOME to the home `pneumo run` uses (the same as its terminal's), "
            "or PNEUMO_DATABASE_URL to its database")
    if url.get_backend_name() != "sqlite":
        hint = "check PNEUMO_DATABASE_URL (it must name the database the node and workers use)"
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(url.database)
        if not path.is_file():
            raise DatabaseNotFound(f"no database at {path} (PNEUMO_HOME is {settings.home_dir}); {hint}")
        # Read-only, so a wrong path is never turned into an empty database.
        engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    else:
        engine = make_engine(settings.sqlalchemy_url)
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table(Study.__tablename__):
                raise DatabaseNotFound(f"no pneumo tables in the database at {where}; {hint}, "
                                       "or run `pneumo db upgrade` to create them")
    except SQLAlchemyError as error:
        first_line = str(getattr(error, "orig", None) or error).splitlines()[0]
        raise DatabaseNotFound(f"cannot read the database at {where}: {first_line}; {hint}") from None
    finally:
        engine.dispose()
    return session_factory(settings.sqlalchemy_url)


class BrokerDown(RuntimeError):
    """The broker does not answer: nothing can be queued (the message says what to start)."""


def render(settings: Settings, last: int = 10) -> str:
    sessions = open_database(settings)  # before the broker: a wrong home must not wait on it
    down = broker_down(settings)
    if down:
        lines = [f"queues: not readable: {down}"]
    else:
        lines = ["queues:"]
        lines += [f"  {queue:<16} {depth}" for queue, depth in queue_depths(settings).items()]
    with sessions() as session:
        lines.append("instances by state:")
        for state, count in session.execute(
            select(Instance.state, func.count()).group_by(Instance.state).order_by(Instance.state)
        ):
            lines.append(f"  {state:<16} {count}")
        by_reason = not_classified_by_reason(session)
        if by_reason:
            lines.append("not classified, by reason:")
            # The count before the reason: a reason of any length no longer runs into it.
            lines += [f"  {state:<16} {count:>6}  {reason}"
                      for (state, reason), count in sorted(by_reason.items())]
        lines.append("deliveries by state:")
        for state, count in session.execute(
            select(Delivery.state, func.count()).group_by(Delivery.state).order_by(Delivery.state)
        ):
            lines.append(f"  {state:<16} {count}")
        lines.append(f"last {last} studies:")
        candidates = registry.candidate_versions(settings.models_dir)
        studies = session.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(last))
        for study in studies:
            results = session.execute(
                select(Result.label, Result.probability, Result.model_name, Result.model_version)
                .join(Instance).where(Instance.study_id == study.id, not_candidate(candidates))
                .order_by(Result.probability.desc())
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
    """Reset the study's deliveries to pending and queue them; returns how many.

    BrokerDown, with nothing changed, when the broker does not answer: the delivery was recorded
    as pending and "resend requested" audited though nothing could be queued."""
    sessions = open_database(settings)
    with sessions() as session:
        ids = session.scalars(
            select(Delivery.id).join(Study).where(Study.study_instance_uid == study_instance_uid)
        ).all()
    if not ids:
        return 0
    down = broker_down(settings)
    if down:
        raise BrokerDown(f"nothing queued: {down}")
    enqueue = task_sender(settings, DELIVER)
    return sum(resend_delivery(sessions, delivery_id, enqueue) for delivery_id in ids)




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
