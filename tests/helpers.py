"""Small builders shared by the unit tests."""
from __future__ import annotations

import uuid

from schemas import default_registry
from schemas.wire import encode_avro, encode_json
from transforms.records import Event, KafkaRecord

BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a window boundary for every size


def answer(ts_ms: int, user: str = "u1", concept: str = "c1", correct: bool = True,
           rt: int = 1000, **extra) -> dict:
    return dict({"event_id": str(uuid.uuid4()), "occurred_at": ts_ms, "user_id": user,
                 "correlation_id": None, "session_id": "s1", "question_id": "q1",
                 "concept_id": concept, "correct": correct, "response_time_ms": rt,
                 "attempt": 1, "difficulty": "EASY"}, **extra)


def record(value: bytes, offset: int = 0, topic: str = "learning.events.v1", headers=()) -> KafkaRecord:
    return KafkaRecord(topic, 0, offset, b"k", value, BASE_MS, tuple(headers))


def avro_record(event_type: str, fields: dict, offset: int = 0) -> KafkaRecord:
    entry = default_registry().latest(event_type)
    return record(encode_avro(entry, fields), offset, entry.topic)


def json_record(event_type: str, fields: dict, offset: int = 0) -> KafkaRecord:
    return record(encode_json(event_type, fields), offset)


def event(event_type: str, fields: dict) -> Event:
    return Event(event_type, fields["occurred_at"], fields, 1, 1, "t", 0, 0)
