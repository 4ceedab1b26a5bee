"""Stage latencies (receive -> classified -> SR delivered) as Prometheus histograms, counted and
bucketed in the database: `seconds_between`, a SQL extension for PostgreSQL and SQLite, keeps a
scrape to a few rows however long the history."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import accumulate
from typing import Any

from sqlalchemy import Float, Select, case, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from core.db import Delivery, DeliveryState, Instance, InstanceState, Study, utcnow

LATENCY_BUCKETS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
LATENCY_WINDOW = timedelta(hours=24)  # stage latencies (/metrics) cover the last 24 h


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
def _seconds_between(element: seconds_between, compiler: SQLCompiler, **kw: Any) -> str:
    end, start = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"CAST(EXTRACT(EPOCH FROM ({end}) - ({start})) AS DOUBLE PRECISION)"


@compiles(seconds_between, "sqlite")
def _seconds_between_sqlite(element: seconds_between, compiler: SQLCompiler, **kw: Any) -> str:
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
