"""What radiology IT watches, read from the database (the one truth shared by every process and
container) once per request: counts, waiting ages, failures by reason, stage latencies
(ops.latency) and model score drift (ops.drift). The dashboard renders it and `/metrics` exports
it, so both always agree.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core import registry, scope
from core.db import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    RefusedStore,
    Result,
    utcnow,
)
from core.queue import make_app
from core.queue import queue_depths as read_queue_depths
from core.settings import Settings, redact_url
from ops.drift import DriftDay, drift
from ops.latency import LatencyHistogram, stage_latencies
from ops.studies import one_line

log = logging.getLogger(__name__)

WAITING_INSTANCE_STATES = (InstanceState.RECEIVED, InstanceState.QUEUED)
WAITING_DELIVERY_STATES = (DeliveryState.PENDING, DeliveryState.RETRYING)


@dataclass
class Snapshot:
    """Everything the dashboard's header and /metrics need, read once per request."""

    database_ok: bool = True
    database_error: str = ""
    instances_by_state: dict[str, int] = field(default_factory=dict)
    deliveries_by_state: dict[str, int] = field(default_factory=dict)
    queue_depths: dict[str, int | str] = field(default_factory=dict)
    broker_down: str = ""  # why the queues cannot be read, in one line (see broker_down)
    oldest_waiting_s: dict[str, float] = field(default_factory=dict)
    cstores: dict[tuple[str, str], int] = field(default_factory=dict)  # (status, calling AE)
    refusal_reasons: dict[str, int] = field(default_factory=dict)
    failures_by_reason: dict[tuple[str, str], int] = field(default_factory=dict)  # (state, reason)
    results_by_label: dict[tuple[str, str, str], int] = field(default_factory=dict)
    delivery_retries: int = 0  # failed SR attempts that were retried, ever
    dead_letters: int = 0  # SR deliveries dead-lettered, ever (a re-send does not undo the count)
    latencies_s: dict[str, LatencyHistogram] = field(default_factory=dict)  # LATENCY_WINDOW
    free_disk_mb: float = 0.0
    min_free_disk_mb: float = 0.0
    served: dict[str, dict] = field(default_factory=dict)
    drift: list[DriftDay] = field(default_factory=list)

    @property
    def refusing_images(self) -> bool:
        return self.free_disk_mb < self.min_free_disk_mb

    @property
    def broker_ok(self) -> bool:
        return not self.broker_down and all(isinstance(v, int) for v in self.queue_depths.values())


def served_cards(models_dir: Path) -> dict[str, dict]:
    """Each served version's card, with its one test look under `test_metrics` (card or report)."""
    cards = {}
    for name, version in registry.served_versions(models_dir).items():
        try:
            model_version = registry.resolve(f"{name}@{version}", models_dir)
            test = model_version.test_metrics
            cards[name] = {**model_version.card.dump(), "test_metrics": test.dump() if test else {}}
        except (registry.RegistryError, OSError) as error:
            cards[name] = {"version": version, "error": str(error)}
    return cards


def reason_class(reason: str | None) -> str:
    """Group free-text reasons into a bounded label set for metrics (text before the first ':';
    out of scope by its rule: patient age, view or pixel check)."""
    text = one_line(reason) or "unknown"
    if text.startswith(f"{scope.OUT_OF_SCOPE}: "):
        detail = text.split(": ", 1)[1]
        rule = next((r for r in ("patient age", "view", "pixel check") if r in detail), "other")
        return f"{scope.OUT_OF_SCOPE} ({rule})"
    # 160: the longest such head, "pixel data could not be decoded (<transfer syntax name>)", whole.
    return text.split(":", 1)[0].strip()[:160]


def not_classified_by_reason(session: Session) -> dict[tuple[str, str], int]:
    """(state, reason class) -> count for ignored, failed and out-of-scope instances."""
    counts: dict[tuple[str, str], int] = {}
    for state, reason, count in session.execute(
            select(Instance.state, Instance.reason, func.count())
            .where(Instance.state.in_([InstanceState.FAILED, InstanceState.IGNORED,
                                       InstanceState.OUT_OF_SCOPE]))
            .group_by(Instance.state, Instance.reason)):
        key = (state, reason_class(reason))
        counts[key] = counts.get(key, 0) + count
    return counts


