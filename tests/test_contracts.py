"""The contracts' single owners: topics, settings, times, the wire framing."""
from __future__ import annotations

import io
from datetime import datetime, timezone

import fastavro
import pytest

from schemas import default_registry
from schemas.settings import LOCAL_STACK, parse_instant, setting
from schemas.topics import AGGREGATES_TOPIC, ALERTS_TOPIC, DLQ_TOPIC, EVENT_TOPICS, PARTITIONS
from schemas.wire import decode_avro, encode_avro, schema_id_of


def test_every_topic_a_subject_names_has_a_partition_count_and_no_other():
    named = {default_registry().latest(s).topic for s in default_registry().subjects()}
    assert named == set(PARTITIONS)
    assert set(EVENT_TOPICS) | {DLQ_TOPIC, AGGREGATES_TOPIC, ALERTS_TOPIC} == named
    assert DLQ_TOPIC == "analytics.dlq.v1" and "learning.events.v1" in EVENT_TOPICS


def test_a_setting_comes_from_the_environment_unless_unset_or_empty(monkeypatch):
    monkeypatch.setenv("KAFKA_BROKERS", "10.0.0.1:9093")
    assert setting("KAFKA_BROKERS") == "10.0.0.1:9093"
    monkeypatch.setenv("KAFKA_BROKERS", "")
    assert setting("KAFKA_BROKERS") == LOCAL_STACK["KAFKA_BROKERS"] == "127.0.0.1:9092"
    monkeypatch.delenv("POSTGRES_DSN", raising=False)
    assert setting("POSTGRES_DSN").startswith("postgresql://")


@pytest.mark.parametrize("text,want", [
    ("2026-05-04T08:00:00Z", datetime(2026, 5, 4, 8, tzinfo=timezone.utc)),
    ("2026-05-04T10:00:00+02:00", datetime(2026, 5, 4, 8, tzinfo=timezone.utc)),
    (" 2026-05-04T08:00:00.250z ", datetime(2026, 5, 4, 8, 0, 0, 250000, tzinfo=timezone.utc)),
])
def test_a_time_on_a_command_line_needs_a_zone(text, want):
    assert parse_instant(text) == want


@pytest.mark.parametrize("text,words", [("2026-05-04T08:00:00", "no time zone"), ("yesterday", "ISO-8601")])
def test_a_time_without_a_zone_or_not_iso_is_refused(text, words):
    with pytest.raises(ValueError, match=words):
        parse_instant(text)


def test_framed_avro_round_trips_and_anything_else_has_no_schema_id():
    entry = default_registry().latest("dead_letter")
    record = {"source_topic": "t", "source_partition": 1, "source_offset": 2, "error_code": "TOO_LATE",
              "error_message": "m", "raw_bytes": b"\x00\x01", "correlation_id": None, "event_type": None,
              "failed_at": 1_767_225_600_000, "attempt": 0}
    value = encode_avro(entry, record)
    assert schema_id_of(value) == entry.schema_id
    writer, decoded = decode_avro(value)
    # decoded independently of decode_avro: fastavro on the body after the 5-byte header
    body = fastavro.schemaless_reader(io.BytesIO(value[5:]), fastavro.parse_schema(entry.raw, named_schemas={}))
    assert writer.subject == "dead_letter" and decoded["error_code"] == body["error_code"] == "TOO_LATE"
    assert decoded["failed_at"] == 1_767_225_600_000   # millis, not a datetime
    for other in (b"", b"\x00\x00", b'{"event_type": "x"}', None):
        assert schema_id_of(other) is None
    with pytest.raises(ValueError):
        decode_avro(b'{"a": 1}')
