"""Postgres sinks: the raw-event archive and the durable window metrics.

Both are idempotent, which is what makes at-least-once reading exact:

- :class:`ArchiveRawEvents` COPYs each batch into a temporary staging table and
  moves it into ``raw_events`` with ``ON CONFLICT DO NOTHING``; a re-delivered
  event is ignored. Daily partitions are created the first time a day is seen.
- :class:`WriteMetricsToPostgres` upserts one row per (window, family,
  entity); a refired pane overwrites the row it wrote before.

The tables are defined in ``schemas/postgres.sql``; ``scripts/stack.sh up``
applies it, and each sink applies it again at start-up (it is idempotent).
"""
from __future__ import annotations

import csv
import io
import json
import os
from datetime import datetime, timedelta, timezone
from typing import Iterable

import apache_beam as beam
import psycopg2
import psycopg2.errors
from apache_beam.metrics import Metrics
from psycopg2.extras import execute_values

from transforms.aggregate import WindowAggregate
from transforms.records import Event

_NULL = "\\N"  # COPY's NULL marker; an empty string stays an empty string
_COLUMNS = ("event_id", "occurred_at", "event_type", "user_id", "correlation_id", "schema_id",
            "schema_version", "source_topic", "source_partition", "source_offset", "payload")


def connect(dsn: str):
    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = False
    return conn


def apply_schema(dsn: str) -> None:
    """Creates the tables if missing; used by sinks and tests alike."""
    from schemas.registry import SCHEMA_DIR
    with open(os.path.join(SCHEMA_DIR, "postgres.sql")) as f:
        ddl = f.read()
    conn = connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(4242)")  # parallel workers apply it once
            cur.execute(ddl)
    finally:
        conn.close()


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


class ArchiveRawEventsFn(beam.DoFn):
    """Input: a list of Events. Writes them to ``raw_events``; outputs nothing."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.archived = Metrics.counter("ArchiveRawEvents", "events_archived")
        self.duplicates = Metrics.counter("ArchiveRawEvents", "duplicates_ignored")

    def setup(self):
        apply_schema(self.dsn)
        self.conn = connect(self.dsn)
        self.partitions: set = set()
        with self.conn, self.conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS raw_events_staging "
                        "(LIKE raw_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")

    def teardown(self):
        if getattr(self, "conn", None) is not None:
            self.conn.close()

    def _ensure_partitions(self, cur, events: list[Event]) -> None:
        days = {e.event_time_ms // 86_400_000 for e in events} - self.partitions
        for day in sorted(days):
            start = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(days=day)
            name = f"raw_events_{start:%Y%m%d}"
            cur.execute("SELECT pg_advisory_xact_lock(4243)")
            cur.execute(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF raw_events "
                        "FOR VALUES FROM (%s) TO (%s)", (start, start + timedelta(days=1)))
            self.partitions.add(day)

    def process(self, events: list[Event]):
        buf = io.StringIO()
        writer = csv.writer(buf)
        for e in events:
            f = e.fields
            writer.writerow((f["event_id"], _utc(e.event_time_ms).isoformat(), e.event_type, f["user_id"],
                             f.get("correlation_id") or _NULL, e.schema_id, e.schema_version, e.topic,
                             e.partition, e.offset, json.dumps(f, separators=(",", ":"))))
        buf.seek(0)
        with self.conn, self.conn.cursor() as cur:
            self._ensure_partitions(cur, events)
            cur.copy_expert(f"COPY raw_events_staging ({','.join(_COLUMNS)}) FROM STDIN "
                            "WITH (FORMAT csv, NULL '\\N')", buf)
            cur.execute(f"INSERT INTO raw_events ({','.join(_COLUMNS)}) "
                        f"SELECT {','.join(_COLUMNS)} FROM raw_events_staging ON CONFLICT DO NOTHING")
            inserted = cur.rowcount
        self.archived.inc(inserted)
        self.duplicates.inc(len(events) - inserted)
        return ()


class ArchiveRawEvents(beam.PTransform):
    """Batches of Events -> (nothing): every valid event lands once in ``raw_events``."""

    def __init__(self, dsn: str):
        super().__init__()
        self.dsn = dsn

    def expand(self, event_batches):
        return event_batches | "CopyToPostgres" >> beam.ParDo(ArchiveRawEventsFn(self.dsn))


_UPSERT = """
INSERT INTO window_metrics (window_seconds, window_start, window_end, family, entity_id, metrics,
                            pane_timing, pane_index)
VALUES %s
ON CONFLICT (window_seconds, window_start, family, entity_id) DO UPDATE
SET window_end = EXCLUDED.window_end, metrics = EXCLUDED.metrics,
    pane_timing = EXCLUDED.pane_timing, pane_index = EXCLUDED.pane_index, updated_at = now()
"""


class WriteMetricsToPostgresFn(beam.DoFn):
    """Input: a WindowAggregate. Upserts its rows into ``window_metrics``."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.rows = Metrics.counter("WriteMetricsToPostgres", "rows_upserted")

    def setup(self):
        apply_schema(self.dsn)
        self.conn = connect(self.dsn)

    def teardown(self):
        if getattr(self, "conn", None) is not None:
            self.conn.close()

    def process(self, agg: WindowAggregate):
        start, end = _utc(agg.window_start_ms), _utc(agg.window_end_ms)
        values = [(agg.window_seconds, start, end, r.family, r.entity_id,
                   json.dumps(r.metrics, separators=(",", ":")), agg.pane_timing, agg.pane_index)
                  for r in agg.rows]
        with self.conn, self.conn.cursor() as cur:
            execute_values(cur, _UPSERT, values, page_size=2000)
        self.rows.inc(len(values))
        return ()


class WriteMetricsToPostgres(beam.PTransform):
    """WindowAggregates -> (nothing): durable, upserted rows in ``window_metrics``."""

    def __init__(self, dsn: str):
        super().__init__()
        self.dsn = dsn

    def expand(self, aggregates):
        return aggregates | "Upsert" >> beam.ParDo(WriteMetricsToPostgresFn(self.dsn))
