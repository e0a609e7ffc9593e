"""EventValidator: both wire formats, every dead-letter code, schema resolution."""
import copy
import io
import json
import os
import shutil

import fastavro
import pytest

from schemas import SchemaRegistry, default_registry
from schemas.wire import encode_avro, frame, strip_logical_types
from tests.helpers import BASE_MS, answer, avro_record, json_record, record
from transforms.validation import ErrorCode, EventValidator, InvalidRecord, _iso


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
    assert (v2.version, v2.schema_id) == (2, 103)
    rated = {"event_id": "e", "occurred_at": BASE_MS, "user_id": "u", "correlation_id": None,
             "content_id": "c", "rating": 4}
    old_bytes = encode_avro(v1, rated)
    ev = EventValidator(reg, clock=lambda: BASE_MS / 1000).validate(record(old_bytes))
    assert ev.fields["comment"] is None and ev.fields["rating"] == 4 and ev.schema_id == v1.schema_id
    # and it was saved: a fresh load knows id 103
    assert SchemaRegistry.load(str(tmp_path / "schemas" / "registry.json")).by_id(103).version == 2
    assert json.loads((tmp_path / "schemas" / "avro" / "content_rated" / "v2.avsc").read_text()) == v2_raw


# -- records that once stopped the job (issue 7, found by fuzzing) -------------------

def test_occurred_at_past_year_9999_is_a_future_timestamp_not_a_crash(validator):
    # Built as the fuzzer's records were: the registry's schema, written by fastavro.
    entry = default_registry().latest("question_answered")
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(strip_logical_types(entry.raw)),
                               answer(2**62))
    err = code_of(validator, record(frame(entry.schema_id, body.getvalue())))
    assert err.code == ErrorCode.FUTURE_TIMESTAMP
    assert str(2**62) in err.message and "outside years 1-9999" in err.message


@pytest.mark.parametrize("ms,text", [
    (BASE_MS, "2026-01-01T00:00:00Z"),
    (BASE_MS + 1, "2026-01-01T00:00:00.001000Z"),
    (-1, "1969-12-31T23:59:59.999000Z"),
    (253_402_300_799_999, "9999-12-31T23:59:59.999000Z"),  # the last millisecond datetime holds
])
def test_iso_formats_every_representable_time(ms, text):
    assert _iso(ms) == text


@pytest.mark.parametrize("ms", [253_402_300_800_000, 2**62, 2**63 - 1, -2**63, -62_135_596_800_001, 10**400],
                         ids=["year 10000", "2**62", "long max", "long min", "before year 1", "10**400"])
def test_iso_never_raises_outside_datetimes_range(ms):
    assert _iso(ms) == f"{ms} ms since 1970 (outside years 1-9999)"


NUL, SURROGATE = "\x00", "\ud800"


@pytest.mark.parametrize("field,value", [
    ("user_id", f"u{NUL}1"),
    ("concept_id", NUL),
    ("correlation_id", f"corr{NUL}"),  # a ["null", "string"] union
])
def test_nul_in_any_avro_string_is_an_invalid_string(validator, field, value):
    fields = answer(BASE_MS - 1, **{field: value})
    err = code_of(validator, avro_record("question_answered", fields))
    assert err.code == ErrorCode.INVALID_STRING
    assert f"field '{field}'" in err.message and "'\\x00'" in err.message
    assert NUL not in err.message
    assert err.event_type == "question_answered"


@pytest.mark.parametrize("field,value,shown", [
    ("user_id", f"u{NUL}", "'\\x00'"),
    ("correlation_id", f"c{NUL}", "'\\x00'"),
    ("question_id", f"q{SURROGATE}", "'\\ud800'"),  # JSON "\ud800": not encodable as UTF-8
])
def test_nul_or_lone_surrogate_in_a_json_string_is_an_invalid_string(validator, field, value, shown):
    raw = json_record("question_answered", answer(BASE_MS - 1, **{field: value}))
    assert b"\\u0000" in raw.value or b"\\ud800" in raw.value  # escaped on the wire, as clients send it
    err = code_of(validator, raw)
    assert err.code == ErrorCode.INVALID_STRING
    assert f"field '{field}'" in err.message and shown in err.message


def test_nul_in_a_map_key_value_or_nested_array_of_a_later_version():
    # Today's event schemas are flat; a later version may add maps and arrays.
    reg = SchemaRegistry.load(default_registry()._path)  # a private copy: register() only in memory
    v1 = reg.latest("content_rated")
    v2_raw = copy.deepcopy(v1.raw)
    v2_raw["fields"] += [{"name": "tags", "type": {"type": "map", "values": "string"}, "default": {}},
                         {"name": "notes", "type": ["null", {"type": "array", "items": "string"}],
                          "default": None}]
    v2 = reg.register("content_rated", v2_raw)
    v = EventValidator(reg, clock=lambda: BASE_MS / 1000)
    rated = {"event_id": "e", "occurred_at": BASE_MS, "user_id": "u", "correlation_id": None,
             "content_id": "c", "rating": 4, "tags": {"level": "easy"}, "notes": ["fine"]}
    assert v.validate(record(encode_avro(v2, rated))).fields["tags"] == {"level": "easy"}
    for change, where in [({"tags": {f"le{NUL}vel": "easy"}}, "field 'tags' has the map key"),
                          ({"tags": {"level": f"ea{NUL}sy"}}, "field 'tags.level'"),
                          ({"notes": ["ok", f"fi{NUL}ne"]}, "field 'notes[1]'")]:
        err = code_of(v, record(encode_avro(v2, dict(rated, **change))))
        assert err.code == ErrorCode.INVALID_STRING and where in err.message, (change, err.message)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_doubles_are_wrong_type_in_both_formats(validator, bad):
    # jsonb (raw_events.payload) has no NaN or Infinity; JSON input was already refused.
    mastery = {"event_id": "e", "occurred_at": BASE_MS - 1, "user_id": "u", "correlation_id": None,
               "concept_id": "c", "mastery_before": 0.5, "mastery_after": bad}
    for rec in (avro_record("mastery_updated", mastery), json_record("mastery_updated", mastery)):
        err = code_of(validator, rec)
        assert err.code == ErrorCode.WRONG_TYPE and "mastery_after" in err.message


def test_absurdly_nested_json_is_a_json_decode_error(validator):
    value = b'{"event_type": "question_answered", "user_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert code_of(validator, record(value)).code == ErrorCode.JSON_DECODE_ERROR
