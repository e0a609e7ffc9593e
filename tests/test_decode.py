"""DecodeAndValidate as a Beam transform, and the traffic generator's faults."""
from collections import Counter

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from scripts.produce import TrafficConfig, generate
from schemas import default_registry
from schemas.wire import encode_avro
from tests.helpers import BASE_MS, answer, avro_record, json_record, record
from transforms.decode import DecodeAndValidate
from transforms.records import KafkaRecord
from transforms.validation import EventValidator, InvalidRecord


def test_valid_events_stay_batched_and_each_bad_record_is_one_dead_letter():
    batch1 = [avro_record("question_answered", answer(BASE_MS, correlation_id="c1"), offset=1),
              record(b"\x07junk", offset=2, headers=[("correlation_id", b"c2")]),
              json_record("question_answered", answer(BASE_MS, rt=-3), offset=3)]
    batch2 = [record(b"", offset=4)]
    with TestPipeline() as p:
        out = p | beam.Create([batch1, batch2]) | DecodeAndValidate()
        assert_that(out.events | "Sizes" >> beam.Map(lambda b: [e.offset for e in b]),
                    equal_to([[1]]), label="events")
        assert_that(out.dead_letters | beam.Map(lambda d: (d.source_offset, d.error_code, d.correlation_id,
                                                           d.source_topic, bool(d.error_message))),
                    equal_to([(2, "BAD_FRAMING", "c2", "learning.events.v1", True),
                              (3, "OUT_OF_RANGE", None, "learning.events.v1", True),
                              (4, "EMPTY_RECORD", None, "learning.events.v1", True)]),
                    label="dead letters")


def test_dead_letters_keep_the_raw_bytes():
    raw = b'{"event_type": "nope"}'
    with TestPipeline() as p:
        out = p | beam.Create([[record(raw, offset=9)]]) | DecodeAndValidate()
        assert_that(out.dead_letters | beam.Map(lambda d: (d.raw_bytes, d.error_code)),
                    equal_to([(raw, "UNKNOWN_EVENT_TYPE")]))


def test_every_generated_fault_gets_the_code_the_generator_meant():
    cfg = TrafficConfig(events=3000, malformed_fraction=0.3, json_fraction=0.3, span_seconds=600,
                        end_time_ms=BASE_MS, seed=11)
    validator = EventValidator(default_registry(), clock=lambda: BASE_MS / 1000)
    got, want = Counter(), Counter()
    for i, r in enumerate(generate(cfg)):
        rec = KafkaRecord(r.topic, 0, i, r.key, r.value, r.timestamp_ms, tuple(r.headers))
        try:
            ev = validator.validate(rec)
            assert r.error_code is None, f"record {i} should have failed with {r.error_code}"
            assert ev.fields == r.fields
            got["VALID"] += 1
        except InvalidRecord as e:
            got[e.code] += 1
        want[r.error_code or "VALID"] += 1
    assert got == want
    assert len(want) == 11  # valid + all ten error codes (two faults share OUT_OF_RANGE)


class ValidatorWithABug(EventValidator):
    """Fails like a bug would, on the record at offset 13 only."""

    def validate(self, record):
        if record.offset == 13:
            raise KeyError("schema_cache")
        return super().validate(record)


def test_an_unexpected_exception_is_one_processing_error_and_the_batch_goes_on():
    batch = [avro_record("question_answered", answer(BASE_MS), offset=12),
             record(b"{}", offset=13, headers=[("correlation_id", b"c13")]),
             json_record("question_answered", answer(BASE_MS), offset=14),
             record(b"", offset=15)]
    with TestPipeline() as p:
        out = p | beam.Create([batch]) | DecodeAndValidate(validator_class=ValidatorWithABug)
        assert_that(out.events | "Offsets" >> beam.Map(lambda b: sorted(e.offset for e in b)),
                    equal_to([[12, 14]]), label="events")
        assert_that(out.dead_letters | beam.Map(lambda d: (d.source_offset, d.error_code, d.correlation_id,
                                                           d.raw_bytes)),
                    equal_to([(13, "PROCESSING_ERROR", "c13", b"{}"), (15, "EMPTY_RECORD", None, b"")]),
                    label="dead letters")
        assert_that(out.dead_letters | beam.Filter(lambda d: d.error_code == "PROCESSING_ERROR")
                    | "Messages" >> beam.Map(lambda d: d.error_message),
                    equal_to(["unexpected KeyError while decoding and validating: 'schema_cache'; "
                              "the raw bytes are in this dead letter, re-publish it once the cause is fixed"]),
                    label="message")
    counters = {r.key.metric.name: r.committed
                for r in p.result.metrics().query(MetricsFilter().with_namespace("DecodeAndValidate"))["counters"]}
    assert counters["dead_letters_PROCESSING_ERROR"] == 1 and counters["dead_letters_EMPTY_RECORD"] == 1
    assert counters["dead_letters"] == 2 and counters["valid_events"] == 2


def test_poison_records_of_the_fuzzer_become_dead_letters_that_can_be_published():
    # Text the dead letter copies from the record (correlation id, event_type) is
    # escaped: a lone surrogate cannot be encoded in the Avro dead letter.
    future = avro_record("question_answered", answer(2**62), offset=1)
    nul = avro_record("question_answered", answer(BASE_MS, user="u\x00", correlation_id="c\x00"), offset=2)
    surrogate_type = record(b'{"event_type": "\\ud800", "correlation_id": "\\udfff"}', offset=3)
    bad_attempt = record(b"", offset=4, headers=[("dlq_attempt", b"twice")])
    with TestPipeline() as p:
        out = p | beam.Create([[future, nul, surrogate_type, bad_attempt]]) | DecodeAndValidate()
        letters = out.dead_letters | beam.Map(
            lambda d: (d.source_offset, d.error_code, d.correlation_id, d.event_type, d.attempt))
        assert_that(letters, equal_to([(1, "FUTURE_TIMESTAMP", None, "question_answered", 0),
                                       (2, "INVALID_STRING", "c\\x00", "question_answered", 0),
                                       (3, "UNKNOWN_EVENT_TYPE", "\\udfff", "\\ud800", 0),
                                       (4, "EMPTY_RECORD", None, None, 0)]), label="letters")
        assert_that(out.dead_letters | beam.Map(publishable), equal_to([True] * 4), label="encodable")


def publishable(dl) -> bool:
    """What PublishDeadLettersFn does before producing: Avro-encode it, its correlation id as a header."""
    encode_avro(default_registry().latest("dead_letter"), dl._asdict())
    (dl.correlation_id or "").encode()
    return True
