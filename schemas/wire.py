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

from schemas.registry import RegisteredSchema

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


def encode_json(event_type: str, record: dict) -> bytes:
    return json.dumps(dict(record, event_type=event_type), separators=(",", ":")).encode()
