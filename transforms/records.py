"""The element types that flow between the transforms.

Plain NamedTuples: cheap to build on the hot path, picklable for the runner,
and readable in tests.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import NamedTuple, Optional

DAY_MS = 86_400_000
_DAYS: dict[int, str] = {}  # days since 1970 -> "YYYY-MM-DD"; a stream spans few


def utc_day(event_time_ms: int) -> str:
    """The UTC date of an event time, as YYYY-MM-DD (cached per whole day since
    1970: no float and no datetime per event on the hot path)."""
    days = event_time_ms // DAY_MS
    text = _DAYS.get(days)
    if text is None:
        text = _DAYS[days] = datetime.fromtimestamp(days * 86_400, tz=timezone.utc).strftime("%Y-%m-%d")
    return text


class KafkaRecord(NamedTuple):
    """One Kafka record exactly as read, with its coordinates."""
    topic: str
    partition: int
    offset: int
    key: Optional[bytes]
    value: Optional[bytes]
    timestamp_ms: int
    headers: tuple = ()

    def header(self, name: str) -> Optional[str]:
        for k, v in self.headers:
            if k == name and v is not None:
                return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        return None


class Event(NamedTuple):
    """A decoded, validated event; ``fields`` follow the subject's newest schema."""
    event_type: str
    event_time_ms: int
    fields: dict
    schema_id: int
    schema_version: int
    topic: str
    partition: int
    offset: int


class DeadLetter(NamedTuple):
    """A record that failed, why, and where it came from (schema ``dead_letter``)."""
    source_topic: str
    source_partition: int
    source_offset: int
    error_code: str
    error_message: str
    raw_bytes: bytes
    correlation_id: Optional[str]
    event_type: Optional[str]
    failed_at: int
    attempt: int = 0
    # The source record's Kafka timestamp (event time, as producers set it), when
    # known: the dead-letter rate counts a letter in that minute. Not on the wire.
    record_time_ms: Optional[int] = None
