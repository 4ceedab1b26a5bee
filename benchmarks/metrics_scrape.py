"""How long the stage-latency read of a /metrics scrape takes as history grows.

Why: `ops.latency.stage_latencies` runs on every Prometheus scrape. A hospital keeps months of
studies; what it reads must not grow with them. The database gets `--history` classified and
delivered studies older than a day (one image each) and `--recent` ones within the last hour,
then the read is timed `--rounds` times.

    .venv/bin/python benchmarks/metrics_scrape.py --history 0 10000 100000 --recent 1000

Run the same file from a checkout of an older commit to compare code versions: it calls
`stage_latencies(session)`, which both the list-returning and the bucketed versions accept.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from common import database, load_average, median, print_table


def populate(url: str, history: int, recent: int) -> None:
    """`history` studies delivered 2-90 days ago, `recent` within the last hour; one image each."""
    from sqlalchemy import insert, text

    from core.db import (
        Delivery,
        DeliveryState,
        Instance,
        InstanceState,
        Series,
        Study,
        session_factory,
        utcnow,
    )

    now = utcnow()
    sessions = session_factory(url)
    ages = [timedelta(days=2 + 88 * i / max(history, 1)) for i in range(history)]
    ages += [timedelta(minutes=60 * i / max(recent, 1)) for i in range(recent)]
    batch = 5000
    with sessions() as session, session.begin():
        for start in range(0, len(ages), batch):
            chunk = list(enumerate(ages[start:start + batch], start))
            received = {i: now - age for i, age in chunk}
            session.execute(insert(Study), [
                {"id": i + 1, "study_instance_uid": f"1.2.826.0.7.{i}", "first_received_at": received[i],
                 "last_received_at": received[i]} for i, _ in chunk])
            session.execute(insert(Series), [
                {"id": i + 1, "study_id": i + 1, "series_instance_uid": f"1.2.826.0.8.{i}", "modality": "DX"}
                for i, _ in chunk])
            session.execute(insert(Instance), [
                {"study_id": i + 1, "series_id": i + 1, "sop_instance_uid": f"1.2.826.0.9.{i}",
                 "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1", "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                 "path": "/nonexistent", "size_bytes": 1, "sha256": "0" * 64, "calling_ae_title": "MODALITY",
                 "state": InstanceState.CLASSIFIED, "attempts": 1, "received_at": received[i],
                 "finished_at": received[i] + timedelta(seconds=2)} for i, _ in chunk])
            session.execute(insert(Delivery), [
                {"study_id": i + 1, "model_name": "pneumonia-transfer", "model_version": "v1",
                 "destination": "PACS@127.0.0.1:104", "sr_sop_instance_uid": f"1.2.826.0.10.{i}",
                 "state": DeliveryState.DELIVERED, "attempts": 1, "updated_at": received[i],
                 "delivered_at": received[i] + timedelta(seconds=9)} for i, _ in chunk])
    if url.startswith("postgresql"):
        # A live PostgreSQL has statistics (autovacuum analyses tables as they grow); SQLite has
        # none unless someone runs ANALYZE, and pneumo does not.
        with sessions() as session, session.begin():
            session.execute(text("ANALYZE"))
    sessions.kw["bind"].dispose()


def time_read(url: str, rounds: int) -> float:
    from core.db import session_factory
    from ops.latency import stage_latencies

    sessions = session_factory(url)
    seconds = []
    for _ in range(rounds):
        with sessions() as session:
            started = time.perf_counter()
            stage_latencies(session)
            seconds.append(time.perf_counter() - started)
    sessions.kw["bind"].dispose()
    return median(seconds)


def history_arguments(description: str) -> argparse.Namespace:
    """The options of a benchmark over databases of growing history (this one, trend_reads)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--history", type=int, nargs="+", default=[0, 10_000, 100_000])
    parser.add_argument("--recent", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    return parser.parse_args()


def main() -> None:
    args = history_arguments(__doc__.split("\n\n")[0])
    rows = []
    for backend in args.backends:
        for history in args.history:
            with tempfile.TemporaryDirectory() as home, database(backend, Path(home)) as url:
                populate(url, history, args.recent)
                rows.append([backend, history, args.recent, f"{1000 * time_read(url, args.rounds):.1f}"])
    print(f"load average: {load_average()}")
    print_table(["database", "studies older than a day", "studies in the last hour",
                 "stage_latencies per scrape, median ms"], rows)


if __name__ == "__main__":
    main()
