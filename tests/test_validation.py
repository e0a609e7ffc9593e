"""EventValidator: both wire formats, every dead-letter code, schema resolution."""
import copy
import json
import os
import shutil

import pytest

from schemas import SchemaRegistry, default_registry
from schemas.wire import encode_avro, frame
from tests.helpers import BASE_MS, answer, avro_record, json_record, record
from transforms.validation import ErrorCode, EventValidator, InvalidRecord


@pytest.fixture
def validator():
    return EventValidator(default_registry(), max_future_ms=60_000, clock=lambda: BASE_MS / 1000)


def code_of(validator, rec):
    with pytest.raises(InvalidRecord) as e:
        validator.validate(rec)
    return e.value


def test_avro_and_json_give_the_same_event(validator):
    fields = answer(BASE_MS - 1000, correlation_id="corr-1")
    a = validator.validate(avro_record("question_answered", fields, offset=5))
    j = validator.validate(json_record("question_answered", fields))
    assert a.event_type == j.event_type == "question_answered"
    assert a.fields == j.fields == fields
    assert a.event_time_ms == BASE_MS - 1000 and a.offset == 5 and a.schema_id == 1


def test_json_accepts_iso_timestamps_and_fills_defaults(validator):
    fields = answer(0)
    del fields["attempt"], fields["correlation_id"]
    fields["occurred_at"] = "2025-12-31T23:59:00Z"
    ev = validator.validate(json_record("question_answered", fields))
    assert ev.event_time_ms == BASE_MS - 60_000
    assert ev.fields["attempt"] == 1 and ev.fields["correlation_id"] is None


@pytest.mark.parametrize("value,code", [
    (b"", ErrorCode.EMPTY_RECORD),
    (b"\x07not-avro", ErrorCode.BAD_FRAMING),
    (b"\x00\x00\x01", ErrorCode.BAD_FRAMING),
    (frame(4242, b"\x02"), ErrorCode.UNKNOWN_SCHEMA_ID),
    (frame(100, b"\x02"), ErrorCode.UNKNOWN_SCHEMA_ID),  # the dead-letter schema is no event
    (b'{"event_type": "question_answered", ', ErrorCode.JSON_DECODE_ERROR),
    (b'{"event_type": "telepathy_used", "user_id": "u"}', ErrorCode.UNKNOWN_EVENT_TYPE),
    (b'{"user_id": "u"}', ErrorCode.MISSING_FIELD),
])
def test_framing_and_lookup_failures(validator, value, code):
    assert code_of(validator, record(value)).code == code


def test_truncated_and_padded_avro_are_decode_errors(validator):
    good = avro_record("question_answered", answer(BASE_MS - 1)).value
    assert code_of(validator, record(good[:12])).code == ErrorCode.AVRO_DECODE_ERROR
    padded = code_of(validator, record(good + b"\x00\x00"))
    assert padded.code == ErrorCode.AVRO_DECODE_ERROR and "trailing" in padded.message


@pytest.mark.parametrize("change,code,field", [
    ({"user_id": None}, ErrorCode.MISSING_FIELD, "user_id"),
    ({"correct": "yes"}, ErrorCode.WRONG_TYPE, "correct"),
    ({"response_time_ms": 1.5}, ErrorCode.WRONG_TYPE, "response_time_ms"),
    ({"difficulty": "IMPOSSIBLE"}, ErrorCode.BAD_ENUM, "difficulty"),
    ({"response_time_ms": -1}, ErrorCode.OUT_OF_RANGE, "response_time_ms"),
    ({"attempt": 0}, ErrorCode.OUT_OF_RANGE, "attempt"),
    ({"occurred_at": "yesterday"}, ErrorCode.WRONG_TYPE, "occurred_at"),
])
def test_json_field_errors_name_the_field(validator, change, code, field):
    fields = answer(BASE_MS - 1, correlation_id="c-9")
    fields.update(change)
    if change.get("user_id", 0) is None:
        del fields["user_id"]
    err = code_of(validator, json_record("question_answered", fields))
    assert err.code == code and field in err.message
    assert err.event_type == "question_answered" and err.correlation_id == "c-9"


def test_timestamps_missing_or_far_future(validator):
    fields = answer(BASE_MS)
    del fields["occurred_at"]
    assert code_of(validator, json_record("question_answered", fields)).code == ErrorCode.MISSING_TIMESTAMP
    future = answer(BASE_MS + 61_000)
    assert code_of(validator, avro_record("question_answered", future)).code == ErrorCode.FUTURE_TIMESTAMP
    near = answer(BASE_MS + 59_000)  # within the allowed clock skew
    assert validator.validate(avro_record("question_answered", near)).event_time_ms == BASE_MS + 59_000
    zero = answer(0)
    assert code_of(validator, avro_record("question_answered", zero)).code == ErrorCode.MISSING_TIMESTAMP


def test_range_rules_apply_to_avro_too(validator):
    rated = {"event_id": "e", "occurred_at": BASE_MS, "user_id": "u", "correlation_id": None,
             "content_id": "c", "rating": 6}
    err = code_of(validator, avro_record("content_rated", rated))
    assert err.code == ErrorCode.OUT_OF_RANGE and "rating" in err.message and "between 1 and 5" in err.message


def test_correlation_id_from_header_when_body_is_unreadable(validator):
    err = code_of(validator, record(b"\x07x", headers=[("correlation_id", b"hdr-1")]))
    assert err.correlation_id == "hdr-1"


def test_old_writer_schema_resolves_to_new_reader(tmp_path):
    shutil.copytree(os.path.dirname(default_registry()._path), tmp_path / "schemas",
                    ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    reg = SchemaRegistry.load(str(tmp_path / "schemas" / "registry.json"))
    v1 = reg.latest("content_rated")
    v2_raw = copy.deepcopy(v1.raw)
    v2_raw["fields"].append({"name": "comment", "type": ["null", "string"], "default": None})
    v2 = reg.register("content_rated", v2_raw, save=True)
    assert (v2.version, v2.schema_id) == (2, 102)
    rated = {"event_id": "e", "occurred_at": BASE_MS, "user_id": "u", "correlation_id": None,
             "content_id": "c", "rating": 4}
    old_bytes = encode_avro(v1, rated)
    ev = EventValidator(reg, clock=lambda: BASE_MS / 1000).validate(record(old_bytes))
    assert ev.fields["comment"] is None and ev.fields["rating"] == 4 and ev.schema_id == v1.schema_id
    # and it was saved: a fresh load knows id 102
    assert SchemaRegistry.load(str(tmp_path / "schemas" / "registry.json")).by_id(102).version == 2
    assert json.loads((tmp_path / "schemas" / "avro" / "content_rated" / "v2.avsc").read_text()) == v2_raw
