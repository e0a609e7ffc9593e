"""DecodeAndValidate: Kafka record batches in, valid event batches and dead letters out.

Records travel in batches (one Kafka poll each) because per-element overhead in
a Python runner costs more than decoding itself; the batch is the unit of work,
the event keeps its own coordinates and event time.
"""
from __future__ import annotations

import time
from typing import Iterable, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import PCollection, TaggedOutput

from schemas import default_registry
from transforms.records import DeadLetter, KafkaRecord
from transforms.validation import EventValidator, InvalidRecord

DEAD_LETTERS = "dead_letters"


def to_dead_letter(record: KafkaRecord, error: InvalidRecord) -> DeadLetter:
    return DeadLetter(
        source_topic=record.topic, source_partition=record.partition,
        source_offset=record.offset, error_code=error.code, error_message=error.message,
        raw_bytes=record.value or b"", correlation_id=error.correlation_id,
        event_type=error.event_type, failed_at=int(time.time() * 1000),
        attempt=int(record.header("dlq_attempt") or 0))


class DecodeAndValidateFn(beam.DoFn):
    """Input: a list of KafkaRecord. Main output: the list of valid Events (if
    any). Tagged output ``dead_letters``: one DeadLetter per failed record.
    """

    def __init__(self, max_future_ms: int):
        self.max_future_ms = max_future_ms
        self.valid = Metrics.counter("DecodeAndValidate", "valid_events")
        self.invalid = Metrics.counter("DecodeAndValidate", "dead_letters")
        self._by_code: dict = {}

    def setup(self):
        self.validator = EventValidator(default_registry(), self.max_future_ms)

    def _count(self, code: str) -> None:
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = Metrics.counter("DecodeAndValidate", f"dead_letters_{code}")
        counter.inc()

    def process(self, batch: list[KafkaRecord]) -> Iterable:
        events = []
        validate = self.validator.validate
        for record in batch:
            try:
                events.append(validate(record))
            except InvalidRecord as e:
                self._count(e.code)
                yield TaggedOutput(DEAD_LETTERS, to_dead_letter(record, e))
        self.invalid.inc(len(batch) - len(events))
        if events:
            self.valid.inc(len(events))
            yield events


class DecodeResult(NamedTuple):
    events: PCollection   # of list[Event]
    dead_letters: PCollection  # of DeadLetter


class DecodeAndValidate(beam.PTransform):
    """Batches of KafkaRecord -> DecodeResult(events=batches of Event, dead_letters)."""

    def __init__(self, max_future_ms: int = 5 * 60 * 1000):
        super().__init__()
        self.max_future_ms = max_future_ms

    def expand(self, batches: PCollection) -> DecodeResult:
        out = batches | "Decode" >> beam.ParDo(DecodeAndValidateFn(self.max_future_ms)).with_outputs(
            DEAD_LETTERS, main="events")
        return DecodeResult(out.events, out[DEAD_LETTERS])
