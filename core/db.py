"""The schema (one module owns it) and session factory. Alembic in migrations/ creates the tables;
the application never creates them itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Index,
    Insert,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class InstanceState(StrEnum):
    RECEIVED = "received"  # on disk and recorded; no job queued yet
    QUEUED = "queued"
    PROCESSING = "processing"
    CLASSIFIED = "classified"  # terminal
    IGNORED = "ignored"  # terminal: not a frontal chest radiograph, with the reason
    FAILED = "failed"  # terminal: could not be classified, with the reason
    # terminal: a chest radiograph unlike what the served version was validated on (its card's
    # intended use, or its pixel check); refused with the reason, never classified
    OUT_OF_SCOPE = "out_of_scope"


TERMINAL_STATES = (InstanceState.CLASSIFIED, InstanceState.IGNORED, InstanceState.FAILED,
                   InstanceState.OUT_OF_SCOPE)


class DeliveryState(StrEnum):
    PENDING = "pending"
    RETRYING = "retrying"
    DELIVERED = "delivered"  # terminal
    DEAD = "dead"  # terminal until someone re-sends


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # An image reached a terminal state since the last finalise: the SR may need (re)building.
    # `changes` counts those events so finalise clears the flag only if none came in meanwhile.
    report_pending: Mapped[bool] = mapped_column(default=False, index=True)
    changes: Mapped[int] = mapped_column(Integer, default=0)
    instances: Mapped[list[Instance]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))


class Instance(Base):
    __tablename__ = "instances"
    # The last day's classified images (/metrics latencies) by index, however long the history:
    # state first, so a planner without statistics (SQLite) does not pick the state index alone.
    __table_args__ = (Index("ix_instances_state_finished_at", "state", "finished_at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))  # of the file as received
    # Of the image whatever its transfer syntax (dicom_node.content): what a re-send is compared on.
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=InstanceState.RECEIVED, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    # Out of scope: the version that refused it (its SR says "not assessed") and its pixel score.
    scope_model_name: Mapped[str | None] = mapped_column(String(64))
    scope_model_version: Mapped[str | None] = mapped_column(String(64))
    scope_score: Mapped[float | None] = mapped_column(Float)
    study: Mapped[Study] = relationship(back_populates="instances")
    results: Mapped[list[Result]] = relationship(back_populates="instance")


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("instance_id", "model_name", "model_version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))
    decode_ms: Mapped[float] = mapped_column(Float)
    inference_ms: Mapped[float] = mapped_column(Float)
    scope_score: Mapped[float | None] = mapped_column(Float)  # pixel check; None before it existed
    scope_threshold: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    instance: Mapped[Instance] = relationship(back_populates="results")


class Delivery(Base):
    """One SR per (study, model version, destination); re-built and re-sent with the same UIDs."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("study_id", "model_name", "model_version", "destination"),
                      Index("ix_deliveries_state_delivered_at", "state", "delivered_at"))
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(128))
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sr_path: Mapped[str | None] = mapped_column(Text)
    instances_reported: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()
    study: Mapped[Study] = relationship()


class ModelVersionRow(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float)
    card: Mapped[dict] = mapped_column(JSON)
    first_served_at: Mapped[datetime] = mapped_column(default=utcnow)


class RefusedStore(Base):
    """A C-STORE answered with a failure status: nothing was stored, the sender was told why."""

    __tablename__ = "refused_stores"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)


class AuditEvent(Base):
    """Every state change, who/what made it and why."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    entity: Mapped[str] = mapped_column(String(16))
    entity_id: Mapped[int] = mapped_column(Integer, index=True)
    event: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)


class OperatorSession(Base):
    """A signed-in dashboard operator (the cookie holds the key; only its SHA-256 is stored), so
    signing out ends the session on the server and a copied cookie stops working with it."""

    __tablename__ = "operator_sessions"
    key_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class LabelSource(StrEnum):
    HL7 = "hl7"  # the RIS's final report (ORU^R01 over MLLP)
    CSV = "csv"  # `pneumo labels import`
    DASHBOARD = "dashboard"  # a signed-in operator agreed or disagreed


class Label(Base):
    """What the site says a study showed (core.contract.LABELS), for the running scorecard.

    Linked by Study Instance UID or Accession Number as given (a report may come before the
    images); never updated: a later label for the same study supersedes earlier ones, which stay
    as history (ops.labels.current_labels)."""

    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    label: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    who: Mapped[str] = mapped_column(String(128))
    evidence: Mapped[str] = mapped_column(Text)  # where the raw evidence is (message id, file:line)


def audit(session: Session, entity: str, entity_id: int, event_name: str, detail: str | None = None) -> None:
    session.add(AuditEvent(entity=entity, entity_id=entity_id, event=event_name, detail=detail))


def insert_ignoring_duplicates(session: Session, model: type[Base]) -> Insert:
    """INSERT that skips a row breaking a unique constraint (ON CONFLICT DO NOTHING) in one round
    trip, instead of a SELECT first; for the two databases we run on."""
    dialect = session.get_bind().dialect.name
    module = {"postgresql": postgresql, "sqlite": sqlite}.get(dialect)
    if module is None:
        raise NotImplementedError(f"no ON CONFLICT insert for {dialect}")
    return module.insert(model).on_conflict_do_nothing()


def make_engine(url: str) -> Engine:
    """Engine with SQLite made safe for several processes (WAL, busy timeout)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(make_engine(url), expire_on_commit=False)
