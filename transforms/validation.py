"""Decoding and validation of one Kafka record, without Beam.

:class:`EventValidator` turns a :class:`KafkaRecord` into an :class:`Event`, or
raises :class:`InvalidRecord` carrying an error code and a message a person can
act on. Both wire formats are checked against the same schema: Avro decoding
enforces types by construction, JSON is checked field by field; the range
constraints (``minimum``/``maximum`` on a field of the .avsc) and the timestamp
rules apply to both. Every string must be storable as Postgres text/jsonb (no
NUL, no lone surrogate) and, from Avro, every double finite, since the archive
and the aggregates would otherwise fail on the record.
"""
from __future__ import annotations

import io
import json
import math
import re
import time
from datetime import datetime, timedelta
from typing import Any, Callable, Optional

import fastavro

from schemas import RegisteredSchema, SchemaRegistry, UnknownSchemaError
from schemas.error_codes import ErrorCode  # noqa: F401  (re-exported: validation raises them)
from schemas.wire import HEADER, MAGIC_BYTE, plain_parsed
from transforms.records import Event, KafkaRecord


class InvalidRecord(Exception):
    """A record that cannot become an Event; becomes exactly one dead letter."""

    def __init__(self, code: str, message: str, event_type: Optional[str] = None,
                 correlation_id: Optional[str] = None):
        super().__init__(message)
        self.code, self.message = code, message
        self.event_type, self.correlation_id = event_type, correlation_id


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and -2**31 <= v < 2**31,
    "long": lambda v: isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63,
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "double": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "null": lambda v: v is None,
}


class _Subject:
    """What validation needs of one schema version, computed once."""

    def __init__(self, writer: RegisteredSchema, reader: RegisteredSchema):
        self.writer, self.reader = writer, reader
        self.event_type = reader.subject
        self.writer_plain = plain_parsed(writer)
        self.reader_plain = None if writer is reader else plain_parsed(reader)
        self.fields = reader.raw["fields"]
        self.ranges = [(f["name"], f.get("minimum"), f.get("maximum"))
                       for f in self.fields if "minimum" in f or "maximum" in f]


