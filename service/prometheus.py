"""GET /metrics: the job's Beam metrics and the group's lag as Prometheus families.

A custom collector on a registry of its own (no process-global state): each
scrape turns one MetricsSnapshot (service/job_metrics.py, committed values
from the runner, cached ~1 s) and one lag reading into:

| family | type | labels | from (Beam namespace.name) |
| --- | --- | --- | --- |
| learning_events_processed | counter (``_total``) | event_type | DecodeAndValidate.valid.<event_type> |
| schema_validation_errors | counter (``_total``) | error_code | DecodeAndValidate.dead_letters_<CODE> |
| dlq_messages | counter (``_total``) | error_code | PublishDeadLettersFn.published.<CODE> (acknowledged by the broker) |
| event_processing_duration | histogram, seconds | le | ReadEvents.processing_seconds_bucket_<b>, _sum_ms |
| sink_write_duration | histogram, seconds | sink, le | <Sink>.write_seconds_bucket_<b>, _sum_ms |
| aggregation_window_size | gauge, rows | window | <Sink>.pane_rows.<window> (newest write over the sinks) |
| sink_breaker_openings | counter (``_total``) | sink | <Sink>.breaker_opened |
| consumer_lag | gauge, records | topic, partition | Kafka: end offset - group's committed offset |
"""
from __future__ import annotations

from typing import Iterable, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from service.job_metrics import MetricsSnapshot
from service.lag import LagReading
from transforms.latency import SUM_SUFFIX, cumulative

DECODE = "DecodeAndValidate"
DLQ_SINK = "PublishDeadLettersFn"
# Sink namespaces -> the ``sink`` label.
SINKS = {"WriteMetricsToRedis": "redis", "WriteMetricsToPostgres": "postgres",
         "PublishAggregatesFn": "kafka_aggregates", "PublishDeadLettersFn": "kafka_dead_letters",
         "ArchiveRawEvents": "postgres_archive"}
PANE_SINKS = ("WriteMetricsToRedis", "WriteMetricsToPostgres")


def histogram(snap: MetricsSnapshot, namespace: str, prefix: str) -> tuple[list, float]:
    """Cumulative ``[(le, count)]`` for every bound, and the sum in seconds, from the per-bucket
    counters of transforms/latency.py (one exists only once an event fell in its bucket: a missing
    one is 0)."""
    buckets = cumulative(lambda name: snap.counter(namespace, name), prefix)
    return buckets, snap.counter(namespace, f"{prefix}{SUM_SUFFIX}") / 1000.0


def families(snap: MetricsSnapshot, lag: Optional[LagReading]) -> list[Metric]:
    """In: a metrics snapshot and a lag reading. Out: the Prometheus metric families (pure)."""
    out: list[Metric] = []
    processed = CounterMetricFamily("learning_events_processed", "Valid events decoded, by event type",
                                    labels=["event_type"])
    for event_type, n in sorted(snap.named(DECODE, "valid.").items()):
        processed.add_metric([event_type], n)
    errors = CounterMetricFamily("schema_validation_errors", "Records that failed decoding or validation, "
                                 "by error code", labels=["error_code"])
    for code, n in sorted(snap.named(DECODE, "dead_letters_").items()):
        errors.add_metric([code], n)
    dlq = CounterMetricFamily("dlq_messages", "Dead letters acknowledged by the broker on the dead-letter "
                              "topic, by error code", labels=["error_code"])
    for code, n in sorted(snap.named(DLQ_SINK, "published.").items()):
        dlq.add_metric([code], n)
    out += [processed, errors, dlq]

    duration = HistogramMetricFamily("event_processing_duration", "Seconds from the Kafka poll that read a "
                                     "record to every step fused with the reader having handled its batch")
    buckets, total = histogram(snap, "ReadEvents", "processing_seconds")
    duration.add_metric([], buckets, total)
    out.append(duration)

    writes = HistogramMetricFamily("sink_write_duration", "Seconds one sink write took (a pane for Redis and "
                                   "Postgres, a bundle's flush for Kafka), retries included", labels=["sink"])
    for namespace, sink in SINKS.items():
        buckets, total = histogram(snap, namespace, "write_seconds")
        if buckets[-1][1]:
            writes.add_metric([sink], buckets, total)
    out.append(writes)

    out.append(window_sizes(snap))
    openings = CounterMetricFamily("sink_breaker_openings", "Times a sink's circuit breaker opened",
                                   labels=["sink"])
    for namespace, sink in SINKS.items():
        openings.add_metric([sink], snap.counter(namespace, "breaker_opened"))
    out.append(openings)

    lag_family = GaugeMetricFamily("consumer_lag", "Records of a partition not yet committed by the job's "
                                   "consumer group (end offset minus committed offset)",
                                   labels=["topic", "partition"])
    for p in (lag.partitions if lag else ()):
        lag_family.add_metric([p.topic, str(p.partition)], p.lag)
    out.append(lag_family)
    return out


def latest_panes(snap: MetricsSnapshot) -> dict:
    """{window label: {"rows", "window_start_ms", "written_at_ms", "sink"}}: the newest pane written per size."""
    panes: dict = {}
    for sink in PANE_SINKS:
        for (ns, name), (written_at, _) in snap.gauges.items():
            if ns != sink or not name.startswith("pane_written_at_ms."):
                continue
            label = name.split(".", 1)[1]
            if label in panes and panes[label]["written_at_ms"] >= written_at:
                continue
            panes[label] = {"rows": snap.gauge(sink, f"pane_rows.{label}"),
                            "window_start_ms": snap.gauge(sink, f"pane_window_start_ms.{label}"),
                            "written_at_ms": written_at, "sink": SINKS[sink]}
    return panes


def window_sizes(snap: MetricsSnapshot) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily("aggregation_window_size", "Rows (one per family and entity) in the newest "
                              "pane written, per window size", labels=["window"])
    for label, pane in sorted(latest_panes(snap).items()):
        gauge.add_metric([label], pane["rows"] or 0)
    return gauge


class JobCollector(Collector):
    """Collects ``families`` from live sources: ``snapshot()`` and ``lag()`` (None when lag is off)."""

    def __init__(self, snapshot, lag=None):
        self._snapshot, self._lag = snapshot, lag

    def collect(self) -> Iterable[Metric]:
        return families(self._snapshot(), self._lag() if self._lag else None)


def registry_for(collector: Collector) -> CollectorRegistry:
    """A registry holding only ``collector`` (the default registry's process metrics are not ours)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
