"""Stage latencies for /metrics are counted and bucketed in SQL over a window (SQLite and
PostgreSQL): values inside it land in the right buckets, exactly as Python would bucket them;
rows outside it are not read.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import count

from core.db import Delivery, DeliveryState, Instance, InstanceState, Series, Study, utcnow
from ops.latency import LATENCY_BUCKETS_S, LATENCY_WINDOW, LatencyHistogram, stage_latencies

NOW = utcnow().replace(microsecond=250_000)
HOUR = timedelta(hours=1)
_uid = count()


def _study(session, first_received_at: datetime) -> tuple[Study, Series]:
    study = Study(study_instance_uid=f"1.2.826.0.7.{next(_uid)}", first_received_at=first_received_at,
                  last_received_at=first_received_at)
    session.add(study)
    session.flush()
    series = Series(study_id=study.id, series_instance_uid=f"1.2.826.0.8.{next(_uid)}", modality="DX")
    session.add(series)
    session.flush()
    return study, series


def _instance(session, study: Study, series: Series, received_at: datetime, finished_at: datetime | None,
              state: str = InstanceState.CLASSIFIED) -> None:
    session.add(Instance(
        study_id=study.id, series_id=series.id, sop_instance_uid=f"1.2.826.0.9.{next(_uid)}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path="/nonexistent", size_bytes=1, sha256="0" * 64, calling_ae_title="MODALITY1", state=state,
        attempts=1, received_at=received_at, finished_at=finished_at))


def _delivery(session, study: Study, delivered_at: datetime | None,
              state: str = DeliveryState.DELIVERED) -> None:
    session.add(Delivery(study_id=study.id, model_name="pneumonia-transfer", model_version="v1",
                         destination=f"PACS{next(_uid)}@127.0.0.1:104",
                         sr_sop_instance_uid=f"1.2.826.0.10.{next(_uid)}", state=state,
                         delivered_at=delivered_at))


def _expected(values: list[float]) -> LatencyHistogram:
    """What the pre-SQL code computed from the values in Python."""
    return LatencyHistogram(len(values), sum(values),
                            tuple(sum(v <= bound for v in values) for bound in LATENCY_BUCKETS_S))


def _assert_histogram(actual: LatencyHistogram, values: list[float]) -> None:
    expected = _expected(values)
    assert (actual.count, actual.buckets) == (expected.count, expected.buckets)
    assert abs(actual.sum_s - expected.sum_s) < 1e-6


# Per image, received -> classified; on the bucket bounds and a microsecond either side of them.
CLASSIFY_S = [0.0, 0.25, 0.499999, 0.5, 0.500001, 1.0, 1.000001, 1.999999, 2.0, 7.5, 59.999999, 3600.0,
              3600.000001, 5000.0]
# The images of the studies below, classified in the window (the one delivered 36 h ago: -0.1 s).
DELIVERED_STUDIES_CLASSIFY_S = [5.0, 6.0, 4.0, 1.0]


def _populate(sessions) -> None:
    with sessions() as session, session.begin():
        study, series = _study(session, NOW - 3 * HOUR)
        for seconds in CLASSIFY_S:
            finished = NOW - 2 * HOUR
            _instance(session, study, series, finished - timedelta(seconds=seconds), finished)
        # Classified before the window (0.3 s: it would land in the first bucket), and images that
        # are not classified or not finished: none is counted.
        _instance(session, study, series, NOW - 30 * HOUR - timedelta(seconds=0.3), NOW - 30 * HOUR)
        _instance(session, study, series, NOW - HOUR - timedelta(seconds=0.3), NOW - HOUR,
                  InstanceState.FAILED)
        _instance(session, study, series, NOW - HOUR, None, InstanceState.QUEUED)

        # Delivered in the window: last image classified 3 s before, first received 10 s before.
        delivered, (study, series) = NOW - HOUR, _study(session, NOW - HOUR - timedelta(seconds=10))
        _instance(session, study, series, delivered - timedelta(seconds=10), delivered - timedelta(seconds=5))
        _instance(session, study, series, delivered - timedelta(seconds=9), delivered - timedelta(seconds=3))
        _delivery(session, study, delivered)
        # Re-delivered before the last image was classified (a re-run): clamped to 0, not negative.
        delivered, (study, series) = NOW - HOUR, _study(session, NOW - HOUR - timedelta(seconds=0.75))
        _instance(session, study, series, delivered, delivered + timedelta(seconds=4))
        _delivery(session, study, delivered)
        # Delivered a day and a half ago, and one still retrying: not counted.
        delivered = NOW - 36 * HOUR
        study, series = _study(session, delivered - timedelta(seconds=0.2))
        _instance(session, study, series, delivered, delivered - timedelta(seconds=0.1))
        _delivery(session, study, delivered)
        study, series = _study(session, NOW - HOUR)
        _instance(session, study, series, NOW - HOUR, NOW - HOUR + timedelta(seconds=1))
        _delivery(session, study, None, DeliveryState.RETRYING)


def test_latencies_inside_the_window_are_bucketed_and_older_rows_are_not_read(sessions) -> None:
    _populate(sessions)
    with sessions() as session:
        latencies = stage_latencies(session, now=NOW)
    assert timedelta(hours=24) == LATENCY_WINDOW
    _assert_histogram(latencies["received_to_classified"], [*CLASSIFY_S, *DELIVERED_STUDIES_CLASSIFY_S])
    _assert_histogram(latencies["classified_to_delivered"], [3.0, 0.0])
    _assert_histogram(latencies["received_to_delivered"], [10.0, 0.75])
    assert latencies["received_to_classified"].buckets[:3] == (4, 7, 10)  # <= 0.5, <= 1, <= 2


def test_a_wider_window_reads_the_older_rows(sessions) -> None:
    _populate(sessions)
    with sessions() as session:
        latencies = stage_latencies(session, window=timedelta(hours=48), now=NOW)
        empty = stage_latencies(session, window=timedelta(minutes=1), now=NOW)
    _assert_histogram(latencies["received_to_classified"],
                      [*CLASSIFY_S, *DELIVERED_STUDIES_CLASSIFY_S, 0.3, -0.1])
    _assert_histogram(latencies["classified_to_delivered"], [3.0, 0.0, 0.1])
    _assert_histogram(latencies["received_to_delivered"], [10.0, 0.75, 0.2])
    assert all(h == LatencyHistogram() for h in empty.values())