class EventValidator:
    """Decodes and validates records against a :class:`SchemaRegistry`.

    ``max_future_ms``: how far ahead of the validator's clock an event time may
    be (clients' clocks drift; a day ahead is a bug, not drift).
    """

    def __init__(self, registry: SchemaRegistry, max_future_ms: int = 5 * 60 * 1000,
                 clock: Callable[[], float] = time.time):
        self.registry = registry
        self.max_future_ms = max_future_ms
        self.clock = clock
        self._by_id: dict[int, _Subject] = {}
        self._by_type: dict[str, _Subject] = {}

    def validate(self, record: KafkaRecord) -> Event:
        value = record.value
        if not value:
            raise InvalidRecord(ErrorCode.EMPTY_RECORD,
                                "record has no value; the producer sent an empty message or a tombstone",
                                correlation_id=record.header("correlation_id"))
        if value[0] == MAGIC_BYTE:
            subject, fields = self._decode_avro(record, value)
        elif value.lstrip()[:1] == b"{":
            subject, fields = self._decode_json(record, value)
        else:
            raise InvalidRecord(
                ErrorCode.BAD_FRAMING,
                f"first byte is 0x{value[0]:02x}: expected 0x00 (Confluent-framed Avro) "
                "or '{' (a JSON object); check the producer's serializer",
                correlation_id=record.header("correlation_id"))
        try:
            _check_storable(fields)
            self._check_semantics(subject, fields)
        except InvalidRecord as e:
            # Looked up only for a dead letter: a header scan per valid record costs more than its decode's checks.
            e.event_type = subject.event_type
            e.correlation_id = fields.get("correlation_id") or record.header("correlation_id")
            raise
        return Event(subject.event_type, fields["occurred_at"], fields,
                     subject.writer.schema_id, subject.writer.version,
                     record.topic, record.partition, record.offset)

    # -- Avro ---------------------------------------------------------------

    def _subject_for_id(self, schema_id: int) -> _Subject:
        subject = self._by_id.get(schema_id)
        if subject is None:
            writer = self.registry.by_id(schema_id)
            if writer.kind != "event":
                raise UnknownSchemaError(schema_id)
            subject = _Subject(writer, self.registry.latest(writer.subject))
            self._by_id[schema_id] = subject
        return subject

    def _decode_avro(self, record: KafkaRecord, value: bytes) -> tuple[_Subject, dict]:
        if len(value) < HEADER.size:
            raise InvalidRecord(ErrorCode.BAD_FRAMING,
                                f"Avro record is {len(value)} bytes, shorter than the 5-byte "
                                "Confluent header (magic byte + schema id)",
                                correlation_id=record.header("correlation_id"))
        schema_id = HEADER.unpack_from(value)[1]
        try:
            subject = self._subject_for_id(schema_id)
        except UnknownSchemaError:
            raise InvalidRecord(ErrorCode.UNKNOWN_SCHEMA_ID,
                                f"schema id {schema_id} is not an event schema of schemas/registry.json; "
                                "register the producer's schema or fix its serializer config",
                                correlation_id=record.header("correlation_id")) from None
        buf = io.BytesIO(value)
        buf.seek(HEADER.size)
        try:
            fields = fastavro.schemaless_reader(buf, subject.writer_plain, subject.reader_plain)
        except Exception as e:  # fastavro raises many types on corrupt bytes
            raise InvalidRecord(ErrorCode.AVRO_DECODE_ERROR,
                                f"body does not decode as {subject.event_type} v{subject.writer.version} "
                                f"(schema id {schema_id}): {type(e).__name__}: {e}",
                                subject.event_type, record.header("correlation_id")) from None
        if buf.tell() != len(value):
            raise InvalidRecord(ErrorCode.AVRO_DECODE_ERROR,
                                f"{len(value) - buf.tell()} trailing bytes after a {subject.event_type} "
                                f"record (schema id {schema_id}): the body was written with another schema",
                                subject.event_type, record.header("correlation_id"))
        return subject, fields

    # -- JSON ---------------------------------------------------------------

    def _subject_for_type(self, event_type: str) -> _Subject:
        subject = self._by_type.get(event_type)
        if subject is None:
            latest = self.registry.latest(event_type)
            if latest.kind != "event":
                raise UnknownSchemaError(event_type)
            subject = _Subject(latest, latest)
            self._by_type[event_type] = subject
        return subject

    def _decode_json(self, record: KafkaRecord, value: bytes) -> tuple[_Subject, dict]:
        header = record.header("correlation_id")
        try:
            obj = json.loads(value)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurd nesting
            raise InvalidRecord(ErrorCode.JSON_DECODE_ERROR, f"not valid JSON: {e}",
                                correlation_id=header) from None
        if not isinstance(obj, dict):
            raise InvalidRecord(ErrorCode.JSON_DECODE_ERROR, "JSON value is not an object",
                                correlation_id=header)
        correlation = obj.get("correlation_id") if isinstance(obj.get("correlation_id"), str) else header
        event_type = obj.get("event_type")
        if not isinstance(event_type, str):
            raise InvalidRecord(ErrorCode.MISSING_FIELD,
                                "JSON event has no string field 'event_type'", correlation_id=correlation)
        try:
            subject = self._subject_for_type(event_type)
        except UnknownSchemaError:
            raise InvalidRecord(ErrorCode.UNKNOWN_EVENT_TYPE,
                                f"event_type '{event_type}' has no schema; known: "
                                f"{', '.join(self.registry.subjects('event'))}",
                                event_type, correlation) from None
        try:
            return subject, self._check_json_fields(subject, obj)
        except InvalidRecord as e:
            e.event_type, e.correlation_id = event_type, correlation
            raise

    def _check_json_fields(self, subject: _Subject, obj: dict) -> dict:
        fields = {}
        for f in subject.fields:
            name, ftype = f["name"], f["type"]
            if name not in obj or (obj[name] is None and "default" in f and f["default"] is None):
                if name == "occurred_at":
                    raise InvalidRecord(ErrorCode.MISSING_TIMESTAMP,
                                        "field 'occurred_at' (event time) is missing")
                if "default" not in f:
                    raise InvalidRecord(ErrorCode.MISSING_FIELD, f"required field '{name}' is missing")
                fields[name] = f["default"]
                continue
            value = obj[name]
            if name == "occurred_at":
                value = _json_timestamp(value)
            fields[name] = _check_json_value(name, ftype, value)
        return fields

    # -- rules for both formats -----------------------------------------------

    def _check_semantics(self, subject: _Subject, fields: dict) -> None:
        ts = fields.get("occurred_at")
        if not ts or ts <= 0:
            raise InvalidRecord(ErrorCode.MISSING_TIMESTAMP,
                                f"occurred_at is {ts!r}: the event time was not set by the producer")
        now_ms = int(self.clock() * 1000)
        if ts > now_ms + self.max_future_ms:
            raise InvalidRecord(ErrorCode.FUTURE_TIMESTAMP,
                                f"occurred_at {_iso(ts)} is {(ts - now_ms) / 1000:.0f}s ahead of the "
                                f"pipeline clock (allowed: {self.max_future_ms / 1000:.0f}s); "
                                "check the client's clock")
        for name, lo, hi in subject.ranges:
            v = fields[name]
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
                raise InvalidRecord(ErrorCode.OUT_OF_RANGE, f"field '{name}' is {v}, must be {bounds}")


