"""Kafka sinks: dead letters to analytics.dlq.v1, aggregates to analytics.aggregated.v1.

Both write Confluent-framed Avro with the registry's schema ids. Records are
keyed so that a retried bundle's duplicates are recognisable (and compact
away): a dead letter by its source coordinates, an aggregate by its window,
family and entity. Every bundle is flushed before it is finished, so nothing
acknowledged to the runner is still only in a client buffer.

While the broker is away, records wait in the producer (which has no local
delivery timeout, so it never gives one up and keeps their order), and
``finish_bundle`` keeps flushing: a few attempts, then the DoFn's circuit
breaker opens and probes the broker with a metadata request until it answers
(see ``transforms/sinks/resilience.py``). The bundle waits; nothing is dropped.
"""
from __future__ import annotations

import io
import time
from collections import Counter
from typing import Any, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from confluent_kafka import KafkaError, KafkaException, Producer

import fastavro

from schemas import default_registry
from schemas.registry import RegisteredSchema
from schemas.wire import (HEADER, MAGIC_BYTE, avro_double_map, avro_string, encode_avro, plain_parsed,
                          produce_waiting, strip_logical_types)
from transforms.aggregate import WindowAggregate, window_label
from transforms.dead_letter_log import DEAD_LETTER_LOG
from transforms.latency import LatencyHistogram
from transforms.records import DeadLetter
from transforms.sinks.resilience import BreakerCounters, CircuitBreaker, SinkRetryConfig


class BrokerUnavailable(Exception):
    """Records are still unacknowledged after a flush attempt: the broker is away (or slow)."""


class _ProduceFn(beam.DoFn):
    """Base: one producer per DoFn instance, flushed at the end of every bundle."""
    subject = ""

    def __init__(self, brokers: str, topic: str, retry: Optional[SinkRetryConfig] = None):
        self.brokers, self.topic = brokers, topic
        self.retry = retry or SinkRetryConfig()
        self.produced = Metrics.counter(type(self).__name__, "records_produced")
        self.counters = BreakerCounters(type(self).__name__)
        # Seconds a bundle's flush took (retries and a held breaker included).
        self.write_latency = LatencyHistogram(type(self).__name__, "write_seconds")

    def setup(self):
        self.entry = default_registry().latest(self.subject)
        self.parsed = plain_parsed(self.entry)
        # message.timeout.ms 0: a record is never failed locally while the broker
        # is away; with idempotence the producer retries it in order, no duplicates.
        self.producer = Producer({"bootstrap.servers": self.brokers, "linger.ms": 20,
                                  "enable.idempotence": True, "message.timeout.ms": 0,
                                  "error_cb": self._on_error})
        self.breaker = CircuitBreaker(f"{type(self).__name__}({self.topic})", self.retry,
                                      probe=self._probe, transient=(BrokerUnavailable,))
        self.errors: list = []
        self.broker_error: Optional[KafkaError] = None
        self.sent = 0

    def _send(self, key: bytes, record: dict, headers: Any = None) -> None:
        self._produce(key, encode_avro(self.entry, record, self.parsed), headers)
        self.produced.inc()

    def _produce(self, key: bytes, value: bytes, headers: Any = None) -> None:
        produce_waiting(self.producer, self.topic, value, key, headers=headers, on_delivery=self._on_delivery)
        self.sent += 1
        if self.sent % 1000 == 0:
            self.producer.poll(0)  # serve delivery reports now and then, not per record

    def _on_delivery(self, err, _msg):
        if err is not None:
            self.errors.append(err)

    def _on_error(self, err: KafkaError) -> None:
        """Client-level errors (all brokers down, transport): the cause a breaker names."""
        self.broker_error = err

    def _flush(self) -> None:
        left = self.producer.flush(self.retry.write_timeout_s)
        if not left:
            self.broker_error = None
        elif not self.errors:
            cause = f"; last broker error: {self.broker_error.str()}" if self.broker_error else ""
            raise BrokerUnavailable(f"{left} records not acknowledged within {self.retry.write_timeout_s:.0f}s{cause}")

    def _probe(self) -> None:
        """A metadata request for our topic, bounded; raises unless the broker answers for it."""
        topic = self.producer.list_topics(self.topic, timeout=self.retry.probe_timeout_s).topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise KafkaException(topic.error if topic is not None else f"no metadata for {self.topic}")

    def finish_bundle(self):
        began = time.monotonic()
        try:
            self.breaker.call(self._flush)
        finally:
            self.counters.report(self.breaker)
        self.write_latency.observe(time.monotonic() - began)
        if self.errors:
            errors, self.errors = self.errors, []
            # Not an outage (those never reach here: records wait, no local timeout) but a
            # refused record. Failing the bundle makes the runner retry it; the sink is keyed.
            raise KafkaException(f"{self.topic}: {len(errors)} records failed: {errors[:3]}")
        self._flushed()

    def _flushed(self) -> None:
        """Hook: every record of the bundle is acknowledged by the broker."""

    def teardown(self):
        self.producer.flush(10)


