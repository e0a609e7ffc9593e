"""WriteTrainingDataset's pieces on in-memory events: folders, Arrow tables, manifest counters."""
import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.dataset as ds
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from tests.helpers import BASE_MS, answer
from transforms.dataset import WriteTrainingDataset, arrange_partitions, arrow_schema, partition_of, to_table
from transforms.records import Event

DAY_MS = 86_400_000


def _event(ts_ms: int, offset: int, **extra) -> Event:
    fields = answer(ts_ms, **extra)
    return Event("question_answered", ts_ms, fields, 1, 1, "learning.events.v1", offset % 3, offset)


def test_to_table_holds_the_rows_a_row_by_row_build_holds():
    events = [_event(BASE_MS + i * 1000, i, rt=i * 7, correlation_id=None if i % 2 else f"c{i}") for i in range(50)]
    events[3].fields.pop("difficulty")  # a field an event lacks is null, as from_pylist makes it
    schema = arrow_schema("question_answered")
    rows = [dict(e.fields, schema_version=e.schema_version, source_topic=e.topic,
                 source_partition=e.partition, source_offset=e.offset) for e in events]
    assert to_table(events, schema).equals(pa.Table.from_pylist(rows, schema=schema))


def test_partition_of_is_the_utc_date_of_the_event_time():
    last_ms_of_2025 = BASE_MS - 1
    assert partition_of(_event(last_ms_of_2025, 0)) == "event_date=2025-12-31/event_type=question_answered"
    assert partition_of(_event(BASE_MS, 0)) == "event_date=2026-01-01/event_type=question_answered"


def test_batches_become_one_file_per_folder_with_every_event_and_the_manifest_counts(tmp_path):
    # Two batches over two days: 3 + 2 events on day 1, 1 on day 2.
    batches = [[_event(BASE_MS + 5, 0), _event(BASE_MS + DAY_MS + 5, 1), _event(BASE_MS + 6, 2)],
               [_event(BASE_MS + 7, 3), _event(BASE_MS + 8, 4), _event(BASE_MS + 9, 5)]]
    out, temp = str(tmp_path / "data"), str(tmp_path / "temp")
    p = beam.Pipeline(runner=FnApiRunner())
    _ = p | beam.Create(batches) | WriteTrainingDataset(out, temp)
    result = p.run()
    result.wait_until_finish()
    arrange_partitions(out)
    folders = sorted(os.path.relpath(root, out) for root, _, files in os.walk(out) if files)
    assert folders == ["event_date=2026-01-01/event_type=question_answered",
                       "event_date=2026-01-02/event_type=question_answered"]
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    by_day = {}
    for offset, day in zip(table["source_offset"].to_pylist(), table["event_date"].to_pylist()):
        by_day.setdefault(str(day), []).append(offset)
    assert {d: sorted(o) for d, o in by_day.items()} == {"2026-01-01": [0, 2, 3, 4, 5], "2026-01-02": [1]}
    counters = result.metrics().query(MetricsFilter().with_namespace("WriteTrainingDataset"))["counters"]
    assert {c.key.metric.name: c.committed for c in counters} == {"question_answered:v1": 6}
