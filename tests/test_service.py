"""The analytics service's pure pieces: metric families from a snapshot, redaction, correlation ids.

No services needed: a MetricsSnapshot is plain data (what the runner's job
service answered), and the correlation middleware is exercised through
FastAPI's TestClient, an in-process HTTP client.
"""
from __future__ import annotations

import collections
import logging
import math

import apache_beam as beam
from apache_beam.metrics.cells import GaugeData, GaugeResult
from apache_beam.metrics.execution import MetricKey, MetricResult
from apache_beam.metrics.metricbase import MetricName
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipelines.options import redact
from service import correlation
from service.job_metrics import MetricsSnapshot, snapshot_of
from service.lag import LagReading, PartitionLag
from service.prometheus import JobCollector, families, histogram, latest_panes, registry_for
from service.status import rate, redact_options
from transforms.latency import BUCKETS_S, LatencyHistogram, bucket_label


def buckets(namespace: str, prefix: str, durations_s: list[float]) -> dict:
    """The counters LatencyHistogram would have left for ``durations_s`` (computed here, not by it):
    one per bucket something fell in, (previous bound, bound]."""
    out = {}
    for lower, bound in zip((-math.inf,) + BUCKETS_S, BUCKETS_S):
        n = sum(1 for d in durations_s if lower < d <= bound)
        if n:
            out[(namespace, f"{prefix}_bucket_{bucket_label(bound)}")] = n
    out[(namespace, f"{prefix}_sum_ms")] = round(sum(durations_s) * 1000)
    return out


def scrape(snap: MetricsSnapshot, lag=None) -> dict:
    text = generate_latest(registry_for(JobCollector(lambda: snap, lambda: lag))).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


SNAP = MetricsSnapshot(
    counters={("DecodeAndValidate", "valid_events"): 7, ("DecodeAndValidate", "valid.question_answered"): 5,
              ("DecodeAndValidate", "valid.content_viewed"): 2, ("DecodeAndValidate", "dead_letters"): 3,
              ("DecodeAndValidate", "dead_letters_WRONG_TYPE"): 2,
              ("DecodeAndValidate", "dead_letters_BAD_FRAMING"): 1,
              ("PublishDeadLettersFn", "published.WRONG_TYPE"): 2,
              ("PublishDeadLettersFn", "published.BAD_FRAMING"): 1,
              ("WriteMetricsToRedis", "breaker_opened"): 1,
              **buckets("ReadEvents", "processing_seconds", [0.003, 0.02, 0.02, 0.7, 12.0]),
              **buckets("WriteMetricsToRedis", "write_seconds", [0.001, 0.004])},
    gauges={("WriteMetricsToRedis", "pane_rows.1m"): (40, 10.0),
            ("WriteMetricsToRedis", "pane_window_start_ms.1m"): (60_000, 10.0),
            ("WriteMetricsToRedis", "pane_written_at_ms.1m"): (1_000, 10.0),
            ("WriteMetricsToPostgres", "pane_rows.1m"): (41, 11.0),
            ("WriteMetricsToPostgres", "pane_window_start_ms.1m"): (120_000, 11.0),
            ("WriteMetricsToPostgres", "pane_written_at_ms.1m"): (2_000, 11.0)},
    taken_at=1.0)


def test_the_seed_metrics_come_from_their_beam_counters():
    got = scrape(SNAP)
    assert got[("learning_events_processed_total", frozenset({("event_type", "question_answered")}))] == 5
    assert got[("learning_events_processed_total", frozenset({("event_type", "content_viewed")}))] == 2
    assert got[("schema_validation_errors_total", frozenset({("error_code", "WRONG_TYPE")}))] == 2
    assert got[("dlq_messages_total", frozenset({("error_code", "BAD_FRAMING")}))] == 1
    assert got[("sink_breaker_openings_total", frozenset({("sink", "redis")}))] == 1
    # the totals (valid_events, dead_letters) are not event types or codes
    assert not any(dict(labels).get("event_type") == "events" for _, labels in got)


def test_the_duration_histogram_is_rebuilt_from_bucket_counters():
    got = scrape(SNAP)
    le = {dict(labels)["le"]: v for (name, labels), v in got.items() if name == "event_processing_duration_bucket"}
    assert le["0.005"] == 1 and le["0.025"] == 3 and le["1.0"] == 4 and le["10.0"] == 4 and le["30.0"] == 5
    assert le["+Inf"] == got[("event_processing_duration_count", frozenset())] == 5
    assert math.isclose(got[("event_processing_duration_sum", frozenset())], 12.743)
    values = [le[bucket_label(b)] for b in BUCKETS_S]
    assert values == sorted(values)  # cumulative, also where no counter exists (0)
    assert got[("sink_write_duration_count", frozenset({("sink", "redis")}))] == 2


def test_the_window_gauge_takes_the_newest_pane_over_the_sinks():
    assert latest_panes(SNAP)["1m"] == {"rows": 41, "window_start_ms": 120_000, "written_at_ms": 2_000,
                                        "sink": "postgres"}
    assert scrape(SNAP)[("aggregation_window_size", frozenset({("window", "1m")}))] == 41


def test_lag_is_per_topic_partition_and_counts_a_partition_never_committed_whole():
    lag = LagReading([PartitionLag("t", 0, 10, 15), PartitionLag("t", 1, None, 4), PartitionLag("u", 0, 9, 9)])
    got = scrape(SNAP, lag)
    assert got[("consumer_lag", frozenset({("topic", "t"), ("partition", "0")}))] == 5
    assert got[("consumer_lag", frozenset({("topic", "t"), ("partition", "1")}))] == 4
    assert got[("consumer_lag", frozenset({("topic", "u"), ("partition", "0")}))] == 0


