"""What a restart costs after a day of traffic: the window ledger a job leaves, read back.

    python -m scripts.seed_cost                       # 20,000 users, 12 partitions
    python -m scripts.seed_cost --users 100000 --rate 13000

A job that ran for a day keeps in its ledger, after compaction, one row per
partition for each window still within its allowed lateness (1-minute windows
of the last hour and a bit, 5-minute ones, the hour windows and the day
window), plus the rows written since the last compaction (one per bundle,
partition and window size). At the benchmark's rate every user is active in
every window, so a row holds all the users of its partition: that, not the
number of events, is what a restart reads. This script writes such a ledger
(into a Postgres schema of its own, dropped at the end) with the real
transforms.ledger code, then times what a starting job does with it:
prepare_resume (drop, compact, count) in the launcher and read_seeds in the
job. It prints rows, megabytes of partials and seconds.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from typing import Optional

import psycopg2

from schemas.settings import WINDOW_SIZES_S, setting
from transforms.aggregate import COUNTERS, CONCEPT, CONTENT, OVERALL, OVERALL_ENTITY, USER
from transforms.ledger import LedgerRow, WindowLedger, prepare_resume, read_seeds, write_rows
from transforms.sinks.postgres_sink import apply_schema

DSN = setting("POSTGRES_DSN")
SIZES = WINDOW_SIZES_S


def partial(rng: random.Random, users: list, concepts: int, content: int, events: int) -> dict:
    """A window's counters for one partition: every user of it, some concepts and content."""
    counters = lambda family: [rng.randrange(1, 50) for _ in COUNTERS[family]]  # noqa: E731
    return {OVERALL: {OVERALL_ENTITY: [events] + counters(OVERALL)[1:]},
            USER: {u: counters(USER) for u in users},
            CONCEPT: {f"concept-{i}": counters(CONCEPT) for i in range(concepts)},
            CONTENT: {f"content-{i}": counters(CONTENT) for i in range(content)}}


def day_ledger(args, rng: random.Random, now_ms: int) -> list[LedgerRow]:
    """The rows a day-long run leaves: compacted ones per live window, then a
    minute of uncompacted bundle rows."""
    rows, lateness_ms = [], args.lateness * 1000
    users_of = {p: [f"user-{u}" for u in range(p, args.users, args.partitions)] for p in range(args.partitions)}
    per_partition_s = args.rate / args.partitions
    for size in SIZES:
        size_ms = size * 1000
        first = (now_ms - lateness_ms - 60_000) // size_ms * size_ms
        for start in range(first, now_ms, size_ms):
            for p in range(args.partitions):
                rows.append(LedgerRow("learning.events.v1", p, 0, 10**9, size, start,
                                      partial(rng, users_of[p], args.concepts, args.content,
                                              int(per_partition_s * min(size, 86400))), now_ms))
    bundle_users = max(1, int(per_partition_s))  # a second of one partition's traffic
    for second in range(args.compact_every):
        for p in range(args.partitions):
            users = rng.sample(users_of[p], min(bundle_users, len(users_of[p])))
            for size in SIZES:
                start = (now_ms - size * 1000) // (size * 1000) * size * 1000
                rows.append(LedgerRow("learning.events.v1", p, 10**9 + second, 10**9 + second + 1, size, start,
                                      partial(rng, users, args.concepts // 10, args.content // 10,
                                              int(per_partition_s)), now_ms))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.seed_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=20000, help="users active in the day (default 20000)")
    ap.add_argument("--concepts", type=int, default=500, help="concepts (default 500)")
    ap.add_argument("--content", type=int, default=2000, help="content items (default 2000)")
    ap.add_argument("--rate", type=float, default=13000, help="events per second (default 13000, the benchmark's)")
    ap.add_argument("--partitions", type=int, default=12, help="Kafka partitions (default 12)")
    ap.add_argument("--lateness", type=int, default=3600, help="allowed lateness, seconds (default 3600)")
    ap.add_argument("--compact-every", type=int, default=60, help="seconds between compactions (default 60)")
    ap.add_argument("--postgres-dsn", default=DSN, help="[POSTGRES_DSN]")
    args = ap.parse_args(argv)
    if min(args.users, args.partitions, args.compact_every) < 1 or args.rate <= 0:
        print("error: --users, --partitions, --compact-every and --rate must be positive", file=sys.stderr)
        return 2
    schema = f"seedcost_{uuid.uuid4().hex[:8]}"
    with psycopg2.connect(args.postgres_dsn) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
    dsn = f"{args.postgres_dsn}?options=-csearch_path%3D{schema}"
    try:
        apply_schema(dsn)
        ledger = WindowLedger(dsn, "seed-cost")
        now_ms = int(time.time() * 1000)
        rows = day_ledger(args, random.Random(7), now_ms)
        began = time.monotonic()
        conn = ledger.connect()
        for i in range(0, len(rows), 200):
            write_rows(conn, ledger.group_id, rows[i:i + 200])
        conn.close()
        print(f"ledger after a day: {len(rows):,} rows written in {time.monotonic() - began:.1f}s "
              f"({args.users:,} users over {args.partitions} partitions, {args.rate:,.0f} events/s)")
        with psycopg2.connect(dsn) as c, c.cursor() as cur:
            cur.execute("SELECT pg_total_relation_size('window_ledger'), sum(octet_length(partial::text)) "
                        "FROM window_ledger")
            table_bytes, json_bytes = cur.fetchone()
        committed = {("learning.events.v1", p): 10**9 + args.compact_every for p in range(args.partitions)}
        began = time.monotonic()
        seeds = prepare_resume(ledger, committed, min(SIZES), args.lateness * 1000)
        prepared = time.monotonic() - began
        began = time.monotonic()
        windows = sum(1 for _ in read_seeds(ledger, committed))
        read = time.monotonic() - began
        print(f"table {table_bytes / 2**20:,.0f} MiB, partials {json_bytes / 2**20:,.0f} MiB as JSON")
        print(f"restart: prepare_resume {prepared:.1f}s (left {seeds.rows:,} rows, {seeds.windows} windows), "
              f"read_seeds {read:.1f}s ({windows} windows merged); total {prepared + read:.1f}s")
        return 0
    finally:
        with psycopg2.connect(args.postgres_dsn) as conn, conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    sys.exit(main())
