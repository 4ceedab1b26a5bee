"""What radiology IT watches, read from the database (the one truth shared by every process and
container): counts, waiting ages, stage latencies, failures, model score drift. The dashboard
renders it and `/metrics` exports it, so both always agree.
"""

from __future__ import annotations

import functools
import logging
import shutil
import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import accumulate
from pathlib import Path

import numpy as np
from sqlalchemy import Float, Select, case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.functions import FunctionElement

from core import registry, scope
from core.contract import POSITIVE_CLASS, score_histogram
from core.db import (
    TERMINAL_STATES,
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    RefusedStore,
    Result,
    Study,
    utcnow,
)
from core.queue import queue_depths as read_queue_depths
from core.settings import Settings
from worker.delivery import LOCAL_DESTINATION

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
LATENCY_WINDOW = timedelta(hours=24)  # stage latencies (/metrics) cover the last 24 h
WAITING_INSTANCE_STATES = (InstanceState.RECEIVED, InstanceState.QUEUED)
WAITING_DELIVERY_STATES = (DeliveryState.PENDING, DeliveryState.RETRYING)


# --- model score drift ---------------------------------------------------------------------------

def psi(expected: list[int], actual: list[int], floor: float = 1e-4) -> float:
    """Population stability index of `actual` against `expected` (same bins).

    Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 investigate. Those figures are
    for large samples: over a few dozen results PSI is mostly noise (see drift_threshold).
    """
    if not sum(expected) or not sum(actual):
        return float("nan")
    return float(psi_many(expected, np.asarray([actual]), floor)[0])


def psi_many(expected, actual: np.ndarray, floor: float = 1e-4) -> np.ndarray:
    """psi() of each row of `actual` (counts) against `expected` (one histogram, or one per row)."""
    expected = np.asarray(expected, dtype=float)
    actual = np.asarray(actual, dtype=float)
    pe = np.maximum(expected / expected.sum(axis=-1, keepdims=True), floor)
    pa = np.maximum(actual / actual.sum(axis=-1, keepdims=True), floor)
    return ((pa - pe) * np.log(pa / pe)).sum(axis=-1)


# Window sizes at which the noise level is simulated; a window between two uses the smaller one's
# threshold, which is the higher (PSI's noise falls with n), so the false-alarm rate stays bounded.
THRESHOLD_GRID = (20, 25, 30, 35, 40, 50, 60, 70, 85, 100, 120, 150, 200, 250, 300, 400, 500, 700,
                  1000, 1500, 2000, 3000, 5000, 10000)


def drift_threshold(expected: tuple[int, ...], n: int, false_alarm_rate: float) -> float:
    """The PSI that `n` scores from the validation population exceed with probability
    `false_alarm_rate`: its (1 - rate) quantile, simulated at the grid size at or below `n`."""
    grid_n = max((g for g in THRESHOLD_GRID if g <= n), default=max(n, 1))
    return _simulated_threshold(tuple(int(c) for c in expected), grid_n, false_alarm_rate)


@functools.lru_cache(maxsize=512)
def _simulated_threshold(expected: tuple[int, ...], n: int, false_alarm_rate: float) -> float:
    """Parametric bootstrap of PSI under "no drift". Both sides are drawn: the card's histogram is
    itself a sample (a few hundred validation images), so a fresh validation-sized sample and `n`
    production scores are drawn from it, smoothed by half a count per bin (a bin empty in
    validation is rare, not impossible), and PSI is computed between them exactly as drift() does.
    Seeded by the inputs: the same card and window give the same threshold in every process."""
    counts = np.asarray(expected, dtype=float)
    population = (counts + 0.5) / (counts + 0.5).sum()
    draws = int(min(200_000, max(20_000, 20 / false_alarm_rate)))
    rng = np.random.default_rng([n, *expected])
    reference = rng.multinomial(int(counts.sum()), population, size=draws)
    production = rng.multinomial(n, population, size=draws)
    return float(np.quantile(psi_many(reference, production), 1 - false_alarm_rate))


def drift_alert(
    expected: list[int], actual: list[int], psi_floor: float, false_alarm_rate: float, min_n: int = 20
) -> tuple[bool, float, float]:
    """(alert, PSI, threshold): alert when at least `min_n` scores drift further than both their
    noise level at this count and `psi_floor` (a shift too small to act on is not alerted)."""
    n = sum(actual)
    value = psi(expected, actual) if n else float("nan")
    if not n:
        return False, value, float("nan")
    threshold = max(psi_floor, drift_threshold(tuple(expected), n, false_alarm_rate))
    return n >= min_n and value > threshold, value, threshold


