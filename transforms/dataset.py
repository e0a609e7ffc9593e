"""WriteTrainingDataset: valid events as Parquet, one folder per event date and type.

    events | WriteTrainingDataset("/data/replay-2026-11-28")

writes Parquet files through Beam's own ``fileio.WriteToFiles`` (temporary
files, moved into the path when the job finishes); :func:`arrange_partitions`
then files them as ``event_date=YYYY-MM-DD/event_type=<type>/part-*.parquet``. Columns are the event type's newest schema
(``occurred_at`` as a UTC timestamp, enums as strings, optional fields nullable)
plus where each event came from: schema version, topic, partition, offset.

Batches stay batches up to the file: a Python runner pays per element (and per
row it pickles), so each batch of events becomes one element per folder it
touches, and the sink builds the Arrow columns of a whole file at once
(column by column, with pyarrow) instead of a dict per row.
"""
from __future__ import annotations

import os
import uuid
from collections import Counter
from typing import Any, BinaryIO, Iterable, Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.metrics import Metrics
from apache_beam.options.value_provider import StaticValueProvider

from schemas import default_registry
from transforms.records import DAY_MS, Event, utc_day

_ARROW = {"string": pa.string(), "boolean": pa.bool_(), "int": pa.int32(), "long": pa.int64(),
          "float": pa.float32(), "double": pa.float64(), "bytes": pa.binary()}
SOURCE_COLUMNS = [("schema_version", pa.int32()), ("source_topic", pa.string()),
                  ("source_partition", pa.int32()), ("source_offset", pa.int64())]


def _arrow_type(avro_type: Any) -> pa.DataType:
    if isinstance(avro_type, list):  # ["null", X]: nullable X
        return _arrow_type(next(t for t in avro_type if t != "null"))
    if isinstance(avro_type, dict):
        if avro_type.get("logicalType") == "timestamp-millis":
            return pa.timestamp("ms", tz="UTC")
        if avro_type["type"] == "enum":
            return pa.string()
        return _arrow_type(avro_type["type"])
    return _ARROW[avro_type]


def arrow_schema(event_type: str) -> pa.Schema:
    """The Parquet schema of one event type, from its newest Avro schema."""
    raw = default_registry().latest(event_type).raw
    fields = [pa.field(f["name"], _arrow_type(f["type"]),
                       nullable=isinstance(f["type"], list) and "null" in f["type"])
              for f in raw["fields"]]
    return pa.schema(fields + [pa.field(n, t, nullable=False) for n, t in SOURCE_COLUMNS])




def partition_of(event: Event) -> str:
    """The folder of one event: ``event_date=YYYY-MM-DD/event_type=<type>`` (UTC date of its event time)."""
    return f"event_date={utc_day(event.event_time_ms)}/event_type={event.event_type}"


def to_row(event: Event) -> dict:
    """One event as a dataset row (its fields plus where it came from); the columns of :func:`to_table`."""
    return dict(event.fields, schema_version=event.schema_version, source_topic=event.topic,
                source_partition=event.partition, source_offset=event.offset)


def to_table(events: list[Event], schema: pa.Schema) -> pa.Table:
    """Events of one event type as an Arrow table of ``schema`` (see :func:`arrow_schema`),
    built column by column: the rows of ``to_row``, without a dict per event. A field an
    event lacks is null, as in ``pa.Table.from_pylist``."""
    sources = {"schema_version": [e.schema_version for e in events],
               "source_topic": [e.topic for e in events],
               "source_partition": [e.partition for e in events],
               "source_offset": [e.offset for e in events]}
    columns = []
    for f in schema:
        values = sources.get(f.name)
        if values is None:
            name = f.name
            values = [e.fields.get(name) for e in events]
        columns.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


