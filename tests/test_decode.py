"""DecodeAndValidate as a Beam transform, and the traffic generator's faults."""
from collections import Counter

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from scripts.produce import TrafficConfig, generate
from schemas import default_registry
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
