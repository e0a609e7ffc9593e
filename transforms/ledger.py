"""The window ledger: exact window totals across restarts on a runner without checkpoints.

Prism keeps window state in memory only, so a new run starts empty; and a run
may be killed after the reader committed offsets but before the windows
holding those records were written. The ledger closes that gap:

- :class:`~transforms.aggregate.FoldIntoWindows` folds each bundle per Kafka
  partition and writes one row per (partition, offset range, window) with the
  partial counters, in one Postgres transaction at the end of the bundle.
- The reader commits a partition's offset only when the bundle is finalized,
  i.e. after every step fused with it (this fold, the archive, the dead-letter
  producer) finished the bundle. So a committed offset ``c`` means: every
  record below ``c`` is in the ledger, the archive or the dead-letter topic.
- At start-up, :func:`prepare_resume` drops the rows at or above the committed
  offsets (those records are read again) and compacts the rest; the job reads
  them back with :func:`read_seeds`, merged per window, and
  :class:`~transforms.aggregate.AccumulatePanes` starts each window from its seed. Every window total is then the seed
  (records below ``c``) plus what the new run reads (records from ``c``):
  nothing lost, nothing counted twice, whatever moment the old run died at.

Bounded: :func:`compact` merges a window's committed rows per partition into
one and deletes windows past their lateness, at start-up and every
``compact_every_s`` while the job runs, so what a restart reads grows with the
number of open windows and entities, not with the traffic since the last one.

Setup::

    ledger = WindowLedger(dsn, group_id="learning-analytics")
    committed = {("learning.events.v1", 0): 1200, ...}
    prepare_resume(ledger, committed, finest_s=60, lateness_ms=3_600_000)   # the launcher
    for (size_s, start_ms), partial in read_seeds(ledger, committed): ...   # the job
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import psycopg2
from psycopg2.extras import execute_values

from schemas.postgres import COMPACTION_LOCK

LOG = logging.getLogger(__name__)

# (topic, partition) -> the committed offset: the first record not yet durable.
Committed = dict
# (window_seconds, window_start_ms) -> Partial ({family: {entity: [counters]}})
WindowPartials = dict

_LOCK = COMPACTION_LOCK  # one compaction at a time per consumer group


@dataclass(frozen=True)
class WindowLedger:
    """Where the ledger lives: a Postgres DSN and the consumer group it belongs to."""
    dsn: str
    group_id: str
    compact_every_s: float = 60.0

    def connect(self):
        conn = psycopg2.connect(self.dsn, connect_timeout=10)
        conn.autocommit = False
        return conn


class LedgerRow(NamedTuple):
    """What one bundle folded from one partition into one window."""
    topic: str
    partition: int
    from_offset: int
    to_offset: int
    window_seconds: int
    window_start_ms: int
    partial: dict
    horizon_ms: int


class Seeds(NamedTuple):
    """What a restart starts from: how many windows the ledger seeds, from how
    many rows, the lateness horizon reached, and the seconds it took to get there."""
    windows: int
    horizon_ms: Optional[int]
    rows: int
    seconds: float


_INSERT = """INSERT INTO window_ledger (group_id, topic, partition, from_offset, to_offset, window_seconds,
    window_start_ms, partial, horizon_ms) VALUES %s
