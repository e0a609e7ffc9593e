"""What the pane sinks send, checked without the services: the Redis script's
JSON, the Postgres upsert's arrays, the Kafka records' bytes."""
from __future__ import annotations

import dataclasses
import io
import json

import fastavro
import pytest

from schemas import default_registry
from schemas.serving import window_key
from schemas.wire import avro_double_map, avro_long, avro_string, decode_avro
from transforms.aggregate import MetricRow, WindowAggregate
from transforms.sinks.kafka_sink import AggregateEncoder
from transforms.sinks.postgres_sink import pane_params
from transforms.sinks.redis_sink import pane_rows_json

START = 1_700_000_040_000 - 1_700_000_040_000 % 3_600_000


def pane(seconds: int = 60, timing: str = "EARLY", index: int = 2) -> WindowAggregate:
    rows = [MetricRow("user", "u1", {"events": 3.0, "accuracy": 2 / 3, "mean_response_time_ms": 0.1 + 0.2}),
            MetricRow("concept", "algèbre|x:y", {"answers": 1e17, "mastery_change": -0.25}),
            MetricRow("overall", "all", {})]
    return WindowAggregate(seconds, START, START + seconds * 1000, timing, index, rows)


@pytest.mark.parametrize("n", [0, 1, -1, 63, 64, -65, 300, 2 ** 31, -2 ** 40, 1_700_000_000_000, 2 ** 62])
def test_an_avro_long_is_what_fastavro_writes(n):
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, {"type": "long"}, n)
    assert avro_long(n) == buf.getvalue()


@pytest.mark.parametrize("value", [{}, {"a": 1.0, "bb": -0.5, "c": 3}, {f"k{i}é": i / 7 for i in range(70)}])
def test_an_avro_string_and_double_map_are_what_fastavro_writes(value):
    for text in value:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, "string", text)
        assert avro_string(text) == buf.getvalue()
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, {"type": "map", "values": "double"}, value)
    assert avro_double_map(value, {}) == buf.getvalue()


@pytest.mark.parametrize("fast", [True, False])
def test_aggregate_records_decode_to_the_pane_rows(fast):
    entry = default_registry().latest("aggregated_metric")
    encoder = AggregateEncoder(entry)
    assert encoder.fast  # the registered schema takes the fast path; False tests the fallback
    encoder.fast = fast
    for agg in (pane(), pane(3600, "ON_TIME", 0), pane(86400, "LATE", 123_456_789)):
        records = encoder.encode(agg)
        label = {60: "1m", 3600: "1h", 86400: "1d"}[agg.window_seconds]
        assert [k for k, _ in records] == [f"{label}:{START}:{r.family}:{r.entity_id}".encode() for r in agg.rows]
        decoded = [decode_avro(v)[1] for _, v in records]
        assert decoded == [{"window_seconds": agg.window_seconds, "window_start": START,
                            "window_end": agg.window_end_ms, "family": r.family, "entity_id": r.entity_id,
                            "metrics": r.metrics, "pane_timing": agg.pane_timing, "pane_index": agg.pane_index}
                           for r in agg.rows]


def test_a_schema_with_other_row_fields_is_encoded_record_by_record():
    entry = default_registry().latest("aggregated_metric")
    raw = json.loads(json.dumps(entry.raw))
    raw["fields"] = [f for f in raw["fields"] if f["name"] != "entity_id"] + [
        next(f for f in raw["fields"] if f["name"] == "entity_id")]
    other = dataclasses.replace(entry, raw=raw, parsed=fastavro.parse_schema(raw, named_schemas={}))
    encoder = AggregateEncoder(other)
    assert not encoder.fast
    _, value = encoder.encode(pane())[1]
    record = fastavro.schemaless_reader(io.BytesIO(value[5:]), fastavro.parse_schema(raw, named_schemas={}))
    assert (record["entity_id"], record["metrics"]) == ("algèbre|x:y", {"answers": 1e17, "mastery_change": -0.25})


def test_the_redis_rows_carry_each_key_and_each_value_as_redis_py_wrote_it():
    agg = pane()
    rows = json.loads(pane_rows_json(agg, "analytics", agg.rows))
    # redis-py's Encoder wrote a float as repr(): readers compare these strings.
    assert rows == [
        [window_key("1m", START, "user", "u1"), "events", "3.0", "accuracy", "0.6666666666666666",
         "mean_response_time_ms", "0.30000000000000004"],
        [window_key("1m", START, "concept", "algèbre|x:y"), "answers", "1e+17", "mastery_change", "-0.25"],
        [window_key("1m", START, "overall", "all")]]


def test_the_postgres_arrays_hold_one_row_each_in_order():
    agg = pane()
    p = pane_params(agg)
    assert (p["seconds"], p["timing"], p["index"]) == (60, "EARLY", 2)
    assert p["families"] == ["user", "concept", "overall"]
    assert p["entities"] == ["u1", "algèbre|x:y", "all"]
    assert [json.loads(m) for m in p["metrics"]] == [r.metrics for r in agg.rows]
    assert (p["end"] - p["start"]).total_seconds() == 60
