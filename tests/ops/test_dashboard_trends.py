"""The dashboard's figures over time (ops.trends), on SQLite and PostgreSQL: each series equals a
count made in Python over the same rows; the charts and their empty states on the pages; with
the run stopped, the queue panel says so in one line."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from core.db import (
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    RefusedStore,
    Result,
    Series,
    Study,
    utcnow,
)
from core.settings import Settings
from ops import trends
from ops.dashboard import create_app
from tests.conftest import REDIS_TEST_URL

STATES = [InstanceState.CLASSIFIED, InstanceState.OUT_OF_SCOPE, InstanceState.FAILED, InstanceState.IGNORED,
          InstanceState.QUEUED]
MODELS = [("pneumonia-cnn", "v1"), ("pneumonia-cnn", "v2")]


def _instance(study: Study, series: Series, n: int, **fields) -> Instance:
    return Instance(study_id=study.id, series_id=series.id, sop_instance_uid=f"1.2.826.0.3.{n}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path="/nonexistent", size_bytes=1, sha256="0" * 64, calling_ae_title="MODALITY1",
                    attempts=1, **fields)


def _populate(sessions, now: datetime, count: int = 150) -> dict[str, list]:
    """Studies, images, results, SRs and refused C-STOREs spread from 40 days ago to 2 hours
    ahead (a clock ahead of ours), at random microseconds; returns the rows as written."""
    rng = random.Random(22)

    def moment() -> datetime:  # half in the last day or so, where the hours are
        return now - timedelta(seconds=rng.uniform(-2 * 3600, rng.choice([26 * 3600, 40 * 86400])))

    rows: dict[str, list] = defaultdict(list)
    with sessions() as session, session.begin():
        for n in range(count):
            first = moment()
            study = Study(study_instance_uid=f"1.2.826.0.1.{n}", first_received_at=first,
                          last_received_at=first)
            session.add(study)
            session.flush()
            series = Series(study_id=study.id, series_instance_uid=f"1.2.826.0.2.{n}", modality="DX")
            session.add(series)
            session.flush()
            state = rng.choice(STATES)
            finished = (None if state == InstanceState.QUEUED
                        else first + timedelta(seconds=rng.uniform(0, 90)))
            instance = _instance(study, series, n, state=state, received_at=first, finished_at=finished)
            session.add(instance)
            session.flush()
            rows["instances"].append((state, finished))
            if state == InstanceState.CLASSIFIED:
                name, version = rng.choice(MODELS)
                label = rng.choice(["PNEUMONIA", "NORMAL"])
                created = finished + timedelta(milliseconds=5)
                session.add(Result(instance_id=instance.id, model_name=name, model_version=version,
                                   probability=0.5, threshold=0.5, label=label, decode_ms=1, inference_ms=1,
                                   created_at=created))
                rows["results"].append((f"{name}@{version}", label, created))
                delivery_state = rng.choice([DeliveryState.DELIVERED] * 2 + [DeliveryState.DEAD])
                # Now and then an SR stamped before the study's first image (a clock step): counted as 0 s.
                delivered = finished + timedelta(seconds=rng.uniform(-5, 600))
                session.add(Delivery(
                    study_id=study.id, model_name=name, model_version=version,
                    destination="PACS@10.0.0.1:104",
                    sr_sop_instance_uid=f"1.2.826.0.9.{n}", state=delivery_state, attempts=1,
                    delivered_at=delivered if delivery_state == DeliveryState.DELIVERED else None))
                if delivery_state == DeliveryState.DELIVERED:
                    rows["delivered"].append((delivered, max(0.0, (delivered - first).total_seconds())))
            if rng.random() < 0.4:
                at = moment()
                session.add(RefusedStore(at=at, calling_ae_title="MODALITY1", status=0xA700,
                                         reason="disk full"))
                rows["refused"].append(at)
    return rows


def _expected_counts(window: trends.Window, now: datetime, times: list[datetime]) -> list[int]:
    keys = window.keys(now)
    start = window.start(now)
    counts = dict.fromkeys(keys, 0)
    for at in times:
        key = trends.bucket_key(at, window.unit)
        if at >= start and key in counts:
            counts[key] += 1
    return list(counts.values())


@pytest.mark.parametrize("window", [trends.HOURLY, trends.DAILY], ids=["24h", "30d"])
def test_each_series_equals_a_count_over_the_same_rows(sessions, window: trends.Window) -> None:
    now = utcnow()
    rows = _populate(sessions, now)
    keys = window.keys(now)
    assert len(keys) == window.buckets and keys[-1] == trends.bucket_key(now, window.unit)

    def finished_in(state: str) -> list[datetime]:
        return [at for s, at in rows["instances"] if s == state and at is not None]

    with sessions() as session:
        done = trends.throughput(session, window, now)
        refused = trends.refusals(session, window, now)
        late = trends.latency(session, window, now)
        rates, results = trends.positive_rate(session, window, now)

    assert done["images classified"] == _expected_counts(window, now, finished_in(InstanceState.CLASSIFIED))
    assert done["SRs delivered"] == _expected_counts(window, now, [at for at, _ in rows["delivered"]])
    assert refused["C-STORE refused by the node"] == _expected_counts(window, now, rows["refused"])
    for state, name in trends.NOT_CLASSIFIED.items():
        assert refused[name] == _expected_counts(window, now, finished_in(state)), name
    assert sum(done["images classified"]) > 0 and sum(refused["failed"]) > 0  # the test saw data

    start = window.start(now)
    seconds: dict[str, list[float]] = defaultdict(list)
    for at, value in rows["delivered"]:
        if at >= start:
            seconds[trends.bucket_key(at, window.unit)].append(value)
    assert late["mean"] == [pytest.approx(sum(seconds[k]) / len(seconds[k]), abs=1e-6) if seconds[k] else None
                            for k in keys]
    assert late["highest"] == [pytest.approx(max(seconds[k]), abs=1e-6) if seconds[k] else None for k in keys]

    labels: dict[tuple[str, str], list[str]] = defaultdict(list)
    for model, label, at in rows["results"]:
        if at >= start and trends.bucket_key(at, window.unit) in keys:
            labels[(model, trends.bucket_key(at, window.unit))].append(label)
    assert results == sum(len(v) for v in labels.values())
    expected = {model: [(labels[(model, k)].count("PNEUMONIA") / len(labels[(model, k)]))
                        if labels[(model, k)] else None for k in keys]
                for model in sorted({model for model, _ in labels})}
    assert rates == expected


def test_a_bucket_is_the_hour_or_day_in_sql_as_in_python(sessions) -> None:
    """time_bucket's SQL text equals bucket_key on the boundaries (a microsecond either side)."""
    now = utcnow()
    hour = now.replace(minute=0, second=0, microsecond=0)
    with sessions() as session, session.begin():
        for n, at in enumerate([hour, hour - timedelta(microseconds=1), hour + timedelta(microseconds=1)]):
            session.add(RefusedStore(id=n + 1, at=at, calling_ae_title="A", status=0xA700, reason="x"))
    from sqlalchemy import select

    with sessions() as session:
        for unit in ("hour", "day"):
            got = session.execute(select(RefusedStore.at, trends.time_bucket(RefusedStore.at, unit))).all()
            assert [key for _, key in got] == [trends.bucket_key(at, unit) for at, _ in got]
    with pytest.raises(ValueError):
        trends.time_bucket(RefusedStore.at, "week")


