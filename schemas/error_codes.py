"""The stable codes on dead letters (the ``error_code`` of schema ``dead_letter``).

Dashboards, alerts and the recovery command select by them, so they never
change meaning. Importable without Beam.
"""


class ErrorCode:
    """Stable codes on dead letters; dashboards and recovery select by them."""
    EMPTY_RECORD = "EMPTY_RECORD"
    BAD_FRAMING = "BAD_FRAMING"
    UNKNOWN_SCHEMA_ID = "UNKNOWN_SCHEMA_ID"
    AVRO_DECODE_ERROR = "AVRO_DECODE_ERROR"
    JSON_DECODE_ERROR = "JSON_DECODE_ERROR"
    UNKNOWN_EVENT_TYPE = "UNKNOWN_EVENT_TYPE"
    MISSING_FIELD = "MISSING_FIELD"
    WRONG_TYPE = "WRONG_TYPE"
    BAD_ENUM = "BAD_ENUM"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    MISSING_TIMESTAMP = "MISSING_TIMESTAMP"
    FUTURE_TIMESTAMP = "FUTURE_TIMESTAMP"
    INVALID_STRING = "INVALID_STRING"
    # Not a property of the record: an unexpected exception while decoding,
    # folding or archiving it (transforms/decode.py, aggregate.py, sinks/postgres_sink.py).
    PROCESSING_ERROR = "PROCESSING_ERROR"
    TOO_LATE = "TOO_LATE"  # refused by the windows: later than --allowed_lateness (transforms.aggregate)
