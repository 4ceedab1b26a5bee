"""The dashboard's figures over time: per hour over the last 24 h, per day over the last 30 days.

Counted and grouped in the database (`time_bucket`, a SQL extension for PostgreSQL and SQLite):
each read returns at most one row per bucket and series, and filters on an indexed time column
(instances by state and finish time, deliveries by state and delivery time, refused stores and
results by time), so a page load reads the window, not the history (benchmarks/trend_reads.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import String

from core.contract import POSITIVE_CLASS
from core.db import Delivery, DeliveryState, Instance, InstanceState, RefusedStore, Result, Study, utcnow
from ops.latency import seconds_between


@dataclass(frozen=True)
class Window:
    key: str  # in the query string: ?window=24h
    unit: str  # "hour" or "day"
    buckets: int
    span: str  # "the last 24 h", for titles and empty states
    x_label: str

    def start(self, now: datetime) -> datetime:
        """The start of the oldest bucket: the window ends with the current (partial) bucket."""
        if self.unit == "hour":
            return now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=self.buckets - 1)
        return now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=self.buckets - 1)

    def keys(self, now: datetime) -> list[str]:
        """Each bucket's key as time_bucket writes it, oldest first."""
        step = timedelta(hours=1) if self.unit == "hour" else timedelta(days=1)
        first = self.start(now)
        return [bucket_key(first + i * step, self.unit) for i in range(self.buckets)]

    def labels(self, keys: list[str]) -> list[str]:
        """Axis labels: 14:00 for an hour, 12-07 for a day (UTC)."""
        return [f"{key[11:13]}:00" if self.unit == "hour" else key[5:10] for key in keys]


HOURLY = Window("24h", "hour", 24, "the last 24 h", "hour (UTC)")
DAILY = Window("30d", "day", 30, "the last 30 days", "day (UTC)")
WINDOWS = {window.key: window for window in (HOURLY, DAILY)}


def bucket_key(moment: datetime, unit: str) -> str:
    """`YYYY-MM-DD HH` (hour) or `YYYY-MM-DD` (day): what time_bucket gives in SQL."""
    return moment.strftime("%Y-%m-%d %H" if unit == "hour" else "%Y-%m-%d")


class _bucket(FunctionElement):
    """The hour or day a timestamp falls in, as text (see bucket_key). The format is written into
    the SQL, not bound, so PostgreSQL sees the same expression in SELECT and GROUP BY. One class
    per unit: SQLAlchemy caches compiled SQL by class and arguments, so a unit held in an
    attribute would get the other unit's cached SQL."""

    type = String()
    inherit_cache = True
    unit = ""


class hour_bucket(_bucket):
    name = "hour_bucket"
    inherit_cache = True
    unit = "hour"


class day_bucket(_bucket):
    name = "day_bucket"
    inherit_cache = True
    unit = "day"


def time_bucket(column: Any, unit: str) -> _bucket:
    """`column`'s hour or day (`unit`) as text, in SQL."""
    if unit not in ("hour", "day"):
        raise ValueError(f"unit must be hour or day, not {unit!r}")
    return hour_bucket(column) if unit == "hour" else day_bucket(column)


@compiles(_bucket)  # PostgreSQL, and str() of a statement
def _time_bucket(element: _bucket, compiler: SQLCompiler, **kw: Any) -> str:
    column = compiler.process(next(iter(element.clauses)), **kw)
    pattern = "YYYY-MM-DD HH24" if element.unit == "hour" else "YYYY-MM-DD"
    return f"to_char({column}, '{pattern}')"


@compiles(_bucket, "sqlite")
def _time_bucket_sqlite(element: _bucket, compiler: SQLCompiler, **kw: Any) -> str:
    """SQLAlchemy stores SQLite timestamps as `YYYY-MM-DD HH:MM:SS.ffffff` text: a prefix."""
    column = compiler.process(next(iter(element.clauses)), **kw)
    return f"substr({column}, 1, {13 if element.unit == 'hour' else 10})"


Series = dict[str, list[float | None]]


def _counts(rows: Iterable[Any], keys: list[str], names: dict[str, str]) -> Series:
    """(group, bucket, count) rows -> one list of counts per named group, 0 where none."""
    index = {key: i for i, key in enumerate(keys)}
    series: Series = {name: [0.0] * len(keys) for name in names.values()}
    for group, bucket, count in rows:
        if group in names and bucket in index:  # a clock ahead of ours: not in the window
            series[names[group]][index[bucket]] = count
    return series