def _settings(tmp_path: Path, database_url: str, **extra) -> Settings:
    return Settings(home=tmp_path / "home", database_url=database_url, models_dir=tmp_path / "models",
                    **extra)


def test_pages_show_the_charts_and_their_empty_states(sessions, database_url: str, tmp_path: Path) -> None:
    client = TestClient(create_app(_settings(tmp_path, database_url, broker_url=f"{REDIS_TEST_URL}/12")))
    empty = client.get("/").text
    assert len(re.findall(r'class="chart empty"', empty)) == 4
    assert "no SR delivered in the last 24 h" in empty and "no image classified in the last 24 h" in empty

    _populate(sessions, utcnow())
    page = client.get("/").text
    drawn = re.findall(r'<svg [^>]*role="img"[^>]*>', page)
    assert len(drawn) == 4 and not any("empty" in tag for tag in drawn)
    assert 'href="/trends?window=30d"' in page
    monthly = client.get("/trends?window=30d")
    assert monthly.status_code == 200 and "per day, the last 30 days" in monthly.text
    assert len(re.findall(r'<svg [^>]*role="img"', monthly.text)) == 4
    assert "Content-Security-Policy" in monthly.headers and "<script" not in monthly.text
    assert client.get("/trends?window=7y").status_code == 400


def test_standalone_dashboard_with_the_run_stopped_says_so(database_url: str, tmp_path: Path) -> None:
    """Was `unreachable (OperationalError)` on every queue row (issue 22)."""
    settings = _settings(tmp_path, database_url)  # no PNEUMO_BROKER_URL: `pneumo run`'s own broker
    client = TestClient(create_app(settings))
    page = client.get("/").text
    line = re.search(r'id="queues-down">([^<]*)<', page).group(1)
    assert line.startswith("pneumo run is not running") and str(settings.home_dir) in line
    assert "unreachable" not in page and "OperationalError" not in page
    settings.redis_socket.write_text("")  # left behind by a run that died: nobody answers on it
    line = re.search(r'id="queues-down">([^<]*)<', client.get("/").text).group(1)
    assert line == (f"pneumo run is not running (its broker socket in {settings.home_dir} "
                    "does not answer); start it")
    assert client.get("/healthz").json()["broker"] == "unreachable"