class BatchByPartitionFn(beam.DoFn):
    """Input: a batch (list) of Events. Output: one ``(folder, list of Events)`` per dataset
    folder (see :func:`partition_of`) the batch touches, in the batch's order.

    Counts the events per ``<event_type>:v<schema_version>`` (the manifest's
    events_by_type_and_schema_version), once per batch and key, not per event."""

    def __init__(self):
        self._counters: dict = {}

    def process(self, batch: list[Event]) -> Iterable[tuple[str, list[Event]]]:
        by_folder: dict[tuple[int, str], list[Event]] = {}
        for e in batch:
            key = (e.event_time_ms // DAY_MS, e.event_type)
            group = by_folder.get(key)
            if group is None:
                group = by_folder[key] = []
            group.append(e)
        for key, n in Counter((e.event_type, e.schema_version) for e in batch).items():
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = Metrics.counter("WriteTrainingDataset", f"{key[0]}:v{key[1]}")
            counter.inc(n)
        for events in by_folder.values():
            yield partition_of(events[0]), events


class ParquetEventsSink(fileio.FileSink):
    """A fileio sink for ``(folder, list of Events)`` of one folder: one Parquet file.

    Events are kept as they come and turned into Arrow columns a row group at a
    time (``ROW_GROUP_ROWS``), so the file is built by pyarrow in a few large
    steps and a writer's memory stays bounded by one row group."""

    ROW_GROUP_ROWS = 131_072

    def open(self, fh: BinaryIO) -> None:
        self.fh, self.pending, self.rows = fh, [], 0
        self.schema: Optional[pa.Schema] = None
        self.writer: Optional[pq.ParquetWriter] = None

    def write(self, record: tuple[str, list[Event]]) -> None:
        destination, events = record
        if self.schema is None:
            self.schema = arrow_schema(destination.rsplit("event_type=", 1)[1])
        self.pending.extend(events)
        if len(self.pending) >= self.ROW_GROUP_ROWS:
            self._write_pending()

    def _write_pending(self) -> None:
        if not self.pending:
            return
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.fh, self.schema, compression="zstd")
        self.writer.write_table(to_table(self.pending, self.schema))
        self.pending = []

    def flush(self) -> None:
        self._write_pending()
        if self.writer is not None:
            self.writer.close()  # the footer; fileio closes the file handle itself
            self.writer = None


class WriteTrainingDataset(beam.PTransform):
    """Batches of Events -> file results of ``fileio.WriteToFiles`` under ``path``.

    ``max_writers_per_bundle``: Parquet files a bundle keeps open at once, one
    per folder; the events of more folders than that go through a shuffle to
    writers of their own (fileio's spill), which is correct but costs a pickle
    per batch. A day of events holds a dozen event types, so the default covers
    ranges of a few weeks."""

    def __init__(self, path: str, temp_directory: str, max_writers_per_bundle: int = 256):
        super().__init__()
        self.path, self.temp_directory = path, temp_directory
        self.max_writers_per_bundle = max_writers_per_bundle

    def expand(self, event_batches):
        return (event_batches
                | "ByPartition" >> beam.ParDo(BatchByPartitionFn())
                | "Parquet" >> fileio.WriteToFiles(
                    self.path, destination=lambda kv: kv[0], sink=lambda _dest: ParquetEventsSink(),
                    file_naming=_partition_naming, max_writers_per_bundle=self.max_writers_per_bundle,
                    temp_directory=StaticValueProvider(str, self.temp_directory)))


_SEP = "__"


def _partition_naming(window, pane, shard_index, total_shards, compression, destination) -> str:
    # fileio moves files into one flat folder; arrange_partitions makes the folders.
    return (destination.replace("/", _SEP) + _SEP
            + f"part-{shard_index or 0:05d}-{uuid.uuid4().hex[:8]}.parquet")


def arrange_partitions(folder: str) -> int:
    """Moves ``event_date=..__event_type=..__part-*.parquet`` into their folders; returns the count."""
    moved = 0
    for name in os.listdir(folder):
        if name.endswith(".parquet") and _SEP in name:
            *dirs, leaf = name.split(_SEP)
            target = os.path.join(folder, *dirs)
            os.makedirs(target, exist_ok=True)
            os.rename(os.path.join(folder, name), os.path.join(target, leaf))
            moved += 1
    return moved