ON CONFLICT (group_id, topic, partition, window_seconds, window_start_ms, from_offset) DO UPDATE
SET to_offset = EXCLUDED.to_offset, partial = EXCLUDED.partial, horizon_ms = EXCLUDED.horizon_ms,
    written_at = clock_timestamp()"""


def write_rows(conn, group_id: str, rows: list[LedgerRow]) -> int:
    """Inserts ``rows`` in one transaction. A retried bundle (same partition,
    window and first offset) replaces its earlier row rather than adding to it."""
    if rows:
        with conn, conn.cursor() as cur:
            _insert(cur, group_id, rows)
    return len(rows)


def _insert(cur, group_id: str, rows: list[LedgerRow]) -> None:
    execute_values(cur, _INSERT, [(group_id, r.topic, r.partition, r.from_offset, r.to_offset, r.window_seconds,
                                   r.window_start_ms, json.dumps(r.partial, separators=(",", ":")),
                                   r.horizon_ms) for r in rows], page_size=500)


def _committed_table(cur, committed: Committed) -> None:
    cur.execute("CREATE TEMP TABLE IF NOT EXISTS ledger_committed (topic text, partition int, committed bigint) "
                "ON COMMIT DROP")
    execute_values(cur, "INSERT INTO ledger_committed VALUES %s",
                   [(t, p, c) for (t, p), c in committed.items()])


def compact(ledger: WindowLedger, committed: Committed, finest_s: int, lateness_ms: int,
            conn=None, keep_below: Optional[Committed] = None) -> tuple[int, int]:
    """Merges each (partition, window)'s rows below the committed offset into one
    row, and deletes windows that no event can reach any more (see
    :func:`expired_before`). Returns (rows merged away, rows expired).

    Only rows wholly below the committed offset are touched: rows above it may
    still be dropped by a restart. ``keep_below``: the offsets a running job
    started from; rows below them (its seeds) are never merged with newer ones.
    """
    from transforms.aggregate import merge_into  # here: transforms.aggregate imports this module
    own = conn is None
    conn = conn or ledger.connect()
    try:
        with conn, conn.cursor() as cur:
            if not _try_lock(cur, ledger.group_id):
                return 0, 0
            _committed_table(cur, committed)
            cur.execute("""SELECT l.topic, l.partition, l.window_seconds, l.window_start_ms,
                                  l.from_offset, l.to_offset, l.partial, l.horizon_ms
                           FROM window_ledger l JOIN ledger_committed c USING (topic, partition)
                           WHERE l.group_id = %s AND l.to_offset <= c.committed
                             AND (l.topic, l.partition, l.window_seconds, l.window_start_ms) IN (
                               SELECT topic, partition, window_seconds, window_start_ms FROM window_ledger
                               WHERE group_id = %s GROUP BY 1, 2, 3, 4 HAVING count(*) > 1)""",
                        (ledger.group_id, ledger.group_id))
            groups: dict = defaultdict(list)
            for topic, partition, size, start, lo, hi, partial, horizon in cur:
                seed = keep_below is not None and hi <= keep_below.get((topic, partition), -1)
                groups[(topic, partition, size, start, seed)].append((lo, hi, partial, horizon))
            merged_away = 0
            for (topic, partition, size, start, _), parts in groups.items():
                if len(parts) < 2:
                    continue
                total: dict = {}
                for _, _, partial, _ in parts:
                    merge_into(total, partial)
                lo, hi = min(p[0] for p in parts), max(p[1] for p in parts)
                cur.execute("DELETE FROM window_ledger WHERE group_id = %s AND topic = %s AND partition = %s "
                            "AND window_seconds = %s AND window_start_ms = %s AND from_offset = ANY(%s)",
                            (ledger.group_id, topic, partition, size, start, [p[0] for p in parts]))
                _insert(cur, ledger.group_id, [LedgerRow(topic, partition, lo, hi, size, start, total,
                                                               max(p[3] for p in parts))])
                merged_away += len(parts) - 1
            expired = _expire(cur, ledger.group_id, finest_s, lateness_ms)
        return merged_away, expired
    finally:
        if own:
            conn.close()


def expired_before(horizon_ms: int, finest_s: int, lateness_ms: int) -> int:
    """Windows ending at or before this can receive no event any more.

    An event is refused as too late when its finest window ended ``lateness_ms``
    or more before the horizon of its batch; the horizon only grows, and a
    window of any size ends at most one finest window after the finest window
    of its last event.
    """
    return horizon_ms - lateness_ms - finest_s * 1000


def _expire(cur, group_id: str, finest_s: int, lateness_ms: int) -> int:
    # The horizon of committed rows only: a restart goes back to it.
    cur.execute("""SELECT max(l.horizon_ms) FROM window_ledger l JOIN ledger_committed c USING (topic, partition)
                   WHERE l.group_id = %s AND l.to_offset <= c.committed""", (group_id,))
    horizon = cur.fetchone()[0]
    if horizon is None:
        return 0
    cur.execute("DELETE FROM window_ledger WHERE group_id = %s "
                "AND window_start_ms + window_seconds * 1000::bigint <= %s",
                (group_id, expired_before(horizon, finest_s, lateness_ms)))
    return cur.rowcount


def _try_lock(cur, group_id: str) -> bool:
    cur.execute("SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (_LOCK, group_id))
    return cur.fetchone()[0]


def prepare_resume(ledger: WindowLedger, committed: Committed, finest_s: int, lateness_ms: int) -> Seeds:
    """Readies the ledger for a (re)starting job: drops the rows of records that
    will be read again (at or above ``committed``), compacts the rest (one row
    per partition and window) and says what is left: the windows to seed and
    the lateness horizon reached. The partials themselves are read by the job
    (:func:`read_seeds`), not the launcher, so they never travel in the pipeline.

    ``committed`` must hold every partition the job reads, each with the offset
    the job starts it from.
    """
    began = time.monotonic()
    conn = ledger.connect()
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK, ledger.group_id))
            _committed_table(cur, committed)
            cur.execute("""DELETE FROM window_ledger l USING ledger_committed c
                           WHERE l.group_id = %s AND l.topic = c.topic AND l.partition = c.partition
                             AND l.to_offset > c.committed""", (ledger.group_id,))
            if cur.rowcount:
                LOG.info("ledger: dropped %d rows above the committed offsets (read again)", cur.rowcount)
        compact(ledger, committed, finest_s, lateness_ms, conn=conn)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT count(*), count(DISTINCT (window_seconds, window_start_ms)), max(horizon_ms) "
                        "FROM window_ledger WHERE group_id = %s", (ledger.group_id,))
            rows, windows, horizon = cur.fetchone()
        return Seeds(windows, horizon, rows, time.monotonic() - began)
    finally:
        conn.close()


def read_seeds(ledger: WindowLedger, committed: Committed) -> Iterator[tuple[tuple[int, int], dict]]:
    """((window_seconds, window_start_ms), Partial) for every window the ledger
    holds below ``committed`` (what :func:`prepare_resume` left), merged over
    partitions. Rows the running job writes meanwhile start at or above
    ``committed`` and are not read; compaction keeps them apart (``keep_below``)."""
    from transforms.aggregate import merge_into  # here: transforms.aggregate imports this module
    conn = ledger.connect()
    try:
        partials: WindowPartials = {}
        with conn, conn.cursor() as cur:
            _committed_table(cur, committed)
            cur.execute("""SELECT l.window_seconds, l.window_start_ms, l.partial FROM window_ledger l
                           JOIN ledger_committed c USING (topic, partition)
                           WHERE l.group_id = %s AND l.to_offset <= c.committed""", (ledger.group_id,))
            for size, start, partial in cur:
                merge_into(partials.setdefault((size, start), {}), partial)
        yield from partials.items()
    finally:
        conn.close()