def throughput(session: Session, window: Window, now: datetime | None = None) -> Series:
    """Images classified (per finish time) and SRs delivered (per delivery time) per bucket."""
    now = now or utcnow()
    since, keys = window.start(now), window.keys(now)
    image = time_bucket(Instance.finished_at, window.unit)
    sr = time_bucket(Delivery.delivered_at, window.unit)
    rows = [("image", bucket, n) for bucket, n in session.execute(
        select(image, func.count()).where(Instance.state == InstanceState.CLASSIFIED,
                                          Instance.finished_at >= since).group_by(image))]
    rows += [("sr", bucket, n) for bucket, n in session.execute(
        select(sr, func.count()).where(Delivery.state == DeliveryState.DELIVERED,
                                       Delivery.delivered_at >= since).group_by(sr))]
    return _counts(rows, keys, {"image": "images classified", "sr": "SRs delivered"})


NOT_CLASSIFIED = {InstanceState.OUT_OF_SCOPE: "out of scope (not assessed)", InstanceState.FAILED: "failed",
                  InstanceState.IGNORED: "ignored"}


def refusals(session: Session, window: Window, now: datetime | None = None) -> Series:
    """Per bucket: C-STOREs the node refused (full disk, database down, limits), and images
    the workers did not classify (out of scope, failed, ignored) by when they finished."""
    now = now or utcnow()
    since, keys = window.start(now), window.keys(now)
    refused = time_bucket(RefusedStore.at, window.unit)
    rows = [("refused", bucket, n) for bucket, n in session.execute(
        select(refused, func.count()).where(RefusedStore.at >= since).group_by(refused))]
    finished = time_bucket(Instance.finished_at, window.unit)
    # One range per state (IN on the index's first column): the (state, finished_at) index serves it.
    rows += session.execute(
        select(Instance.state, finished, func.count())
        .where(Instance.state.in_(list(NOT_CLASSIFIED)), Instance.finished_at >= since)
        .group_by(Instance.state, finished)).all()
    return _counts(rows, keys, {"refused": "C-STORE refused by the node",
                                **{str(state): name for state, name in NOT_CLASSIFIED.items()}})


def latency(session: Session, window: Window, now: datetime | None = None) -> Series:
    """Seconds from a study's first image received (C-STORE) to its SR delivered: mean and
    highest per bucket of delivery time, over the SRs delivered in it (as /metrics'
    received_to_delivered, which includes the study's quiet period); None where none was."""
    now = now or utcnow()
    since, keys = window.start(now), window.keys(now)
    bucket = time_bucket(Delivery.delivered_at, window.unit)
    raw = seconds_between(Delivery.delivered_at, Study.first_received_at)
    seconds = case((raw < 0.0, 0.0), else_=raw)  # a clock step must not go below zero
    index = {key: i for i, key in enumerate(keys)}
    series: Series = {"mean": [None] * len(keys), "highest": [None] * len(keys)}
    for key, mean, highest in session.execute(
            select(bucket, func.avg(seconds), func.max(seconds)).join(Study, Study.id == Delivery.study_id)
            .where(Delivery.state == DeliveryState.DELIVERED, Delivery.delivered_at >= since)
            .group_by(bucket)):
        if key in index:
            series["mean"][index[key]], series["highest"][index[key]] = float(mean), float(highest)
    return series


def positive_rate(session: Session, window: Window, now: datetime | None = None) -> tuple[Series, int]:
    """Per model (name@version): the share of results labelled positive in each bucket (None
    where it had none), and the number of results in the window."""
    now = now or utcnow()
    since, keys = window.start(now), window.keys(now)
    bucket = time_bucket(Result.created_at, window.unit)
    positive = func.sum(case((Result.label == POSITIVE_CLASS, 1), else_=0))
    index = {key: i for i, key in enumerate(keys)}
    series: Series = {}
    total = 0
    for name, version, key, n, positives in session.execute(
            select(Result.model_name, Result.model_version, bucket, func.count(), positive)
            .where(Result.created_at >= since)
            .group_by(Result.model_name, Result.model_version, bucket)
            .order_by(Result.model_name, Result.model_version)):
        if key in index:
            series.setdefault(f"{name}@{version}", [None] * len(keys))[index[key]] = positives / n
            total += n
    return series, total
