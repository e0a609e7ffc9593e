"""The ledger ``dead_letter_recoveries`` (schemas/postgres.sql): a dead letter is claimed
before it is produced and confirmed once delivered, so no run publishes it twice.

Rows are keyed by the dead letter's own coordinates on the dead-letter topic.
A row left ``claimed`` (a crash, a failed delivery) may or may not be on the
source topic: it needs a person's look, and is sent again only when asked
(``retry_unconfirmed``).
"""
from __future__ import annotations

from datetime import datetime, timezone

import psycopg2
from psycopg2.extras import execute_values

from schemas.settings import redact
from transforms.recovery.request import BadRequest, RecoveryRequest, Stored, Tally

LEDGER = "dead_letter_recoveries"

_CLAIM = f"""INSERT INTO {LEDGER} (dlq_topic, dlq_partition, dlq_offset, source_topic, source_partition,
    source_offset, attempt, error_code, correlation_id, failed_at, status)
VALUES %s ON CONFLICT DO NOTHING RETURNING dlq_partition, dlq_offset"""
_CONFIRM = f"""UPDATE {LEDGER} AS r SET status = 'published', published_at = now(),
    republished_partition = v.rp, republished_offset = v.ro
FROM (VALUES %s) AS v(t, dp, dof, rp, ro)
WHERE r.dlq_topic = v.t AND r.dlq_partition = v.dp AND r.dlq_offset = v.dof"""


def connect(dsn: str) -> "psycopg2.extensions.connection":
    """A connection for the ledger (autocommit off); unreachable Postgres is a bad request."""
    try:
        conn = psycopg2.connect(dsn, connect_timeout=10)
    except psycopg2.Error as e:
        raise BadRequest(f"cannot reach Postgres at {redact(dsn)}: {str(e).strip().splitlines()[0]}") from None
    conn.autocommit = False
    return conn


def ledger_rows(conn, dlq_topic: str, chosen: list[Stored]) -> tuple[dict, dict]:
    """Existing ledger rows for ``chosen``: by DLQ origin, and by source key."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (LEDGER,))
        if not cur.fetchone()[0]:
            return {}, {}  # a dry run before the first real run: nothing recovered yet
        cur.execute(f"SELECT dlq_topic, dlq_partition, dlq_offset, source_topic, source_partition, "
                    f"source_offset, attempt, status FROM {LEDGER} "
                    f"WHERE dlq_topic = %s OR source_topic = ANY(%s)",
                    (dlq_topic, sorted({s.letter.source_topic for s in chosen})))
        rows = cur.fetchall()
    by_origin = {(r[1], r[2]): (tuple(r[3:7]), r[7]) for r in rows if r[0] == dlq_topic}
    by_source = {tuple(r[3:7]): r[7] for r in rows}
    return by_origin, by_source


def triage(request: RecoveryRequest, conn, chosen: list[Stored],
           tally: Tally) -> tuple[list[Stored], set[tuple[int, int]]]:
    """(those to send now, the origins among them already claimed by an earlier run);
    the rest is counted as already done or needing a look."""
    by_origin, by_source = ledger_rows(conn, request.dlq_topic, chosen)
    todo, reclaimed = [], set()
    for s in chosen:
        code = s.letter.error_code
        if s.origin in by_origin:
            source, status = by_origin[s.origin]
            if source != s.source_key:
                # The same coordinates held another dead letter: the topic was recreated.
                tally.needs_look(s, f"ledger row for these coordinates is for {source}: "
                                    f"was {request.dlq_topic} recreated?")
            elif status == "published":
                tally.done[code] += 1
            elif request.retry_unconfirmed:
                todo.append(s)
                reclaimed.add(s.origin)
            else:
                tally.needs_look(s, "claimed by an earlier run but never confirmed published")
        elif s.source_key in by_source:
            if by_source[s.source_key] == "published":
                tally.done[code] += 1  # a duplicate copy of a failure already recovered
            else:
                tally.needs_look(s, "a copy of this failure was claimed but never confirmed published")
        else:
            todo.append(s)
    return todo, reclaimed


def claim(conn, dlq_topic: str, chunk: list[Stored]) -> set[tuple[int, int]]:
    """Claims ``chunk`` (committed before anything is produced); returns the origins now ours."""
    if not chunk:
        return set()
    rows = [(dlq_topic, s.partition, s.offset, s.letter.source_topic, s.letter.source_partition,
             s.letter.source_offset, s.letter.attempt, s.letter.error_code, s.letter.correlation_id,
             datetime.fromtimestamp(s.letter.failed_at / 1000, tz=timezone.utc), "claimed") for s in chunk]
    with conn, conn.cursor() as cur:
        got = execute_values(cur, _CLAIM, rows, page_size=len(rows), fetch=True)
    return {(p, o) for p, o in got}


def confirm(conn, dlq_topic: str, delivered: dict) -> None:
    """Marks the ``delivered`` origins published, with where they were written."""
    rows = [(dlq_topic, dp, do, rp, ro) for (dp, do), (rp, ro) in delivered.items()]
    if rows:
        with conn, conn.cursor() as cur:
            execute_values(cur, _CONFIRM, rows, template="(%s, %s::int, %s::bigint, %s::int, %s::bigint)",
                           page_size=len(rows))