@dataclass
class DriftDay:
    model_name: str
    model_version: str
    day: str  # YYYY-MM-DD (UTC); "last 24 h" for the rolling window
    n: int
    positive_rate: float
    psi: float
    alert: bool
    threshold: float = float("nan")  # the PSI this window must exceed to alert, at its n


def drift(
    session: Session, models_dir: Path, psi_floor: float, days: int = 7, min_n: int = 20,
    false_alarm_rate: float = 0.001,
) -> list[DriftDay]:
    """Per served model version: the rolling last 24 h, then each of the last `days` UTC days.

    A window alerts when its PSI exceeds what `n` scores from the card's validation population
    reach by chance with probability `false_alarm_rate` (and `psi_floor`); below `min_n` results
    it is reported, never alerted.
    """
    now = utcnow()
    since = (now - timedelta(days=days)).replace(hour=0, minute=0, second=0, microsecond=0)
    rows: list[DriftDay] = []
    for name, version in registry.served_versions(models_dir).items():
        try:
            expected = registry.resolve(f"{name}@{version}", models_dir).card.validation_score_histogram
        except (registry.RegistryError, OSError):
            continue
        if expected is None:
            continue
        results = session.execute(
            select(Result.created_at, Result.probability, Result.label).where(
                Result.model_name == name, Result.model_version == version, Result.created_at >= since
            )
        ).all()
        windows: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for created_at, probability, label in results:
            windows[created_at.strftime("%Y-%m-%d")].append((probability, label))
            if created_at >= now - timedelta(hours=24):
                windows["last 24 h"].append((probability, label))
        for day in ["last 24 h", *sorted((k for k in windows if k != "last 24 h"), reverse=True)]:
            scores = windows.get(day, [])
            n = len(scores)
            alert, value, threshold = drift_alert(
                expected, score_histogram([p for p, _ in scores], len(expected)), psi_floor,
                false_alarm_rate, min_n)
            rows.append(DriftDay(
                name, version, day, n,
                sum(label == POSITIVE_CLASS for _, label in scores) / n if n else float("nan"),
                value, alert, threshold,
            ))
    return rows


# --- operational snapshot -------------------------------------------------------------------------

@dataclass
class Snapshot:
    """Everything the dashboard's header and /metrics need, read once per request."""

    database_ok: bool = True
    database_error: str = ""
    instances_by_state: dict[str, int] = field(default_factory=dict)
    deliveries_by_state: dict[str, int] = field(default_factory=dict)
    queue_depths: dict[str, int | str] = field(default_factory=dict)
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
        return all(isinstance(v, int) for v in self.queue_depths.values())


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


def one_line(text: str | None) -> str:
    """A reason on one line: a decoder's multi-line message broke `pneumo status`'s one line per
    study (and a metric label); runs of whitespace, newlines included, become one space."""
    return " ".join((text or "").split())


def reason_class(reason: str | None) -> str:
    """Group free-text reasons into a bounded label set for metrics (text before the first ':';
    out of scope by its rule: patient age, view or pixel check)."""
    text = one_line(reason) or "unknown"
    if text.startswith(f"{scope.OUT_OF_SCOPE}: "):
        detail = text.split(": ", 1)[1]
        rule = next((r for r in ("patient age", "view", "pixel check") if r in detail), "other")
        return f"{scope.OUT_OF_SCOPE} ({rule})"
    return text.split(":", 1)[0].strip()[:60]


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


def snapshot(settings: Settings, sessions: sessionmaker[Session], queue_depths=None) -> Snapshot:
    snap = Snapshot(min_free_disk_mb=settings.min_free_disk_mb)
    settings.ensure_dirs()
    snap.free_disk_mb = shutil.disk_usage(settings.storage_dir).free / (1024 * 1024)
    snap.queue_depths = (queue_depths or read_queue_depths)(settings)
    snap.served = served_cards(settings.models_dir)
    try:
        with sessions() as session:
            _read_database(session, snap, settings)
    except SQLAlchemyError as error:
        snap.database_ok = False
        snap.database_error = type(error).__name__
        log.warning("monitoring could not read the database: %s", type(error).__name__)
    return snap


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


class seconds_between(FunctionElement):
    """`end - start` in seconds (a float, as `timedelta.total_seconds()` gives it), in SQL.

    PostgreSQL subtracts timestamps exactly (microseconds). SQLite has no timestamp type:
    SQLAlchemy stores `YYYY-MM-DD HH:MM:SS.ffffff` text, and julianday() keeps only milliseconds,
    so whole seconds come from julianday() of the first 19 characters and microseconds from the
    rest; one division of the integer microseconds then rounds exactly as Python does.
    """

    type = Float()
    name = "seconds_between"
    inherit_cache = True


