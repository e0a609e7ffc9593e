"""Postgres sinks: the raw-event archive and the durable window metrics.

Both are idempotent, which is what makes at-least-once reading exact:

- :class:`ArchiveRawEvents` COPYs each batch into a temporary staging table and
  moves it into ``raw_events`` with ``ON CONFLICT DO NOTHING``; a re-delivered
  event is ignored. Daily partitions are created the first time a day is seen.
- :class:`WriteMetricsToPostgres` upserts one row per (window, family,
  entity); a refired pane overwrites the row it wrote before.

The tables are defined in ``schemas/postgres.sql``; ``scripts/stack.sh up``
applies it, and each sink applies it again at start-up (it is idempotent).

When Postgres is away (connection refused or lost, the server shutting down or
starting up: ``OperationalError``/``InterfaceError``), a write is redone whole,
as a new transaction on a new connection, and while Postgres stays away the
sink's circuit breaker holds it until ``SELECT 1`` answers (see
``transforms/sinks/resilience.py``): the bundle waits, nothing is dropped.
"""
from __future__ import annotations

import io
import json
import logging
import queue
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import NamedTuple, Optional

import apache_beam as beam
import psycopg2
import psycopg2.errors
from apache_beam.metrics import Metrics
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from schemas import postgres as postgres_schema
from schemas.postgres import PARTITION_LOCK, connect, utc
from transforms.aggregate import WindowAggregate
from transforms.dead_letters import event_dead_letter
from transforms.records import Event
from transforms.sinks.resilience import BreakerCounters, CircuitBreaker, SinkRetryConfig
from transforms.sinks.written import PaneWritten
from transforms.validation import ErrorCode

LOG = logging.getLogger(__name__)

_NULL = "\\N"  # COPY's NULL marker; an empty string stays an empty string
_COLUMNS = ("event_id", "occurred_at", "event_type", "user_id", "correlation_id", "schema_id",
            "schema_version", "source_topic", "source_partition", "source_offset", "payload")


# Errors that mean "Postgres is not there" (refused, lost, AdminShutdown, starting up).
TRANSIENT = (psycopg2.OperationalError, psycopg2.InterfaceError)
# Errors that mean "Postgres cannot store this data": retrying would fail the same way.
REFUSED = (psycopg2.DataError, psycopg2.IntegrityError)


def sink_connect(dsn: str, retry: SinkRetryConfig):
    """A sink's connection: bounded connect, TCP keepalives so a vanished server is noticed."""
    conn = psycopg2.connect(dsn, connect_timeout=max(2, round(retry.probe_timeout_s)),
                            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3)
    conn.autocommit = False
    return conn


def postgres_breaker(sink: str, dsn: str, retry: SinkRetryConfig) -> CircuitBreaker:
    """A breaker whose probe is ``SELECT 1`` on a new connection."""
    def probe():
        conn = psycopg2.connect(dsn, connect_timeout=max(2, round(retry.probe_timeout_s)))
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        finally:
            conn.close()
    return CircuitBreaker(f"{sink}({_where(dsn)})", retry, probe=probe, transient=TRANSIENT)


def _where(dsn: str) -> str:
    """host:port/db of a DSN, without credentials, for log lines."""
    try:
        p = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "?"
    return f"{p.get('host', '')}:{p.get('port', '5432')}/{p.get('dbname', '')}"


def _close_quietly(conn) -> None:
    if conn is not None:
        try:
            conn.close()
        except psycopg2.Error:
            pass