_EPOCH = datetime(1970, 1, 1)
# Characters Postgres text and jsonb refuse: NUL, and UTF-16 surrogates (a JSON
# "\ud800" escape decodes to one; they cannot be encoded as UTF-8 at all).
UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")


def _iso(ms: int) -> str:
    """Epoch millis as ISO-8601 UTC for messages; never raises, whatever the int.

    Integer arithmetic (no float) and a fallback beyond datetime's years 1-9999:
    a corrupt record reaches here while its dead letter is written, and an
    exception would stop the job on that record at every restart.
    """
    try:
        return (_EPOCH + timedelta(milliseconds=ms)).isoformat() + "Z"
    except (OverflowError, ValueError, TypeError):
        return f"{ms} ms since 1970 (outside years 1-9999)"


def _check_storable(fields: dict) -> None:
    """Raises InvalidRecord unless every value can be archived as it is.

    In: the decoded fields (any nesting of dicts, lists and scalars). Strings,
    and map keys, must hold no NUL and no lone surrogate (INVALID_STRING); a
    float must be finite (WRONG_TYPE, as JSON's own check says): jsonb has no
    NaN. Walks values rather than the schema, so unions, maps, arrays and
    records of a later schema version are covered without listing them.
    """
    for name, value in fields.items():
        # Inlined fast path for the flat strings and ints of today's schemas: this
        # runs for every valid event.
        kind = type(value)
        if kind is str:
            if value.isascii() and "\x00" not in value:
                continue
        elif kind is int or kind is bool or value is None:
            continue
        _check_storable_value(name, value)


def _check_storable_value(path: str, value: Any) -> None:
    if isinstance(value, str):
        bad = UNSTORABLE_TEXT.search(value)
        if bad:
            raise InvalidRecord(ErrorCode.INVALID_STRING,
                                f"field '{path}' holds {bad.group()!r} at character {bad.start()}: "
                                "NUL and lone surrogates cannot be stored; fix the producer's text")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRecord(ErrorCode.WRONG_TYPE, f"field '{path}' is {value!r}, expected a finite number")
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and UNSTORABLE_TEXT.search(key):
                raise InvalidRecord(ErrorCode.INVALID_STRING,
                                    f"field '{path}' has the map key {key!r}: NUL and lone surrogates "
                                    "cannot be stored; fix the producer's text")
            _check_storable_value(f"{path}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_storable_value(f"{path}[{i}]", item)


def _json_timestamp(value: Any) -> Any:
    """Web clients send ISO-8601 strings or epoch millis; Avro wants millis."""
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidRecord(ErrorCode.WRONG_TYPE,
                                f"occurred_at '{value}' is neither ISO-8601 nor epoch millis") from None
        if dt.tzinfo is None:
            raise InvalidRecord(ErrorCode.WRONG_TYPE,
                                f"occurred_at '{value}' has no time zone; add 'Z' or an offset")
        return int(dt.timestamp() * 1000)
    return value


def _check_json_value(name: str, ftype: Any, value: Any) -> Any:
    if isinstance(ftype, list):  # union: the first branch that accepts the value
        for branch in ftype:
            try:
                return _check_json_value(name, branch, value)
            except InvalidRecord:
                continue
        raise InvalidRecord(ErrorCode.WRONG_TYPE, f"field '{name}' is {value!r}, not any of {ftype}")
    if isinstance(ftype, dict):
        if ftype["type"] == "enum":
            if value not in ftype["symbols"]:
                raise InvalidRecord(ErrorCode.BAD_ENUM,
                                    f"field '{name}' is {value!r}, must be one of {ftype['symbols']}")
            return value
        ftype = ftype["type"]
    check = _JSON_TYPES.get(ftype)
    if check is None or not check(value):
        raise InvalidRecord(ErrorCode.WRONG_TYPE,
                            f"field '{name}' is {value!r} ({type(value).__name__}), expected {ftype}")
    return float(value) if ftype in ("float", "double") else value
