"""Kafka sinks: dead letters to analytics.dlq.v1, aggregates to analytics.aggregated.v1.

Both write Confluent-framed Avro with the registry's schema ids. Records are
keyed so that a retried bundle's duplicates are recognisable (and compact
away): a dead letter by its source coordinates, an aggregate by its window,
family and entity. Every bundle is flushed before it is finished, so nothing
acknowledged to the runner is still only in a client buffer.
"""
from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from confluent_kafka import KafkaException, Producer

from schemas import default_registry
from schemas.wire import encode_avro, plain_parsed
from transforms.aggregate import WindowAggregate, window_label
from transforms.records import DeadLetter


class _ProduceFn(beam.DoFn):
    """Base: one producer per DoFn instance, flushed at the end of every bundle."""
    subject = ""

    def __init__(self, brokers: str, topic: str):
        self.brokers, self.topic = brokers, topic
        self.produced = Metrics.counter(type(self).__name__, "records_produced")

    def setup(self):
        self.entry = default_registry().latest(self.subject)
        self.parsed = plain_parsed(self.entry)
        self.producer = Producer({"bootstrap.servers": self.brokers, "linger.ms": 20,
                                  "enable.idempotence": True})
        self.errors: list = []
        self.sent = 0

    def _send(self, key: bytes, record: dict, headers: Any = None) -> None:
        value = encode_avro(self.entry, record, self.parsed)
        while True:
            try:
                self.producer.produce(self.topic, value, key, headers=headers, on_delivery=self._on_delivery)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.sent += 1
        if self.sent % 1000 == 0:
            self.producer.poll(0)  # serve delivery reports now and then, not per record
        self.produced.inc()

    def _on_delivery(self, err, _msg):
        if err is not None:
            self.errors.append(err)

    def finish_bundle(self):
        left = self.producer.flush(30)
        if left or self.errors:
            errors, self.errors = self.errors, []
            # Failing the bundle makes the runner retry it; the sink is keyed, so that is safe.
            raise KafkaException(f"{self.topic}: {left} records unflushed, errors: {errors[:3]}")

    def teardown(self):
        self.producer.flush(10)


class PublishDeadLettersFn(_ProduceFn):
    """Input: a DeadLetter. Produces it to the dead-letter topic; outputs nothing."""
    subject = "dead_letter"

    def process(self, dl: DeadLetter):
        key = f"{dl.source_topic}:{dl.source_partition}:{dl.source_offset}".encode()
        headers = [("correlation_id", dl.correlation_id.encode())] if dl.correlation_id else None
        self._send(key, dl._asdict(), headers)
        return ()


class PublishAggregatesFn(_ProduceFn):
    """Input: a WindowAggregate. Produces one AggregatedMetric per row; outputs nothing."""
    subject = "aggregated_metric"

    def process(self, agg: WindowAggregate):
        label = window_label(agg.window_seconds)
        for row in agg.rows:
            key = f"{label}:{agg.window_start_ms}:{row.family}:{row.entity_id}".encode()
            self._send(key, {"window_seconds": agg.window_seconds, "window_start": agg.window_start_ms,
                             "window_end": agg.window_end_ms, "family": row.family,
                             "entity_id": row.entity_id, "metrics": row.metrics,
                             "pane_timing": agg.pane_timing, "pane_index": agg.pane_index})
        return ()


class PublishDeadLetters(beam.PTransform):
    """DeadLetters -> (nothing): one Avro record each on the dead-letter topic."""

    def __init__(self, brokers: str, topic: str = "analytics.dlq.v1"):
        super().__init__()
        self.brokers, self.topic = brokers, topic

    def expand(self, dead_letters):
        return dead_letters | "Produce" >> beam.ParDo(PublishDeadLettersFn(self.brokers, self.topic))


class PublishAggregates(beam.PTransform):
    """WindowAggregates -> (nothing): one AggregatedMetric per row on the aggregates topic."""

    def __init__(self, brokers: str, topic: str = "analytics.aggregated.v1"):
        super().__init__()
        self.brokers, self.topic = brokers, topic

    def expand(self, aggregates):
        return aggregates | "Produce" >> beam.ParDo(PublishAggregatesFn(self.brokers, self.topic))