def apply_schema(dsn: str) -> None:
    """Creates the tables if missing (schemas/postgres.py); used by sinks and tests alike."""
    conn = connect(dsn)
    try:
        postgres_schema.apply_schema(conn)
    finally:
        conn.close()


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
    A COPY transaction that fails on the connection is redone on a new one
    (with its own staging table: a temporary table lives and dies with its
    connection); while Postgres stays away, the writer's breaker holds it, so
    the queue fills, ``process`` blocks and ``finish_bundle`` waits.
    """

    def __init__(self, dsn: str, retry: Optional[SinkRetryConfig] = None):
        super().__init__(daemon=True, name="archive-writer")
        self.dsn, self.retry = dsn, retry or SinkRetryConfig()
        self.conn = None
        self.breaker = postgres_breaker("ArchiveRawEvents", dsn, self.retry)
        self.jobs: queue.Queue = queue.Queue(maxsize=4)
        self.partitions: set = set()
        self.inserted = self.offered = 0
        self.rejected: list = []  # (Event, its error, the batch's timestamp and window)
        self.error: Optional[BaseException] = None

    def run(self):
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    rejected = self.breaker.call(lambda: self._write(job), reset=self._reset)
                    self.rejected.extend(rejected)
            except BaseException as e:  # handed to the bundle in finish_bundle
                self.error = e
            finally:
                self.jobs.task_done()

    def _connection(self):
        if self.conn is None:
            conn = sink_connect(self.dsn, self.retry)
            try:
                with conn, conn.cursor() as cur:
                    cur.execute(_STAGING)
            except BaseException:
                _close_quietly(conn)
                raise
            self.conn = conn
        return self.conn

    def _reset(self) -> None:
        conn, self.conn = self.conn, None
        _close_quietly(conn)

    def _write(self, batch: "_Batch") -> list:
        """One batch in one transaction; returns what Postgres refused (usually nothing).

        Redone whole on a retry (a redone move inserts nothing twice). When
        Postgres refuses the data itself (a DataError or IntegrityError: a
        value it cannot store, which validation should have caught), the batch
        is written again one event per transaction, so that only the events it
        refuses are left out, each to become a dead letter.
        """
        try:
            self._copy(batch.text, batch.days)
        except REFUSED:
            return self._write_each(batch)
        self.offered += len(batch.events)
        return []

    def _write_each(self, batch: "_Batch") -> list:
        refused = []
        for event in batch.events:
            try:
                self._copy(copy_rows([event]), {event.event_time_ms // 86_400_000})
            except REFUSED as e:
                refused.append((event, e, batch.timestamp, batch.window))
        self.offered += len(batch.events) - len(refused)
        return refused

    def _copy(self, text: str, days: set) -> None:
        """COPY ``text`` to staging and move it into raw_events, in one transaction."""
        conn = self._connection()
        with conn, conn.cursor() as cur:
            for day in sorted(days - self.partitions):
                start = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(days=day)
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
                cur.execute(f"CREATE TABLE IF NOT EXISTS raw_events_{start:%Y%m%d} PARTITION OF raw_events "
                            "FOR VALUES FROM (%s) TO (%s)", (start, start + timedelta(days=1)))
            # Bytes, not text: psycopg2 passes them through (a str is decoded in C, which prints a
            # SystemError on stderr when the server goes away mid-COPY).
            data = io.BytesIO(text.encode(psycopg2.extensions.encodings[conn.encoding]))
            cur.copy_expert("COPY raw_events_staging FROM STDIN", data)
            cur.execute(_MOVE)
            inserted = cur.rowcount
        self.inserted += inserted   # only once committed
        self.partitions |= days

    def drain(self) -> tuple[int, int, list]:
        """Waits for every queued write; returns (inserted, offered, refused) since the last drain."""
        self.jobs.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        counts = (self.inserted, self.offered, self.rejected)
        self.inserted, self.offered, self.rejected = 0, 0, []
        return counts

    def close(self) -> None:
        self.jobs.put(None)
        self.join(10)
        if not self.is_alive():
            self._reset()


class _Batch(NamedTuple):
    """One input batch as the writer thread needs it."""
    text: str            # the events in COPY's format, built on the bundle's thread
    days: set            # their days since 1970, for the daily partitions
    events: list         # the Events, for writing them one by one if Postgres refuses the batch
    timestamp: Timestamp
    window: object


class ArchiveRawEventsFn(beam.DoFn):
    """Input: a list of Events. Writes them to ``raw_events``. Output: a
    PROCESSING_ERROR DeadLetter for each event Postgres refuses to store
    (none, as long as validation knows Postgres's rules)."""

    def __init__(self, dsn: str, retry: Optional[SinkRetryConfig] = None):
        self.dsn = dsn
        self.retry = retry or SinkRetryConfig()
        self.archived = Metrics.counter("ArchiveRawEvents", "events_archived")
        self.duplicates = Metrics.counter("ArchiveRawEvents", "duplicates_ignored")
        self.refused = Metrics.counter("ArchiveRawEvents", "events_refused")
        self.counters = BreakerCounters("ArchiveRawEvents")

    def setup(self):
        self.writer = _ArchiveWriter(self.dsn, self.retry)
        # A DoFn set up while Postgres is away (a new instance for a new bundle) waits here.
        self.writer.breaker.call(lambda: apply_schema(self.dsn))
        self.writer.start()

    def teardown(self):
        if getattr(self, "writer", None) is not None:
            self.writer.close()

    def process(self, events: list[Event], timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        days = {e.event_time_ms // 86_400_000 for e in events}
        self.writer.jobs.put(_Batch(copy_rows(events), days, events, timestamp, window))
        return ()

    def finish_bundle(self):
        try:
            inserted, offered, refused = self.writer.drain()
        finally:
            self.counters.report(self.writer.breaker)
        self.archived.inc(inserted)
        self.duplicates.inc(offered - inserted)
        for event, error, timestamp, window in refused:
            self.refused.inc()
            LOG.warning("raw_events refused %s:%d:%d: %s", event.topic, event.partition, event.offset, error)
            yield WindowedValue(event_dead_letter(
                event, ErrorCode.PROCESSING_ERROR,
                f"Postgres refused to archive it ({type(error).__name__}: {str(error).strip()[:300]}); "
                "it is counted in the windows but not in raw_events"), timestamp, [window])


class ArchiveRawEvents(beam.PTransform):
    """Batches of Events -> PROCESSING_ERROR DeadLetters of the events Postgres
    refused; every other valid event lands once in ``raw_events``."""

    def __init__(self, dsn: str, retry: Optional[SinkRetryConfig] = None):
        super().__init__()
        self.dsn, self.retry = dsn, retry

    def expand(self, event_batches):
        return event_batches | "CopyToPostgres" >> beam.ParDo(ArchiveRawEventsFn(self.dsn, self.retry))


# A pane's rows are upserted by one statement over three arrays (family,
# entity, metrics JSON): execute_values built and quoted a VALUES tuple of
# eight values per row in Python. The window and pane columns are the same for
# every row of a pane, so they are parameters once. (A COPY to a temporary
# table cost as little per row but a second round trip per pane.)
_UPSERT = """
INSERT INTO {table} (window_seconds, window_start, window_end, family, entity_id, metrics,
                            pane_timing, pane_index)
SELECT %(seconds)s, %(start)s, %(end)s, family, entity_id, metrics::jsonb, %(timing)s, %(index)s
FROM unnest(%(families)s::text[], %(entities)s::text[], %(metrics)s::text[]) AS pane(family, entity_id, metrics)
ON CONFLICT (window_seconds, window_start, family, entity_id) DO UPDATE
SET window_end = EXCLUDED.window_end, metrics = EXCLUDED.metrics,
    pane_timing = EXCLUDED.pane_timing, pane_index = EXCLUDED.pane_index, updated_at = now()
"""


def pane_params(agg: WindowAggregate) -> dict:
    """The parameters of ``_UPSERT`` for the rows of ``agg``."""
    rows = agg.rows
    return {"seconds": agg.window_seconds, "start": utc(agg.window_start_ms), "end": utc(agg.window_end_ms),
            "timing": agg.pane_timing, "index": agg.pane_index,
            "families": [r.family for r in rows], "entities": [r.entity_id for r in rows],
            "metrics": [json.dumps(r.metrics, separators=(",", ":")) for r in rows]}


class WriteMetricsToPostgresFn(beam.DoFn):
    """Input: a WindowAggregate. Upserts its rows into ``table`` (``window_metrics``).

    A pane's upserts are one statement in one transaction; when the connection
    fails it is redone whole on a new connection, and while Postgres stays
    away the DoFn's circuit breaker holds it (blocking the bundle) until it answers.
    """

    def __init__(self, dsn: str, table: str = "window_metrics", retry: Optional[SinkRetryConfig] = None):
        self.dsn, self.table = dsn, table
        self.retry = retry or SinkRetryConfig()
        self.rows = Metrics.counter("WriteMetricsToPostgres", "rows_upserted")
        self.counters = BreakerCounters("WriteMetricsToPostgres")
        self.written = PaneWritten("WriteMetricsToPostgres")

    def setup(self):
        self.conn = None
        self.upsert = _UPSERT.format(table=self.table)
        self.breaker = postgres_breaker("WriteMetricsToPostgres", self.dsn, self.retry)
        # A DoFn set up while Postgres is away (a new instance for a new bundle) waits here.
        self.breaker.call(lambda: apply_schema(self.dsn))

    def teardown(self):
        self._reset()

    def _reset(self) -> None:
        conn, self.conn = getattr(self, "conn", None), None
        _close_quietly(conn)

    def process(self, agg: WindowAggregate):
        params = pane_params(agg)
        began = time.monotonic()
        self.breaker.call(lambda: self._upsert(params), reset=self._reset)
        self.written.observe(agg, time.monotonic() - began)
        self.rows.inc(len(agg.rows))
        self.counters.report(self.breaker)
        return ()

    def _upsert(self, params: dict) -> None:
        if self.conn is None:
            self.conn = sink_connect(self.dsn, self.retry)
        with self.conn, self.conn.cursor() as cur:
            cur.execute(self.upsert, params)


class WriteMetricsToPostgres(beam.PTransform):
    """WindowAggregates -> (nothing): durable, upserted rows in ``window_metrics``."""

    def __init__(self, dsn: str, table: str = "window_metrics", retry: Optional[SinkRetryConfig] = None):
        super().__init__()
        self.dsn, self.table, self.retry = dsn, table, retry

    def expand(self, aggregates):
        return aggregates | "Upsert" >> beam.ParDo(WriteMetricsToPostgresFn(self.dsn, self.table, self.retry))
