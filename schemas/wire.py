"""The two wire formats events arrive in, and the Confluent framing of Avro.

Avro binary is framed as Confluent's serializers do it: one magic byte 0, the
schema id as 4 big-endian bytes, then the Avro body. JSON is a plain object with
an ``event_type`` field naming the subject, as web clients send it.
"""
from __future__ import annotations

import io
import json
import struct
from typing import Any

import fastavro

from schemas.registry import RegisteredSchema, SchemaRegistry, default_registry

MAGIC_BYTE = 0
HEADER = struct.Struct(">bI")


def strip_logical_types(schema: Any) -> Any:
    """The same schema with logical types removed, so timestamps decode as plain ints.

    Decoding a timestamp-millis into a datetime and back costs more than the
    rest of the record; the bytes on the wire are the same either way.
    """
    if isinstance(schema, list):
        return [strip_logical_types(s) for s in schema]
    if isinstance(schema, dict):
        return {k: strip_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    return schema


def plain_parsed(entry: RegisteredSchema) -> Any:
    return fastavro.parse_schema(strip_logical_types(entry.raw), named_schemas={})


def frame(schema_id: int, body: bytes) -> bytes:
    return HEADER.pack(MAGIC_BYTE, schema_id) + body


def encode_avro(entry: RegisteredSchema, record: dict, parsed: Any = None) -> bytes:
    """``record`` as Confluent-framed Avro; timestamps given as epoch millis."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed if parsed is not None else plain_parsed(entry), record)
    return frame(entry.schema_id, buf.getvalue())


def avro_long(n: int) -> bytes:
    """An Avro int or long: zig-zag, then a base-128 varint, low groups first."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def avro_string(text: str) -> bytes:
    """An Avro string: its UTF-8 length as a long, then the bytes."""
    data = text.encode()
    return avro_long(len(data)) + data


_DOUBLE = struct.Struct("<d").pack


def avro_double_map(values: dict, keys: dict) -> bytes:
    """An Avro map of doubles, as fastavro writes one: a single block (its count),
    then key and little-endian double per entry, then the empty block.
    ``keys`` caches each key's encoded bytes (a map's keys repeat across records)."""
    if not values:
        return b"\x00"
    parts = [avro_long(len(values))]
    for k, v in values.items():
        kb = keys.get(k)
        if kb is None:
            kb = keys[k] = avro_string(k)
        parts.append(kb)
        parts.append(_DOUBLE(v))
    parts.append(b"\x00")
    return b"".join(parts)


def encode_json(event_type: str, record: dict) -> bytes:
    return json.dumps(dict(record, event_type=event_type), separators=(",", ":")).encode()


def schema_id_of(value: bytes) -> int | None:
    """The schema id of Confluent-framed Avro, or None when ``value`` is not framed so."""
    if not value or len(value) < HEADER.size or value[0] != MAGIC_BYTE:
        return None
    return HEADER.unpack_from(value)[1]


def decode_avro(value: bytes, registry: SchemaRegistry | None = None) -> tuple[RegisteredSchema, dict]:
    """Confluent-framed Avro -> (its writer schema, the record with timestamps as millis).

    Raises ValueError when ``value`` is not framed Avro, UnknownSchemaError for
    an id the registry does not hold, and fastavro's errors for a corrupt body.
    For records the project wrote itself (dead letters, aggregates); events
    are decoded and validated by transforms/validation.py.
    """
    schema_id = schema_id_of(value)
    if schema_id is None:
        raise ValueError("not Confluent-framed Avro (no magic byte 0 and 4-byte schema id)")
    writer = (registry or default_registry()).by_id(schema_id)
    return writer, fastavro.schemaless_reader(io.BytesIO(value[HEADER.size:]), _plain(writer))


_PLAIN: dict = {}


def _plain(entry: RegisteredSchema):
    parsed = _PLAIN.get(entry.schema_id)
    if parsed is None:
        parsed = _PLAIN[entry.schema_id] = plain_parsed(entry)
    return parsed


def produce_waiting(producer, topic: str, value: bytes, key: bytes | None = None, **kwargs) -> None:
    """``producer.produce(...)``, waiting while the client's local queue is full.

    confluent-kafka raises BufferError instead of blocking; serving delivery
    reports (poll) is what frees the queue. ``kwargs`` go to ``produce``.
    """
    while True:
        try:
            producer.produce(topic, value, key, **kwargs)
            return
        except BufferError:
            producer.poll(0.05)