@compiles(seconds_between)  # PostgreSQL, and str() of a statement (the default dialect)
def _seconds_between(element: seconds_between, compiler, **kw) -> str:
    end, start = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"CAST(EXTRACT(EPOCH FROM ({end}) - ({start})) AS DOUBLE PRECISION)"


@compiles(seconds_between, "sqlite")
def _seconds_between_sqlite(element: seconds_between, compiler, **kw) -> str:
    end, start = (compiler.process(clause, **kw) for clause in element.clauses)
    whole = f"round((julianday(substr({end}, 1, 19)) - julianday(substr({start}, 1, 19))) * 86400)"
    micro = f"(CAST(substr({end}, 21) AS INTEGER) - CAST(substr({start}, 21) AS INTEGER))"
    return f"((CAST({whole} AS INTEGER) * 1000000 + {micro}) / 1000000.0)"


@dataclass
class LatencyHistogram:
    """One stage's latencies as Prometheus wants them: `buckets[i]` counts the values at most
    LATENCY_BUCKETS_S[i] seconds (cumulative); `count` and `sum_s` cover every value."""

    count: int = 0
    sum_s: float = 0.0
    buckets: tuple[int, ...] = (0,) * len(LATENCY_BUCKETS_S)


def stage_latencies(session: Session, window: timedelta = LATENCY_WINDOW,
                    now: datetime | None = None) -> dict[str, LatencyHistogram]:
    """Seconds per stage over the last `window`: receive -> classified (per image classified in
    it), last image classified -> SR delivered, and first image received -> SR delivered (per SR
    delivered in it; includes the quiet period).

    Counted and bucketed in the database, so a scrape reads a few rows however long the history.
    """
    since = (now or utcnow()) - window
    classify = select(seconds_between(Instance.finished_at, Instance.received_at)).where(
        Instance.state == InstanceState.CLASSIFIED, Instance.finished_at >= since)
    in_window = (Delivery.state == DeliveryState.DELIVERED, Delivery.delivered_at >= since)
    # A join, not a correlated subquery: the planner inlines subqueries, which would repeat it
    # for every row.
    last_classified = select(Instance.study_id, func.max(Instance.finished_at).label("at")).where(
        Instance.study_id.in_(select(Delivery.study_id).where(*in_window))
    ).group_by(Instance.study_id).subquery()
    delivered = (
        select(Delivery.delivered_at, last_classified.c.at.label("classified"), Study.first_received_at)
        .join(last_classified, last_classified.c.study_id == Delivery.study_id)
        .join(Study, Study.id == Delivery.study_id).where(*in_window).subquery())
    report = seconds_between(delivered.c.delivered_at, delivered.c.classified)
    total = seconds_between(delivered.c.delivered_at, delivered.c.first_received_at)
    return {"received_to_classified": _histogram(session, classify),
            "classified_to_delivered": _histogram(session, select(case((report < 0.0, 0.0), else_=report))),
            "received_to_delivered": _histogram(session, select(case((total < 0.0, 0.0), else_=total)))}


def _histogram(session: Session, seconds: Select) -> LatencyHistogram:
    """Count, sum and cumulative bucket counts of a one-column query of seconds (NULLs are not
    counted): each value computed once (a materialised CTE) and grouped by its bucket, so the
    database returns at most one row per bucket."""
    values = seconds.cte("latencies").prefix_with("MATERIALIZED", dialect="postgresql")  # 12+
    if sqlite3.sqlite_version_info >= (3, 35):  # older SQLite (Ubuntu 20.04: 3.31) lacks the word
        values = values.prefix_with("MATERIALIZED", dialect="sqlite")
    value = values.c[0]
    bucket = case(*((value <= float(bound), index) for index, bound in enumerate(LATENCY_BUCKETS_S)),
                  else_=len(LATENCY_BUCKETS_S))
    per_bucket = [0] * (len(LATENCY_BUCKETS_S) + 1)
    total = 0.0
    for index, count, seconds_sum in session.execute(
            select(bucket, func.count(), func.sum(value)).where(value.is_not(None)).group_by(bucket)):
        per_bucket[index], total = count, total + seconds_sum
    cumulative = tuple(accumulate(per_bucket))
    return LatencyHistogram(cumulative[-1], total, cumulative[:-1])


# --- lists for the dashboard ----------------------------------------------------------------------

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


def recent_studies(session: Session, limit: int = 20) -> list[StudyRow]:
    rows = []
    for study in session.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(limit)):
        instances = session.execute(
            select(Instance.state, Instance.finished_at, Instance.reason)
            .where(Instance.study_id == study.id)).all()
        top = session.execute(
            select(Result.label, Result.probability, Result.model_name, Result.model_version)
            .join(Instance).where(Instance.study_id == study.id)
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
