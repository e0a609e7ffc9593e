"""Dead letters for events that passed validation but a later step refused.

Validation builds its own dead letters from the record's bytes
(transforms/decode.py). Later steps no longer have those bytes: the windows
refuse an event as TOO_LATE or fail to fold it, the archive may fail to store
it; :func:`event_dead_letter` re-encodes the event instead, and never raises,
since a dead letter that cannot be built would stop the job on that record.
"""
from __future__ import annotations

import time

from schemas import default_registry
from schemas.wire import encode_avro, encode_json
from transforms.records import DeadLetter, Event


def event_dead_letter(e: Event, code: str, message: str) -> DeadLetter:
    """In: a valid Event, an error code and a sentence. Out: its DeadLetter,
    with the event re-encoded as the raw bytes."""
    return DeadLetter(
        source_topic=e.topic, source_partition=e.partition, source_offset=e.offset, error_code=code,
        error_message=message, raw_bytes=_reencoded(e), correlation_id=e.fields.get("correlation_id"),
        event_type=e.event_type, failed_at=int(time.time() * 1000), record_time_ms=e.event_time_ms)


def _reencoded(e: Event) -> bytes:
    """Avro with the subject's newest schema; JSON, or the fields' repr, for an
    event that no longer fits it (building a dead letter must not fail)."""
    try:
        return encode_avro(default_registry().latest(e.event_type), e.fields)
    except Exception:
        try:
            return encode_json(e.event_type, e.fields)
        except Exception:
            return repr(e.fields).encode("utf-8", "backslashreplace")
