"""WriteTrainingDataset: valid events as Parquet, one folder per event date and type.

    events | WriteTrainingDataset("/data/replay-2026-11-28")

writes Parquet files through Beam's own ``fileio.WriteToFiles`` (temporary
files, moved into the path when the job finishes); :func:`arrange_partitions`
then files them as ``event_date=YYYY-MM-DD/event_type=<type>/part-*.parquet``. Columns are the event type's newest schema
(``occurred_at`` as a UTC timestamp, enums as strings, optional fields nullable)
plus where each event came from: schema version, topic, partition, offset.
"""
from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from typing import Any, BinaryIO

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.metrics import Metrics
from apache_beam.options.value_provider import StaticValueProvider

from schemas import default_registry
from transforms.records import Event

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
    day = datetime.fromtimestamp(event.event_time_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")
    return f"event_date={day}/event_type={event.event_type}"


def to_row(event: Event) -> dict:
    return dict(event.fields, schema_version=event.schema_version, source_topic=event.topic,
                source_partition=event.partition, source_offset=event.offset)


class ParquetRowsSink(fileio.FileSink):
    """A fileio sink that buffers (partition, row) pairs of one event type and
    writes them as one Parquet file when flushed."""

    def open(self, fh: BinaryIO) -> None:
        self.fh, self.rows, self.schema = fh, [], None

    def write(self, record: tuple[str, dict]) -> None:
        destination, row = record
        if self.schema is None:
            self.schema = arrow_schema(destination.rsplit("event_type=", 1)[1])
        self.rows.append(row)

    def flush(self) -> None:
        if self.rows:
            table = pa.Table.from_pylist(self.rows, schema=self.schema)
            pq.write_table(table, self.fh, compression="zstd")
            self.rows = []


class WriteTrainingDataset(beam.PTransform):
    """Batches of Events -> file results of ``fileio.WriteToFiles`` under ``path``."""

    def __init__(self, path: str, temp_directory: str):
        super().__init__()
        self.path, self.temp_directory = path, temp_directory

    def expand(self, event_batches):
        def partitioned(batch):
            # Per type and schema version, for the dataset's manifest.
            for e in batch:
                Metrics.counter("WriteTrainingDataset", f"{e.event_type}:v{e.schema_version}").inc()
            return [(partition_of(e), to_row(e)) for e in batch]

        return (event_batches
                | "ToRows" >> beam.FlatMap(partitioned)
                | "Parquet" >> fileio.WriteToFiles(
                    self.path, destination=lambda kv: kv[0], sink=lambda _dest: ParquetRowsSink(),
                    file_naming=_partition_naming,
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
