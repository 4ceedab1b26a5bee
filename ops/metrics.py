"""Prometheus exposition of `ops.monitoring.Snapshot`: one endpoint for every process.

The node, workers and scheduler run as separate processes (or containers); everything they do is
in the database, so one collector reading it at scrape time sees all of them, with no
multi-process metric files to share. Totals are derived from rows that are never deleted, so the
counters only grow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from ops.latency import LATENCY_BUCKETS_S, LATENCY_WINDOW, LatencyHistogram
from ops.monitoring import Snapshot

PREFIX = "pneumo"


class SnapshotCollector:
    def __init__(self, read_snapshot: Callable[[], Snapshot]) -> None:
        self.read_snapshot = read_snapshot

    def describe(self) -> list[Metric]:
        return []  # collected lazily: registering must not touch the database

    def collect(self) -> Iterator[Metric]:
        snap = self.read_snapshot()
        yield _gauge("database_up", "1 when the database answered", [((), float(snap.database_ok))])
        yield _gauge("broker_up", "1 when the broker answered", [((), float(snap.broker_ok))])
        yield _gauge("storage_free_bytes", "Free space on the storage filesystem",
                     [((), snap.free_disk_mb * 1024 * 1024)])
        yield _gauge("storage_free_floor_bytes", "Below this the node answers 0xA700",
                     [((), snap.min_free_disk_mb * 1024 * 1024)])
        yield _gauge("queue_depth", "Messages waiting per queue",
                     [((q,), float(d)) for q, d in snap.queue_depths.items() if isinstance(d, int)],
                     ["queue"])
        yield _gauge("oldest_waiting_seconds", "Age of the oldest job not yet started, per stage",
                     [((stage,), age) for stage, age in snap.oldest_waiting_s.items()], ["stage"])
        yield _counter("cstore", "C-STOREs answered, by status and calling AE (0x0000: newly stored)",
                       [(k, v) for k, v in snap.cstores.items()], ["status", "calling_ae"])
        yield _counter("cstore_refused_by_reason", "Refused C-STOREs by reason",
                       [((r,), v) for r, v in snap.refusal_reasons.items()], ["reason"])
        yield _gauge("instances", "Instances by state",
                     [((s,), float(n)) for s, n in snap.instances_by_state.items()], ["state"])
        yield _counter("instance_failures", "Instances failed, ignored or refused as out of scope, by reason",
                       [(k, v) for k, v in snap.failures_by_reason.items()], ["state", "reason"])
        yield _counter("results", "Results by label and model version",
                       [(k, v) for k, v in snap.results_by_label.items()], ["label", "model", "version"])
        yield _gauge("deliveries", "SR deliveries by state (dead: dead-lettered)",
                     [((s,), float(n)) for s, n in snap.deliveries_by_state.items()], ["state"])
        yield _counter("delivery_retries", "Failed SR C-STOREs that were retried",
                       [((), snap.delivery_retries)])
        yield _counter("dead_letters", "SR deliveries dead-lettered after the last attempt",
                       [((), snap.dead_letters)])
        histogram = HistogramMetricFamily(
            f"{PREFIX}_stage_latency_seconds",
            f"Seconds per pipeline stage over the last {LATENCY_WINDOW.total_seconds() / 3600:g} h "
            "(a sliding window, not a running total)",
            labels=["stage"])
        for stage, latencies in snap.latencies_s.items():
            histogram.add_metric([stage], _buckets(latencies), latencies.sum_s)
        yield histogram
        info = InfoMetricFamily(f"{PREFIX}_served_model", "Served model versions", labels=["model"])
        for name, card in snap.served.items():
            info.add_metric([name], {"version": str(card.get("version", "")),
                                     "sha256": str(card.get("model_sha256", ""))[:12],
                                     "threshold": f"{card.get('threshold', float('nan')):.4f}"
                                     if "threshold" in card else ""})
        yield info
        window = [d for d in snap.drift if d.day == "last 24 h"]
        labels = ["model", "version"]
        yield _gauge("model_positive_rate_24h", "Share of PNEUMONIA results, last 24 h",
                     [((d.model_name, d.model_version), d.positive_rate) for d in window if d.n], labels)
        yield _gauge("model_results_24h", "Results in the last 24 h",
                     [((d.model_name, d.model_version), float(d.n)) for d in window], labels)
        yield _gauge("model_score_psi_24h", "PSI of production scores vs the card's validation scores",
                     [((d.model_name, d.model_version), d.psi) for d in window if not math.isnan(d.psi)],
                     labels)
        yield _gauge("model_score_psi_threshold_24h",
                     "PSI the last 24 h must exceed to alert: its noise level at that many results "
                     "(PNEUMO_DRIFT_FALSE_ALARM_RATE), at least PNEUMO_DRIFT_PSI_ALERT",
                     [((d.model_name, d.model_version), d.threshold) for d in window
                      if not math.isnan(d.threshold)], labels)
        yield _gauge("model_drift_alert", "1 when the 24 h PSI exceeds its threshold (over >= 20 results)",
                     [((d.model_name, d.model_version), float(d.alert)) for d in window], labels)


def _gauge(name: str, doc: str, samples, labels: list[str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels or [])
    for label_values, value in samples:
        family.add_metric(list(label_values), value)
    return family


def _counter(name: str, doc: str, samples, labels: list[str] | None = None) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels or [])
    for label_values, value in samples:
        family.add_metric(list(label_values), value)
    return family


def _buckets(latencies: LatencyHistogram) -> list[tuple[str, float]]:
    pairs = zip(LATENCY_BUCKETS_S, latencies.buckets, strict=True)
    return [*((str(float(bound)), float(count)) for bound, count in pairs), ("+Inf", float(latencies.count))]


def exposition(read_snapshot: Callable[[], Snapshot]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(read_snapshot))
    return generate_latest(registry)