def snapshot(
    settings: Settings, sessions: sessionmaker[Session],
    queue_depths: Callable[[Settings], dict[str, int | str]] | None = None,
) -> Snapshot:
    """Read everything once; a database that cannot be read is reported, not raised (the page
    and /metrics still answer). `queue_depths` stands in for the broker in tests."""
    snap = Snapshot(min_free_disk_mb=settings.min_free_disk_mb)
    settings.ensure_dirs()
    snap.free_disk_mb = shutil.disk_usage(settings.storage_dir).free / (1024 * 1024)
    # The embedded broker is checked first (a socket file and a ping): with the run stopped the
    # queue panel said `unreachable (OperationalError)` per queue, not what to do.
    if not settings.broker_url and queue_depths is None:
        snap.broker_down = broker_down(settings) or ""
    if not snap.broker_down:
        snap.queue_depths = (queue_depths or read_queue_depths)(settings)
        unreadable = next((d for d in snap.queue_depths.values() if not isinstance(d, int)), None)
        if unreadable is not None:
            error = unreadable.removeprefix("unreachable ").strip("()")
            snap.broker_down = (f"the broker at {redact_url(settings.broker_url)} does not answer "
                                f"({error}); check PNEUMO_BROKER_URL")
    snap.served = served_cards(settings.models_dir)
    try:
        with sessions() as session:
            _read_database(session, snap, settings)
    except SQLAlchemyError as error:
        snap.database_ok = False
        snap.database_error = type(error).__name__
        log.warning("monitoring could not read the database: %s", type(error).__name__)
    return snap


def broker_down(settings: Settings) -> str | None:
    """None when the broker answers, else one line an operator can act on.

    With the embedded broker (no PNEUMO_BROKER_URL) it is `pneumo run`'s own Redis on a socket in
    the home: no socket, or one nobody answers on, means `pneumo run` is not running, which is what
    to say, not `unreachable (OperationalError)` per queue or a kombu traceback.
    """
    if not settings.broker_url:
        if not settings.redis_socket.exists():
            return (f"pneumo run is not running (no broker socket in {settings.home_dir}); start it, "
                    "or set PNEUMO_HOME to the home it uses")
        try:
            import redis

            redis.Redis(unix_socket_path=str(settings.redis_socket), socket_timeout=2,
                        socket_connect_timeout=2).ping()
        except (OSError, redis.RedisError):
            return (f"pneumo run is not running (its broker socket in {settings.home_dir} does not "
                    "answer); start it")
        return None
    try:
        with make_app(settings).connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
    except Exception as error:  # any transport's error: said in one line, never traced
        where = redact_url(settings.broker_url)
        return f"the broker at {where} does not answer ({type(error).__name__}); check PNEUMO_BROKER_URL"
    return None


def _read_database(session: Session, snap: Snapshot, settings: Settings) -> None:
    now = utcnow()
    snap.instances_by_state = dict(session.execute(
        select(Instance.state, func.count()).group_by(Instance.state)).all())
    snap.deliveries_by_state = dict(session.execute(
        select(Delivery.state, func.count()).group_by(Delivery.state)).all())
    oldest_instance = session.scalar(
        select(func.min(func.coalesce(Instance.queued_at, Instance.received_at)))
        .where(Instance.state.in_(WAITING_INSTANCE_STATES)))
    oldest_delivery = session.scalar(
        select(func.min(Delivery.updated_at)).where(Delivery.state.in_(WAITING_DELIVERY_STATES)))
    snap.oldest_waiting_s = {
        "classify": _age(now, oldest_instance), "delivery": _age(now, oldest_delivery)}
    for ae, count in session.execute(
            select(Instance.calling_ae_title, func.count()).group_by(Instance.calling_ae_title)):
        snap.cstores[("0x0000", ae)] = count
    for status, ae, reason, count in session.execute(
            select(RefusedStore.status, RefusedStore.calling_ae_title, RefusedStore.reason, func.count())
            .group_by(RefusedStore.status, RefusedStore.calling_ae_title, RefusedStore.reason)):
        key = (f"0x{status:04X}", ae)
        snap.cstores[key] = snap.cstores.get(key, 0) + count
        snap.refusal_reasons[reason_class(reason)] = snap.refusal_reasons.get(reason_class(reason), 0) + count
    snap.failures_by_reason = not_classified_by_reason(session)
    for label, name, version, count in session.execute(
            select(Result.label, Result.model_name, Result.model_version, func.count())
            .group_by(Result.label, Result.model_name, Result.model_version)):
        snap.results_by_label[(label, name, version)] = count
    events = dict(session.execute(
        select(AuditEvent.event, func.count()).where(
            AuditEvent.entity == "delivery",
            AuditEvent.event.in_([DeliveryState.RETRYING, DeliveryState.DEAD]))
        .group_by(AuditEvent.event)).all())
    snap.delivery_retries = events.get(DeliveryState.RETRYING, 0)
    snap.dead_letters = events.get(DeliveryState.DEAD, 0)
    snap.latencies_s = stage_latencies(session)
    snap.drift = drift(session, settings.models_dir, settings.drift_psi_alert,
                       false_alarm_rate=settings.drift_false_alarm_rate)


def _age(now: datetime, then: datetime | None) -> float:
    return max(0.0, (now - then).total_seconds()) if then else 0.0
