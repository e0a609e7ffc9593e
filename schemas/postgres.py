"""The Postgres schema (schemas/postgres.sql) and how it is applied.

Idempotent: every sink, the ledger and the recovery command apply it at
start-up; an advisory lock makes parallel workers apply it one at a time.
Importable without Beam.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

import psycopg2

from schemas.registry import SCHEMA_DIR

DDL_FILE = os.path.join(SCHEMA_DIR, "postgres.sql")

# Advisory lock keys, one owner so that no two uses collide (a collision is a deadlock):
SCHEMA_LOCK = 4242      # pg_advisory_xact_lock(key) while the DDL runs
PARTITION_LOCK = 4243   # pg_advisory_xact_lock(key) while a daily raw_events partition is created
COMPACTION_LOCK = 4244  # pg_advisory_xact_lock(key, hashtext(group)): one ledger compaction per group
LEASE_LOCK = 4245       # pg_try_advisory_lock(key, hashtext(group)): one run per group (transforms/lease.py)
ALERT_OWNER_LOCK = 4247 # pg_advisory_lock(key, hashtext(owner)): held by a live alert publisher (transforms/alerts)
ALERT_LOCK = 4246       # pg_advisory_xact_lock(key, hashtext(kind:entity)): one episode decision at a time (transforms/alerts)


def connect(dsn: str):
    """A connection outside autocommit, with a bounded connect."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = False
    return conn


def utc(ms: int) -> datetime:
    """Epoch milliseconds as an aware UTC datetime (what timestamptz columns take)."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def apply_schema(conn) -> None:
    """Creates whatever of schemas/postgres.sql is missing, on ``conn`` (a psycopg2 connection), and commits."""
    with open(DDL_FILE) as f:
        ddl = f.read()
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        cur.execute(ddl)