def test_an_empty_snapshot_still_gives_every_family():
    names = {f.name for f in families(MetricsSnapshot(), None)}
    assert {"learning_events_processed", "schema_validation_errors", "dlq_messages", "event_processing_duration",
            "aggregation_window_size", "consumer_lag", "sink_write_duration"} <= names


def test_a_snapshot_sums_committed_counters_over_steps_and_keeps_the_newest_gauge():
    def key(step, ns, name):
        return MetricKey(step, MetricName(ns, name))
    query = {"counters": [MetricResult(key("Write1m", "S", "n"), 3, 99),
                          MetricResult(key("Write5m", "S", "n"), 4, None),
                          MetricResult(key("Write5m", "S", "only_attempted"), None, 5),
                          MetricResult(key("x", "beam:metric", "n"), 1, 1)],
             "gauges": [MetricResult(key("a", "G", "g"), GaugeResult(GaugeData(7, 2.0)), None),
                        MetricResult(key("b", "G", "g"), GaugeResult(GaugeData(5, 3.0)), None)]}
    snap = snapshot_of(query, 1.0)
    assert snap.counters == {("S", "n"): 7}
    assert snap.gauge("G", "g") == 5


class _Observe(beam.DoFn):
    def __init__(self):
        self.latency = LatencyHistogram("T", "wait_seconds")

    def process(self, seconds_and_times):
        self.latency.observe(*seconds_and_times)


def test_a_latency_histogram_makes_a_counter_only_for_the_buckets_its_durations_fall_in():
    durations = [(0.003, 1), (0.005, 2), (0.02, 1), (0.02, 3), (45.0, 1), (0.7, 0)]   # (seconds, times)
    p = beam.Pipeline(runner=FnApiRunner())
    _ = p | beam.Create(durations) | beam.ParDo(_Observe())
    result = p.run()
    result.wait_until_finish()
    got = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]
           if c.key.metric.namespace == "T"}
    assert got == {"wait_seconds_bucket_0.005": 3, "wait_seconds_bucket_0.025": 4, "wait_seconds_bucket_+Inf": 1,
                   "wait_seconds_sum_ms": 3 + 10 + 20 + 60 + 45_000}
    le = dict(histogram(MetricsSnapshot(counters={("T", k): v for k, v in got.items()}), "T", "wait_seconds")[0])
    assert (le["0.005"], le["0.01"], le["0.025"], le["30.0"], le["+Inf"]) == (3, 3, 7, 7, 8)


def test_options_are_shown_without_secrets():
    shown = redact_options({"postgres_dsn": "postgresql://analytics:s3cret@db:5432/analytics",
                            "redis_url": "redis://:hunter2@cache:6379/0",
                            "brokers": "k:9092", "replay_token": "abc", "batch_size": 2000,
                            "other": "host=db password=s3cret dbname=x"}, redact)
    text = repr(shown)
    assert "s3cret" not in text and "hunter2" not in text and "abc" not in text
    assert shown["brokers"] == "k:9092" and shown["batch_size"] == 2000
    assert shown["postgres_dsn"] == "postgresql://analytics:***@db:5432/analytics"


def test_events_per_second_over_the_samples():
    samples = collections.deque([(0.0, 100), (30.0, 400), (60.0, 700)])
    assert rate(samples) == 10.0
    assert rate(collections.deque([(0.0, 5)])) == 0.0


def _app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(correlation.CorrelationMiddleware)
    log = logging.getLogger("test.correlation")

    @app.get("/who")
    def who():
        log.warning("serving")
        return {"id": correlation.current()}
    return app


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.addFilter(correlation.CorrelationFilter())
        self.lines: list = []

    def emit(self, record):
        self.lines.append(self.format(record))


def test_a_request_keeps_its_correlation_id_in_the_response_and_the_log_lines():
    handler = _Records()
    handler.setFormatter(logging.Formatter("[%(correlation_id)s] %(message)s"))
    logging.getLogger("test.correlation").addHandler(handler)
    try:
        client = TestClient(_app())
        given = client.get("/who", headers={"X-Correlation-ID": "abc-123"})
        made = client.get("/who")
        refused = client.get("/who", headers={"X-Correlation-ID": "has spaces and\ttabs"})
    finally:
        logging.getLogger("test.correlation").removeHandler(handler)
    assert given.headers["X-Correlation-ID"] == given.json()["id"] == "abc-123"
    new_id = made.headers["X-Correlation-ID"]
    assert made.json()["id"] == new_id and len(new_id) == 36
    assert refused.headers["X-Correlation-ID"] != "has spaces and\ttabs"
    assert handler.lines[:2] == ["[abc-123] serving", f"[{new_id}] serving"]
    assert correlation.current() is None  # nothing leaks out of a request


def test_outside_a_request_the_log_line_has_the_process_id_or_a_dash(monkeypatch):
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    monkeypatch.delenv(correlation.ENV, raising=False)
    correlation.CorrelationFilter().filter(record)
    assert record.correlation_id == "-"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    monkeypatch.setenv(correlation.ENV, "replay-7")
    correlation.CorrelationFilter().filter(record)
    assert record.correlation_id == "replay-7"
