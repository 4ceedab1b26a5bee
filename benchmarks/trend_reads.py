"""How long the dashboard's charts over time take to read as history grows.

Why: the main page draws four charts per hour over 24 h on every load (it refreshes every 15 s)
and /trends four per day over 30 days; a hospital keeps months of studies, and what the charts
read must not grow with them. The database gets `--history` classified and delivered studies
2-90 days old and `--recent` ones within the last hour (metrics_scrape.populate), each image with
a result, plus one refused C-STORE per ten studies; then the four reads of each window
(ops.trend_pages.charts without the drawing) are timed `--rounds` times, and, once, the reads
and the drawing (cache cleared). The 30-day window holds about a third of the history here
(2-90 days old), so its reads grow with it; the 24-hour window's should not.

    .venv/bin/python benchmarks/trend_reads.py --history 0 10000 100000 --recent 1000
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import database, load_average, median, print_table
from metrics_scrape import history_arguments, populate


def add_results_and_refusals(url: str) -> None:
    """A result per classified image (alternating labels) and a refused C-STORE per ten studies,
    at the times metrics_scrape.populate gave them."""
    from sqlalchemy import insert, select, text

    from core.db import Instance, RefusedStore, Result, session_factory

    sessions = session_factory(url)
    with sessions() as session, session.begin():
        instances = session.execute(select(Instance.id, Instance.finished_at)).all()
        for start in range(0, len(instances), 5000):
            chunk = instances[start:start + 5000]
            session.execute(insert(Result), [
                {"instance_id": i, "model_name": "pneumonia-cnn", "model_version": "v1", "probability": 0.5,
                 "threshold": 0.5, "label": "PNEUMONIA" if i % 2 else "NORMAL", "decode_ms": 1.0,
                 "inference_ms": 1.0, "created_at": at} for i, at in chunk])
            session.execute(insert(RefusedStore), [
                {"at": at, "calling_ae_title": "MODALITY", "status": 0xA700, "reason": "disk full"}
                for i, at in chunk if i % 10 == 0])
    if url.startswith("postgresql"):
        with sessions() as session, session.begin():
            session.execute(text("ANALYZE"))
    sessions.kw["bind"].dispose()


def time_reads(url: str, rounds: int) -> dict[str, float]:
    """Median seconds of the four reads per window, and of drawing the hourly charts once."""
    from core.db import session_factory
    from ops import charts, trend_pages, trends

    sessions = session_factory(url)
    timings: dict[str, list[float]] = {window.key: [] for window in trends.WINDOWS.values()}
    for _ in range(rounds):
        for window in trends.WINDOWS.values():
            with sessions() as session:
                started = time.perf_counter()
                trends.throughput(session, window)
                trends.latency(session, window)
                trends.refusals(session, window)
                trends.positive_rate(session, window)
                timings[window.key].append(time.perf_counter() - started)
    charts._draw.cache_clear()  # drawn afresh, as when the data changed
    with sessions() as session:
        started = time.perf_counter()
        trend_pages.charts(session, trends.HOURLY)
        drawn = time.perf_counter() - started
    sessions.kw["bind"].dispose()
    return {**{key: median(values) for key, values in timings.items()}, "drawn": drawn}


def main() -> None:
    args = history_arguments(__doc__.split("\n\n")[0])
    rows = []
    for backend in args.backends:
        for history in args.history:
            with tempfile.TemporaryDirectory() as home, database(backend, Path(home)) as url:
                populate(url, history, args.recent)
                add_results_and_refusals(url)
                times = time_reads(url, args.rounds)
                rows.append([backend, history, args.recent, f"{1000 * times['24h']:.1f}",
                             f"{1000 * times['30d']:.1f}", f"{1000 * times['drawn']:.0f}"])
    print(f"load average: {load_average()}")
    print_table(["database", "studies older than a day", "studies in the last hour",
                 "4 reads per hour, 24 h: median ms", "4 reads per day, 30 d: median ms",
                 "reads + drawing the 4 hourly charts, ms"], rows)


if __name__ == "__main__":
    main()