class PublishDeadLettersFn(_ProduceFn):
    """Input: a DeadLetter. Produces it to the dead-letter topic; outputs nothing.

    Counts ``published.<CODE>`` once the broker acknowledged the bundle's
    records (the service's dlq_messages_total): a committed count of these
    equals the records on the topic, since a failed bundle's counts are dropped.
    The same counts go to the process's dead-letter log (a summary at INFO at
    most every 10 s), each dead letter to it at DEBUG.
    """
    subject = "dead_letter"

    def __init__(self, brokers: str, topic: str, retry: Optional[SinkRetryConfig] = None):
        super().__init__(brokers, topic, retry)
        self._published: dict = {}

    def start_bundle(self):
        self.pending: Counter = Counter()

    def process(self, dl: DeadLetter):
        key = f"{dl.source_topic}:{dl.source_partition}:{dl.source_offset}".encode()
        headers = [("correlation_id", dl.correlation_id.encode())] if dl.correlation_id else None
        self._send(key, dl._asdict(), headers)
        self.pending[dl.error_code] += 1
        DEAD_LETTER_LOG.each(dl)
        return ()

    def _flushed(self) -> None:
        for code, n in self.pending.items():
            counter = self._published.get(code)
            if counter is None:
                counter = self._published[code] = Metrics.counter(type(self).__name__, f"published.{code}")
            counter.inc(n)
        DEAD_LETTER_LOG.add(self.pending)  # the log's summary counts what the broker acknowledged
        self.pending = Counter()

    def teardown(self):
        super().teardown()
        DEAD_LETTER_LOG.flush()  # a worker that goes away leaves no counts unsaid


# The AggregatedMetric fields that differ between the rows of a pane, and the
# Avro types AggregateEncoder encodes them with itself.
_ROW_FIELDS = {"family": "string", "entity_id": "string", "metrics": {"type": "map", "values": "double"}}


class AggregateEncoder:
    """A pane's rows as Confluent-framed AggregatedMetric records, as ``encode_avro`` gives them.

    An Avro record is its fields' encodings one after the other, so the fields
    that are the pane's (window and pane) are encoded once per pane with
    fastavro, and each row adds only its family, entity and metrics, encoded
    here (fastavro's per-call set-up cost more than the record's bytes). A
    schema whose row fields are not those types, or not next to each other,
    is encoded record by record with fastavro.
    """

    def __init__(self, entry: RegisteredSchema):
        self.entry, self.parsed = entry, plain_parsed(entry)
        self.keys: dict = {}   # metric name -> its encoded bytes
        fields = strip_logical_types(entry.raw)["fields"]
        names = [f["name"] for f in fields]
        at = names.index("family") if "family" in names else -1
        self.fast = at >= 0 and [(f["name"], f["type"]) for f in fields[at:at + 3]] == list(_ROW_FIELDS.items())
        if self.fast:
            self.head = self._sub_record(fields[:at])
            self.tail = self._sub_record(fields[at + 3:])

    @staticmethod
    def _sub_record(fields: list):
        return fastavro.parse_schema({"type": "record", "name": "PaneFields", "fields": fields}, named_schemas={})

    @staticmethod
    def _encode(parsed, record: dict) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, record)
        return buf.getvalue()

    def encode(self, agg: WindowAggregate) -> list[tuple[bytes, bytes]]:
        """[(key, value)] of the pane's rows, keyed ``<label>:<window start>:<family>:<entity>``."""
        label = window_label(agg.window_seconds)
        pane = {"window_seconds": agg.window_seconds, "window_start": agg.window_start_ms,
                "window_end": agg.window_end_ms, "pane_timing": agg.pane_timing, "pane_index": agg.pane_index}
        out = []
        if not self.fast:
            for row in agg.rows:
                out.append((f"{label}:{agg.window_start_ms}:{row.family}:{row.entity_id}".encode(),
                            encode_avro(self.entry, dict(pane, family=row.family, entity_id=row.entity_id,
                                                         metrics=row.metrics), self.parsed)))
            return out
        head = HEADER.pack(MAGIC_BYTE, self.entry.schema_id) + self._encode(self.head, pane)
        tail = self._encode(self.tail, pane)
        families: dict = {}
        for row in agg.rows:
            family = families.get(row.family)
            if family is None:
                family = families[row.family] = avro_string(row.family)
            out.append((f"{label}:{agg.window_start_ms}:{row.family}:{row.entity_id}".encode(),
                        b"".join((head, family, avro_string(row.entity_id),
                                  avro_double_map(row.metrics, self.keys), tail))))
        return out


class PublishAggregatesFn(_ProduceFn):
    """Input: a WindowAggregate. Produces one AggregatedMetric per row; outputs nothing."""
    subject = "aggregated_metric"

    def setup(self):
        super().setup()
        self.encoder = AggregateEncoder(self.entry)

    def process(self, agg: WindowAggregate):
        records = self.encoder.encode(agg)
        for key, value in records:
            self._produce(key, value)
        self.produced.inc(len(records))
        return ()


class PublishDeadLetters(beam.PTransform):
    """DeadLetters -> (nothing): one Avro record each on the dead-letter topic."""

    def __init__(self, brokers: str, topic: str = "analytics.dlq.v1", retry: Optional[SinkRetryConfig] = None):
        super().__init__()
        self.brokers, self.topic, self.retry = brokers, topic, retry

    def expand(self, dead_letters):
        return dead_letters | "Produce" >> beam.ParDo(PublishDeadLettersFn(self.brokers, self.topic, self.retry))


class PublishAggregates(beam.PTransform):
    """WindowAggregates -> (nothing): one AggregatedMetric per row on the aggregates topic."""

    def __init__(self, brokers: str, topic: str = "analytics.aggregated.v1", retry: Optional[SinkRetryConfig] = None):
        super().__init__()
        self.brokers, self.topic, self.retry = brokers, topic, retry

    def expand(self, aggregates):
        return aggregates | "Produce" >> beam.ParDo(PublishAggregatesFn(self.brokers, self.topic, self.retry))
