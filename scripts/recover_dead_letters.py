"""Re-publish chosen dead letters to their source topics, once each, after their cause is fixed.

    python -m scripts.recover_dead_letters --since 2026-05-04T08:00Z --until 2026-05-04T09:30Z \\
        --error-code UNKNOWN_SCHEMA_ID [--error-code ...] [--dry-run]

Typical use: records failed with UNKNOWN_SCHEMA_ID because a producer shipped
before its schema was registered; once the schema is registered (and the
streaming job runs with it), this sends those records through the job again.

What it does:

1. reads the dead-letter topic (``--dlq_topic``, default analytics.dlq.v1) from
   its beginning up to the end offsets it had at start, with a throwaway
   consumer group that commits nothing (bounded by ``--timeout``);
2. selects the dead letters whose ``failed_at`` lies in [since, until) and
   whose error code is one of ``--error-code`` (all codes when none is given);
3. for each, claims a row in the Postgres ledger ``dead_letter_recoveries``
   (schemas/postgres.sql), keyed by the dead letter's own DLQ coordinates;
4. produces the original raw bytes to the dead letter's ``source_topic`` (same
   partition when it still exists; key None, as the original key was not
   kept) with headers ``correlation_id`` (when known), ``dlq_attempt`` =
   attempt + 1 and ``dlq_origin`` = ``<dlq topic>:<partition>:<offset>``;
5. once the producer confirmed delivery, marks the ledger row ``published``.

Running it twice never publishes a dead letter twice: published rows are
skipped ("already done"). A row left ``claimed`` (a crash or a failed delivery
between steps 3 and 5) may or may not be on the source topic, so it is
reported as *needs a look* and not re-sent. Look for a record with header
``dlq_origin`` equal to its coordinates on the source topic; if there is none,
run again with ``--retry-unconfirmed`` to send those rows again.

Times are ISO 8601; without a zone they are UTC. Brokers and DSN default to
KAFKA_BROKERS and POSTGRES_DSN, like the pipelines. ``--dry-run`` reads and
reports, and writes nothing (not even the ledger table).

Progress goes to stderr, the summary to stdout. Exit codes: 0 everything
selected is published (now or before); 1 some dead letters need a look, or
reading/producing failed; 2 a bad request (since >= until, unknown topic or
error code, Kafka or Postgres unreachable) with one ``error:`` line.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator, NamedTuple, NoReturn, Optional

import psycopg2
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from psycopg2.extras import execute_values

from schemas.error_codes import ErrorCode
from schemas.postgres import apply_schema
from schemas.settings import parse_instant, setting
from schemas.wire import decode_avro, produce_waiting, schema_id_of
from transforms.records import DeadLetter

LEDGER = "dead_letter_recoveries"
CHUNK = 500  # dead letters claimed, produced and confirmed together: bounds what a crash leaves unconfirmed
KNOWN_CODES = sorted(v for k, v in vars(ErrorCode).items() if k.isupper())


class BadRequest(Exception):
    """The request cannot be served as asked: exit 2 with one line."""


class RecoveryFailed(Exception):
    """Something broke while serving a valid request: exit 1."""


class Stored(NamedTuple):
    """A dead letter and where it sits on the dead-letter topic."""
    partition: int
    offset: int
    letter: DeadLetter

    @property
    def origin(self) -> tuple[int, int]:
        return self.partition, self.offset

    @property
    def source_key(self) -> tuple[str, int, int, int]:
        # Two dead letters with the same source record and attempt are one failure
        # written twice (a retried bundle of the streaming job): publish it once.
        dl = self.letter
        return dl.source_topic, dl.source_partition, dl.source_offset, dl.attempt


@dataclass
class Tally:
    """Counts for the summary, per error code."""
    scanned: int = 0
    unreadable: int = 0
    selected: Counter = field(default_factory=Counter)
    republished: Counter = field(default_factory=Counter)
    done: Counter = field(default_factory=Counter)
    look: Counter = field(default_factory=Counter)
    notes: list = field(default_factory=list)  # (Stored, reason) of those that need a look

    def needs_look(self, s: Stored, reason: str) -> None:
        self.look[s.letter.error_code] += 1
        self.notes.append((s, reason))


# -- the request ----------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise BadRequest(message)


def parse_time(text: str) -> int:
    """ISO 8601 with a zone to epoch millis (schemas.settings.parse_instant's rule)."""
    try:
        return int(parse_instant(text).timestamp() * 1000)
    except ValueError as e:
        raise BadRequest(str(e)) from None


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = _Parser(prog="python -m scripts.recover_dead_letters", description=__doc__.split("\n\n")[0])
    ap.add_argument("--since", required=True, help="first failed_at to recover (ISO 8601, inclusive)")
    ap.add_argument("--until", required=True, help="failed_at bound (ISO 8601, exclusive)")
    ap.add_argument("--error-code", "--error_code", dest="codes", action="extend", nargs="+", default=[],
                    metavar="CODE", help="recover only these codes (repeatable); default all")
    ap.add_argument("--dlq_topic", "--dlq-topic", default="analytics.dlq.v1")
    ap.add_argument("--brokers", default=setting("KAFKA_BROKERS"),
                    help="Kafka bootstrap servers [KAFKA_BROKERS]")
    ap.add_argument("--postgres_dsn", "--postgres-dsn",
                    default=setting("POSTGRES_DSN"),
                    help="holds the ledger table [POSTGRES_DSN]")
    ap.add_argument("--dry-run", "--dry_run", action="store_true", help="report only, write nothing")
    ap.add_argument("--retry-unconfirmed", action="store_true",
                    help="send again rows left 'claimed' by an earlier run (check first that they are "
                         "not on the source topic: this may duplicate them)")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to read the dead-letter topic to its end before giving up")
    ap.add_argument("--progress-every", type=int, default=10000, help="progress line every N records")
    args = ap.parse_args(argv)
    args.since_ms, args.until_ms = parse_time(args.since), parse_time(args.until)
    if args.since_ms >= args.until_ms:
        raise BadRequest(f"--since {args.since} is not before --until {args.until}")
    unknown = sorted(set(args.codes) - set(KNOWN_CODES))
    if unknown:
        raise BadRequest(f"unknown error code(s) {', '.join(unknown)}; known: {', '.join(KNOWN_CODES)}")
    if args.progress_every < 1 or args.timeout <= 0:
        raise BadRequest("--progress-every and --timeout must be positive")
    return args


def redact(dsn: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", dsn)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- Kafka ----------------------------------------------------------------------

def kafka_partitions(brokers: str, timeout_s: float) -> dict[str, int]:
    """Every topic of the cluster and its partition count; unreachable Kafka is a bad request."""
    # Listing all topics, not just the one asked for, so nothing is ever auto-created.
    # log_level 0: librdkafka would print a line per failed connection attempt.
    c = Consumer({"bootstrap.servers": brokers, "group.id": "dlq-recovery-preflight",
                  "socket.connection.setup.timeout.ms": 3000, "log_level": 0})
    try:
        topics = c.list_topics(timeout=min(5.0, timeout_s)).topics
    except KafkaException as e:
        raise BadRequest(f"cannot reach Kafka at {brokers}: {e.args[0].str() if e.args else e}") from None
    finally:
        c.close()
    return {name: len(t.partitions) for name, t in topics.items() if t.error is None}


def _decode(value: Optional[bytes]) -> Optional[DeadLetter]:
    """A dead-letter record, or None for one this tool cannot read (not ours, tombstone)."""
    if schema_id_of(value) is None:
        return None
    try:
        entry, rec = decode_avro(value)
    except Exception:  # any body we cannot read is counted, not fatal
        return None
    if entry.subject != "dead_letter":
        return None
    return DeadLetter(**{f: rec.get(f) for f in DeadLetter._fields if f in rec})


def read_dead_letters(args: argparse.Namespace, partitions: int, tally: Tally) -> Iterator[Stored]:
    """Every dead letter of the topic up to the end offsets it has now; bounded by --timeout."""
    topic = args.dlq_topic
    c = Consumer({"bootstrap.servers": args.brokers, "group.id": f"dlq-recovery-{uuid.uuid4()}",
                  "enable.auto.commit": False, "enable.partition.eof": False, "log_level": 0})
    try:
        deadline = time.monotonic() + args.timeout
        ends, starts = {}, []
        for p in range(partitions):
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=min(10.0, args.timeout))
            if high > low:  # from the low watermark: older records were deleted by retention
                ends[p] = high
                starts.append(TopicPartition(topic, p, low))
        total = sum(ends[tp.partition] - tp.offset for tp in starts)
        c.assign(starts)
        while ends:
            if time.monotonic() > deadline:
                raise RecoveryFailed(f"could not read {topic} to its end within {args.timeout:g}s "
                                     f"({tally.scanned} of {total} read); retry, or raise --timeout")
            for m in c.consume(1000, timeout=1.0):
                if m.error() is not None:
                    if m.error().fatal():
                        raise RecoveryFailed(f"reading {topic}: {m.error().str()}")
                    continue
                if m.offset() >= ends.get(m.partition(), -1):
                    continue  # written after we started: the next run's business
                tally.scanned += 1
                if tally.scanned % args.progress_every == 0:
                    progress(f"  read {tally.scanned} of {total} dead letters")
                letter = _decode(m.value())
                if letter is None:
                    tally.unreadable += 1
                    continue
                yield Stored(m.partition(), m.offset(), letter)
            # Positions, not the last offset seen: they also step over gaps (compaction, markers).
            for tp in c.position([TopicPartition(topic, p) for p in list(ends)]):
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
    finally:
        c.close()


def select(args: argparse.Namespace, partitions: int, tally: Tally) -> list[Stored]:
    """The chosen dead letters, each failure once (the first copy of a duplicated one)."""
    codes, chosen, seen = set(args.codes), [], set()
    for s in read_dead_letters(args, partitions, tally):
        dl = s.letter
        if not args.since_ms <= dl.failed_at < args.until_ms or (codes and dl.error_code not in codes):
            continue
        if s.source_key in seen:
            continue
        seen.add(s.source_key)
        tally.selected[dl.error_code] += 1
        chosen.append(s)
    return chosen


def produce_chunk(producer: Producer, dlq_topic: str, chunk: list[Stored],
                  partitions: dict[str, int]) -> tuple[dict, dict]:
    """Produces and flushes ``chunk``.

    Returns ({origin: (partition, offset) written}, {origin: error}) by dead-letter origin.
    """
    delivered: dict = {}
    failed: dict = {}

    def report(origin: tuple[int, int]):
        def on_delivery(err, msg):
            if err is None:
                delivered[origin] = (msg.partition(), msg.offset())
            else:
                failed[origin] = err.str()
        return on_delivery

    for s in chunk:
        dl = s.letter
        headers = [("dlq_attempt", str(dl.attempt + 1).encode()),
                   ("dlq_origin", f"{dlq_topic}:{s.partition}:{s.offset}".encode())]
        if dl.correlation_id:
            headers.insert(0, ("correlation_id", dl.correlation_id.encode()))
        # Same partition as the original when it still exists, so the record keeps its
        # place among its key's records; otherwise the partitioner picks one.
        kwargs = {"partition": dl.source_partition} if dl.source_partition < partitions[dl.source_topic] else {}
        produce_waiting(producer, dl.source_topic, dl.raw_bytes, None, headers=headers,
                        on_delivery=report(s.origin), **kwargs)
        producer.poll(0)
    left = producer.flush(60)
    for s in chunk:
        if s.origin not in delivered and s.origin not in failed:
            failed[s.origin] = f"no delivery report after 60s ({left} records still queued)"
    return delivered, failed


# -- the ledger -----------------------------------------------------------------

def connect(dsn: str):
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


def triage(args: argparse.Namespace, conn, chosen: list[Stored],
           tally: Tally) -> tuple[list[Stored], set[tuple[int, int]]]:
    """(those to send now, the origins among them already claimed by an earlier run);
    the rest is counted as already done or needing a look."""
    by_origin, by_source = ledger_rows(conn, args.dlq_topic, chosen)
    todo, reclaimed = [], set()
    for s in chosen:
        code = s.letter.error_code
        if s.origin in by_origin:
            source, status = by_origin[s.origin]
            if source != s.source_key:
                # The same coordinates held another dead letter: the topic was recreated.
                tally.needs_look(s, f"ledger row for these coordinates is for {source}: "
                                    f"was {args.dlq_topic} recreated?")
            elif status == "published":
                tally.done[code] += 1
            elif args.retry_unconfirmed:
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


_CLAIM = f"""INSERT INTO {LEDGER} (dlq_topic, dlq_partition, dlq_offset, source_topic, source_partition,
    source_offset, attempt, error_code, correlation_id, failed_at, status)
VALUES %s ON CONFLICT DO NOTHING RETURNING dlq_partition, dlq_offset"""
_CONFIRM = f"""UPDATE {LEDGER} AS r SET status = 'published', published_at = now(),
    republished_partition = v.rp, republished_offset = v.ro
FROM (VALUES %s) AS v(t, dp, dof, rp, ro)
WHERE r.dlq_topic = v.t AND r.dlq_partition = v.dp AND r.dlq_offset = v.dof"""


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
    rows = [(dlq_topic, dp, do, rp, ro) for (dp, do), (rp, ro) in delivered.items()]
    if rows:
        with conn, conn.cursor() as cur:
            execute_values(cur, _CONFIRM, rows, template="(%s, %s::int, %s::bigint, %s::int, %s::bigint)",
                           page_size=len(rows))


# -- the run --------------------------------------------------------------------

def publish(args: argparse.Namespace, conn, todo: list[Stored], reclaimed: set[tuple[int, int]],
            partitions: dict[str, int], tally: Tally) -> None:
    """Claim, produce, flush, confirm; chunk by chunk."""
    producer = Producer({"bootstrap.servers": args.brokers, "enable.idempotence": True,
                         "linger.ms": 20, "message.timeout.ms": 45000})
    for i in range(0, len(todo), CHUNK):
        chunk = todo[i:i + CHUNK]
        # Rows claimed by an earlier run are ours only with --retry-unconfirmed (triage decided).
        ours = claim(conn, args.dlq_topic, [s for s in chunk if s.origin not in reclaimed])
        ours |= {s.origin for s in chunk if s.origin in reclaimed}
        for s in chunk:
            if s.origin not in ours:
                tally.needs_look(s, "claimed by a concurrent run just now")
        chunk = [s for s in chunk if s.origin in ours]
        delivered, failed = produce_chunk(producer, args.dlq_topic, chunk, partitions)
        confirm(conn, args.dlq_topic, delivered)
        for s in chunk:
            if s.origin in delivered:
                tally.republished[s.letter.error_code] += 1
            else:
                tally.needs_look(s, f"delivery failed, row stays claimed: {failed[s.origin]}")
        done = min(i + CHUNK, len(todo))
        if done // args.progress_every > i // args.progress_every or done == len(todo):
            progress(f"  republished {sum(tally.republished.values())} of {len(todo)}")


def check_sources(chosen: list[Stored], partitions: dict[str, int], tally: Tally) -> list[Stored]:
    """Drops (and reports) dead letters whose source topic no longer exists."""
    kept = []
    for s in chosen:
        if s.letter.source_topic in partitions:
            kept.append(s)
        else:
            tally.needs_look(s, f"source topic {s.letter.source_topic} does not exist")
    return kept


def print_summary(args: argparse.Namespace, tally: Tally) -> None:
    n = lambda c: sum(c.values())  # noqa: E731
    verb = "would republish" if args.dry_run else "republished"
    print(f"dead-letter recovery from {args.dlq_topic}{' (dry run: nothing written)' if args.dry_run else ''}")
    print(f"  failed_at       [{iso(args.since_ms)}, {iso(args.until_ms)})")
    print(f"  error codes     {', '.join(args.codes) if args.codes else 'all'}")
    unreadable = f" ({tally.unreadable} unreadable, skipped)" if tally.unreadable else ""
    print(f"  scanned         {tally.scanned}{unreadable}")
    print(f"  selected        {n(tally.selected)}")
    print(f"  {verb:<15} {n(tally.republished)}")
    print(f"  already done    {n(tally.done)}")
    print(f"  needs a look    {n(tally.look)}")
    if tally.selected:
        print(f"  {'by error code':<24} {'selected':>8} {'republished':>12} "
              f"{'already done':>13} {'needs a look':>13}")
        for code in sorted(tally.selected):
            print(f"    {code:<22} {tally.selected[code]:>8} {tally.republished[code]:>12} "
                  f"{tally.done[code]:>13} {tally.look[code]:>13}")
    for s, reason in tally.notes[:20]:
        dl = s.letter
        print(f"  needs a look: {args.dlq_topic}:{s.partition}:{s.offset} ({dl.error_code}, "
              f"from {dl.source_topic}:{dl.source_partition}:{dl.source_offset}): {reason}")
    if len(tally.notes) > 20:
        print(f"  ... and {len(tally.notes) - 20} more")
    if tally.notes:
        print("  -> look on the source topic for a record with header dlq_origin=<these coordinates>; "
              "if none is there, rerun with --retry-unconfirmed")


def recover(args: argparse.Namespace) -> Tally:
    partitions = kafka_partitions(args.brokers, args.timeout)
    if args.dlq_topic not in partitions:
        raise BadRequest(f"topic {args.dlq_topic} does not exist on {args.brokers}")
    conn = connect(args.postgres_dsn)
    try:
        if not args.dry_run:
            apply_schema(conn)  # before reading: a DDL problem should cost no minutes of reading
        tally = Tally()
        chosen = check_sources(select(args, partitions[args.dlq_topic], tally), partitions, tally)
        todo, reclaimed = triage(args, conn, chosen, tally)
        if args.dry_run:
            tally.republished.update(s.letter.error_code for s in todo)
        elif todo:
            publish(args, conn, todo, reclaimed, partitions, tally)
        return tally
    finally:
        conn.close()


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = parse_args(argv)
        tally = recover(args)
    except BadRequest as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RecoveryFailed, KafkaException, psycopg2.Error) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 1
    print_summary(args, tally)
    if tally.look and not args.dry_run:
        print(f"error: {sum(tally.look.values())} dead letter(s) need a look (listed above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
