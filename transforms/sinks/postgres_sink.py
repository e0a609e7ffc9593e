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

import io
import json
import os
import queue
import threading
from datetime import datetime, timedelta, timezone
from typing import Optional

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


def utc(ms: int) -> datetime:
    """Epoch milliseconds as an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_STAGING = """CREATE TEMP TABLE IF NOT EXISTS raw_events_staging (
    event_id text, occurred_ms bigint, event_type text, user_id text, correlation_id text,
    schema_id integer, schema_version integer, source_topic text, source_partition integer,
    source_offset bigint, payload jsonb) ON COMMIT DELETE ROWS"""
_MOVE = f"""INSERT INTO raw_events ({','.join(_COLUMNS)})
SELECT event_id, 'epoch'::timestamptz + occurred_ms * interval '1 millisecond', event_type, user_id,
       correlation_id, schema_id, schema_version, source_topic, source_partition, source_offset, payload
FROM raw_events_staging ON CONFLICT DO NOTHING"""


def copy_rows(events: list[Event]) -> str:
    """``events`` in COPY's text format: one line each, tab-separated, escaped."""
    lines = []
    for e in events:
        f = e.fields
        corr = f.get("correlation_id")
        lines.append("\t".join((
            f["event_id"].translate(_ESCAPE), str(e.event_time_ms), e.event_type,
            f["user_id"].translate(_ESCAPE), _NULL if corr is None else corr.translate(_ESCAPE),
            str(e.schema_id), str(e.schema_version), e.topic, str(e.partition), str(e.offset),
            json.dumps(f, separators=(",", ":")).translate(_ESCAPE))))
    lines.append("")
    return "\n".join(lines)


class _ArchiveWriter(threading.Thread):
    """Runs the COPYs on its own connection, so Postgres works while Python decodes.

    psycopg2 releases the GIL while the server works; a bundle waits for its
    writes in finish_bundle, so nothing is acknowledged before it is stored.
    """

    def __init__(self, dsn: str):
        super().__init__(daemon=True, name="archive-writer")
        self.conn = connect(dsn)
        self.jobs: queue.Queue = queue.Queue(maxsize=4)
        self.partitions: set = set()
        self.inserted = self.offered = 0
        self.error: Optional[BaseException] = None
        with self.conn, self.conn.cursor() as cur:
            cur.execute(_STAGING)

    def run(self):
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    self._write(*job)
            except BaseException as e:  # handed to the bundle in finish_bundle
                self.error = e
            finally:
                self.jobs.task_done()

    def _write(self, text: str, days: set, count: int) -> None:
        with self.conn, self.conn.cursor() as cur:
            for day in sorted(days - self.partitions):
                start = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(days=day)
                cur.execute("SELECT pg_advisory_xact_lock(4243)")
                cur.execute(f"CREATE TABLE IF NOT EXISTS raw_events_{start:%Y%m%d} PARTITION OF raw_events "
                            "FOR VALUES FROM (%s) TO (%s)", (start, start + timedelta(days=1)))
            cur.copy_expert("COPY raw_events_staging FROM STDIN", io.StringIO(text))
            cur.execute(_MOVE)
            self.inserted += cur.rowcount
        self.partitions |= days
        self.offered += count

    def drain(self) -> tuple[int, int]:
        """Waits for every queued write; returns (inserted, offered) since the last drain."""
        self.jobs.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        counts, self.inserted, self.offered = (self.inserted, self.offered), 0, 0
        return counts

    def close(self) -> None:
        self.jobs.put(None)
        self.join(10)
        self.conn.close()


class ArchiveRawEventsFn(beam.DoFn):
    """Input: a list of Events. Writes them to ``raw_events``; outputs nothing."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.archived = Metrics.counter("ArchiveRawEvents", "events_archived")
        self.duplicates = Metrics.counter("ArchiveRawEvents", "duplicates_ignored")

    def setup(self):
        apply_schema(self.dsn)
        self.writer = _ArchiveWriter(self.dsn)
        self.writer.start()

    def teardown(self):
        if getattr(self, "writer", None) is not None:
            self.writer.close()

    def process(self, events: list[Event]):
        days = {e.event_time_ms // 86_400_000 for e in events}
        self.writer.jobs.put((copy_rows(events), days, len(events)))
        return ()

    def finish_bundle(self):
        inserted, offered = self.writer.drain()
        self.archived.inc(inserted)
        self.duplicates.inc(offered - inserted)


class ArchiveRawEvents(beam.PTransform):
    """Batches of Events -> (nothing): every valid event lands once in ``raw_events``."""

    def __init__(self, dsn: str):
        super().__init__()
        self.dsn = dsn

    def expand(self, event_batches):
        return event_batches | "CopyToPostgres" >> beam.ParDo(ArchiveRawEventsFn(self.dsn))


_UPSERT = """
INSERT INTO {table} (window_seconds, window_start, window_end, family, entity_id, metrics,
                            pane_timing, pane_index)
VALUES %s
ON CONFLICT (window_seconds, window_start, family, entity_id) DO UPDATE
SET window_end = EXCLUDED.window_end, metrics = EXCLUDED.metrics,
    pane_timing = EXCLUDED.pane_timing, pane_index = EXCLUDED.pane_index, updated_at = now()
"""


class WriteMetricsToPostgresFn(beam.DoFn):
    """Input: a WindowAggregate. Upserts its rows into ``table`` (``window_metrics``)."""

    def __init__(self, dsn: str, table: str = "window_metrics"):
        self.dsn, self.table = dsn, table
        self.rows = Metrics.counter("WriteMetricsToPostgres", "rows_upserted")

    def setup(self):
        apply_schema(self.dsn)
        self.conn = connect(self.dsn)

    def teardown(self):
        if getattr(self, "conn", None) is not None:
            self.conn.close()

    def process(self, agg: WindowAggregate):
        start, end = utc(agg.window_start_ms), utc(agg.window_end_ms)
        values = [(agg.window_seconds, start, end, r.family, r.entity_id,
                   json.dumps(r.metrics, separators=(",", ":")), agg.pane_timing, agg.pane_index)
                  for r in agg.rows]
        with self.conn, self.conn.cursor() as cur:
            execute_values(cur, _UPSERT.format(table=self.table), values, page_size=2000)
        self.rows.inc(len(values))
        return ()


class WriteMetricsToPostgres(beam.PTransform):
    """WindowAggregates -> (nothing): durable, upserted rows in ``window_metrics``."""

    def __init__(self, dsn: str, table: str = "window_metrics"):
        super().__init__()
        self.dsn, self.table = dsn, table

    def expand(self, aggregates):
        return aggregates | "Upsert" >> beam.ParDo(WriteMetricsToPostgresFn(self.dsn, self.table))
