"""DecodeAndValidate: Kafka record batches in, valid event batches and dead letters out.

Records travel in batches (one Kafka poll each) because per-element overhead in
a Python runner costs more than decoding itself; the batch is the unit of work,
the event keeps its own coordinates and event time.

No record stops the job: a record that fails validation is a dead letter with
its code, and any other exception while decoding one record (a bug, or an input
nobody foresaw) is a dead letter with code PROCESSING_ERROR; either way the rest
of the batch goes on. Otherwise the runner would retry the bundle, fail the job,
and every restart would die on the same record.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Iterable, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import PCollection, TaggedOutput

from schemas import default_registry
from transforms.records import DeadLetter, KafkaRecord
from transforms.validation import UNSTORABLE_TEXT, ErrorCode, EventValidator, InvalidRecord

LOG = logging.getLogger(__name__)
DEAD_LETTERS = "dead_letters"
# An exception's text can be as long as the record; the raw bytes are kept anyway.
MAX_EXCEPTION_TEXT = 500


def _safe_text(text: Optional[str]) -> Optional[str]:
    """``text`` with NUL and lone surrogates written as escapes (\\x00, \\ud800).

    A dead letter's text comes from the record (an event_type, a correlation id,
    a value quoted in a message): a lone surrogate cannot be encoded as UTF-8, so
    publishing the Avro dead letter would fail, and NUL cannot be stored later.
    """
    if text is None or not UNSTORABLE_TEXT.search(text):
        return text
    return UNSTORABLE_TEXT.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _attempt(record: KafkaRecord) -> int:
    """The ``dlq_attempt`` header as an int; 0 when absent or not a number (any producer can set it)."""
    try:
        return max(0, int(record.header("dlq_attempt") or 0))
    except ValueError:
        return 0


def to_dead_letter(record: KafkaRecord, error: InvalidRecord) -> DeadLetter:
    """In: the failed record and why. Out: its one DeadLetter, whose text is always publishable."""
    return DeadLetter(
        source_topic=record.topic, source_partition=record.partition,
        source_offset=record.offset, error_code=error.code, error_message=_safe_text(error.message),
        raw_bytes=record.value or b"", correlation_id=_safe_text(error.correlation_id),
        event_type=_safe_text(error.event_type), failed_at=int(time.time() * 1000),
        attempt=_attempt(record), record_time_ms=record.timestamp_ms)


def processing_error(record: KafkaRecord, exc: Exception) -> InvalidRecord:
    """An unexpected exception while decoding ``record``, as a PROCESSING_ERROR naming its type and text."""
    return InvalidRecord(ErrorCode.PROCESSING_ERROR,
                         f"unexpected {type(exc).__name__} while decoding and validating: "
                         f"{str(exc)[:MAX_EXCEPTION_TEXT]}; the raw bytes are in this dead letter, "
                         "re-publish it once the cause is fixed",
                         correlation_id=record.header("correlation_id"))


class DecodeAndValidateFn(beam.DoFn):
    """Input: a list of KafkaRecord. Main output: the list of valid Events (if
    any). Tagged output ``dead_letters``: one DeadLetter per failed record.
    """

    def __init__(self, max_future_ms: int, validator_class: type = EventValidator):
        self.max_future_ms = max_future_ms
        self.validator_class = validator_class
        self.valid = Metrics.counter("DecodeAndValidate", "valid_events")
        self.invalid = Metrics.counter("DecodeAndValidate", "dead_letters")
        self._by_code: dict = {}
        self._by_type: dict = {}

    def setup(self):
        self.validator = self.validator_class(default_registry(), self.max_future_ms)
        self._logged: set = set()

    def _count(self, code: str) -> None:
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = Metrics.counter("DecodeAndValidate", f"dead_letters_{code}")
        counter.inc()

    def _count_valid(self, events: list) -> None:
        """``valid.<event_type>`` per type (the service's learning_events_processed_total);
        one counter per type, made on first sight (types come from the registry)."""
        for event_type, n in Counter(e.event_type for e in events).items():
            counter = self._by_type.get(event_type)
            if counter is None:
                counter = self._by_type[event_type] = Metrics.counter("DecodeAndValidate", f"valid.{event_type}")
            counter.inc(n)

    def process(self, batch: list[KafkaRecord]) -> Iterable:
        events = []
        validate = self.validator.validate
        for record in batch:
            try:
                events.append(validate(record))
            except InvalidRecord as e:
                self._count(e.code)
                yield TaggedOutput(DEAD_LETTERS, to_dead_letter(record, e))
            except Exception as e:  # anything else too: one dead letter, never a failed bundle
                self._log_first(record, e)
                self._count(ErrorCode.PROCESSING_ERROR)
                yield TaggedOutput(DEAD_LETTERS, to_dead_letter(record, processing_error(record, e)))
        self.invalid.inc(len(batch) - len(events))
        if events:
            self.valid.inc(len(events))
            self._count_valid(events)
            yield events

    def _log_first(self, record: KafkaRecord, exc: Exception) -> None:
        """A traceback for the first exception of each type per worker: a bug shows, a flood does not."""
        if type(exc) not in self._logged:
            self._logged.add(type(exc))
            LOG.warning("PROCESSING_ERROR at %s:%d:%d", record.topic, record.partition, record.offset,
                        exc_info=exc)


class DecodeResult(NamedTuple):
    events: PCollection   # of list[Event]
    dead_letters: PCollection  # of DeadLetter


class DecodeAndValidate(beam.PTransform):
    """Batches of KafkaRecord -> DecodeResult(events=batches of Event, dead_letters).

    ``validator_class``: an EventValidator (sub)class, built on each worker with
    the default registry; tests pass one that fails on purpose.
    """

    def __init__(self, max_future_ms: int = 5 * 60 * 1000, validator_class: type = EventValidator):
        super().__init__()
        self.max_future_ms = max_future_ms
        self.validator_class = validator_class

    def expand(self, batches: PCollection) -> DecodeResult:
        fn = DecodeAndValidateFn(self.max_future_ms, self.validator_class)
        out = batches | "Decode" >> beam.ParDo(fn).with_outputs(DEAD_LETTERS, main="events")
        return DecodeResult(out.events, out[DEAD_LETTERS])
